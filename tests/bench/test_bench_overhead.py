"""bench_overhead's static grouped-GEMM alternative computes what the minimal reference computes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_overhead import (
    NUM_EXPERTS,
    TOP_K,
    make_experts,
    reference_forward,
    stacked_weights,
    static_grouped_forward,
)


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_static_grouped_forward_equals_the_reference(tokens):
    experts = make_experts()
    generator = torch.Generator().manual_seed(tokens)
    x_TD = torch.randn(tokens, experts[0][0].in_features, generator=generator)
    logits = torch.randn(tokens, NUM_EXPERTS, generator=generator)
    logits[:, 3] += 5.0  # skewed: one expert in every token's top-k, some experts unused
    w_TK, ids_TK = logits.softmax(1).topk(TOP_K, dim=1)
    with torch.no_grad():
        grouped = static_grouped_forward(stacked_weights(experts), x_TD, ids_TK, w_TK)
        torch.testing.assert_close(
            grouped, reference_forward(experts, x_TD, ids_TK, w_TK), rtol=1e-4, atol=1e-4
        )
