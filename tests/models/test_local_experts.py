"""LocalRoutedExperts against a per-token loop, and its input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_grace.models import LocalRoutedExperts


def _experts(num_experts: int, hidden: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        for _ in range(num_experts)
    ]


def _per_token_reference(experts, x_TD, topk_ids_TK, topk_weights_TK):
    rows = []
    for t in range(x_TD.shape[0]):
        row = torch.zeros(x_TD.shape[1])
        for k in range(topk_ids_TK.shape[1]):
            row = row + topk_weights_TK[t, k] * experts[int(topk_ids_TK[t, k])](x_TD[t : t + 1])[0]
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_forward_routed_matches_per_token_loop(ids_dtype):
    experts = _experts(6, 8)
    local = LocalRoutedExperts(experts)
    generator = torch.Generator().manual_seed(1)
    x_TD = torch.randn(20, 8, generator=generator)
    # 3 distinct experts per token; expert 5 is never chosen.
    topk_ids_TK = torch.stack([torch.randperm(5, generator=generator)[:3] for _ in range(20)]).to(ids_dtype)
    topk_weights_TK = torch.rand(20, 3, generator=generator)
    with torch.no_grad():
        y_TD = local.forward_routed(x_TD, topk_ids_TK, topk_weights_TK)
        expected = _per_token_reference(experts, x_TD, topk_ids_TK, topk_weights_TK)
        assert torch.equal(local(x_TD, topk_ids_TK, topk_weights_TK), y_TD)
    torch.testing.assert_close(y_TD, expected, atol=1e-6, rtol=1e-5)
    assert local.num_experts == 6


def test_forward_routed_empty_batch_and_dtype():
    local = LocalRoutedExperts(_experts(2, 4)).to(torch.bfloat16)
    y = local.forward_routed(
        torch.zeros(0, 4, dtype=torch.bfloat16), torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1)
    )
    assert y.shape == (0, 4) and y.dtype == torch.bfloat16
    x_TD = torch.randn(3, 4, dtype=torch.bfloat16)
    y = local.forward_routed(x_TD, torch.tensor([[0], [1], [1]]), torch.ones(3, 1))  # fp32 weights
    assert y.dtype == torch.bfloat16


def test_forward_routed_input_errors():
    local = LocalRoutedExperts(_experts(4, 4))
    x_TD = torch.randn(3, 4)
    weights = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"topk_ids_TK values must be in \[0, 4\), got min 0 and max 4"):
        local.forward_routed(x_TD, torch.tensor([[0, 1], [2, 3], [4, 0]]), weights)
    with pytest.raises(ValueError, match=r"topk_ids_TK shape \(2, 2\) must be \[tokens=3, top_k\]"):
        local.forward_routed(x_TD, torch.zeros(2, 2, dtype=torch.long), weights)
    with pytest.raises(
        ValueError, match=r"topk_weights_TK shape \(3, 1\) must equal topk_ids_TK shape \(3, 2\)"
    ):
        local.forward_routed(x_TD, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"topk_ids_TK dtype \(torch.float32\) must be int32 or int64"):
        local.forward_routed(x_TD, torch.zeros(3, 2), weights)
    with pytest.raises(ValueError, match=r"x_TD must be 2-D"):
        local.forward_routed(x_TD[None], torch.zeros(3, 2, dtype=torch.long), weights)
    with pytest.raises(ValueError, match=r"experts must hold at least one expert module"):
        LocalRoutedExperts([])
