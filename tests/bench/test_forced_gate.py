"""The vanilla systems' forced gate applies DeepSpeed's capacity rule to the replayed routing:
its dropped routes must equal an independent count and DeepSpeed's own gating of the same choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from deepspeed.moe.sharded_moe import top2gating, topkgating

from benchmarks.runner import vanilla_bytes
from ds_grace.inference import RoutingGate
from ds_grace.topology import Topology
from ds_grace.vanilla import DEEPSPEED_DEFAULT, gate_stats


def _skewed_routing(tokens: int, experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    popularity = np.arange(1, experts + 1, dtype=float) ** -1.2
    ids = np.stack(
        [rng.choice(experts, size=k, replace=False, p=popularity / popularity.sum()) for _ in range(tokens)]
    )
    weights = rng.dirichlet(np.ones(k), size=tokens)
    weights = -np.sort(-weights, axis=1)
    return torch.from_numpy(ids).long(), torch.from_numpy(weights).float()


def _independent_drops(ids_TK: torch.Tensor, experts: int, capacity: int) -> int:
    """Each expert keeps at most `capacity` of the routes that chose it; the rest are dropped."""
    counts = np.bincount(ids_TK.numpy().ravel(), minlength=experts)
    return int(np.maximum(counts - capacity, 0).sum())


def _forced_logits(ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: int) -> torch.Tensor:
    """Logits whose softmax top-k is ids_TK in order, with probabilities ordered like weights_TK."""
    logits = torch.full((ids_TK.shape[0], experts), -20.0)
    ranks = torch.arange(ids_TK.shape[1], 0, -1, dtype=torch.float32)
    logits.scatter_(1, ids_TK, ranks.expand_as(ids_TK) + weights_TK)
    return logits


@pytest.mark.parametrize(("experts", "k", "tokens"), [(8, 2, 128), (64, 8, 96), (8, 2, 4)])
def test_forced_gate_drops_match_independent_count_and_deepspeed(experts: int, k: int, tokens: int) -> None:
    ids_TK, weights_TK = _skewed_routing(tokens, experts, k, seed=experts + k)
    gate = RoutingGate(
        num_experts=experts,
        k=k,
        drop_tokens=True,
        eval_capacity_factor=DEEPSPEED_DEFAULT.eval_capacity_factor,
        min_capacity=DEEPSPEED_DEFAULT.min_capacity,
    ).eval()
    gate.hand_routing((ids_TK, weights_TK))
    output = gate(torch.zeros(tokens, 4))
    stats = gate_stats(k, output, None)
    capacity = max(
        math.ceil(tokens / experts * k * DEEPSPEED_DEFAULT.eval_capacity_factor),
        DEEPSPEED_DEFAULT.min_capacity,
    )
    assert stats.capacity == capacity
    expected = _independent_drops(ids_TK, experts, capacity)
    assert stats.routes == tokens * k
    assert stats.dropped == expected
    if tokens >= 64:
        assert expected > 0, "the skewed routing must overflow some expert for the test to mean anything"

    logits = _forced_logits(ids_TK, weights_TK, experts)
    if k == 2:
        ds_out = top2gating(
            logits,
            DEEPSPEED_DEFAULT.eval_capacity_factor,
            DEEPSPEED_DEFAULT.min_capacity,
            drop_tokens=True,
            top2_2nd_expert_sampling=False,
        )
    else:
        ds_out = topkgating(
            logits,
            k,
            DEEPSPEED_DEFAULT.eval_capacity_factor,
            DEEPSPEED_DEFAULT.min_capacity,
            drop_tokens=True,
        )
    ds_stats = gate_stats(k, ds_out, None)
    assert ds_stats.capacity == capacity
    assert ds_stats.dropped == stats.dropped
    if k == 2:  # position order for k <= 2: the very same routes survive, not only as many
        indices_KS = output[3]
        kept_forced = {
            (s, int(indices_KS[j, s])) for j in range(k) for s in range(tokens) if indices_KS[j, s] >= 0
        }
        kept_deepspeed = {tuple(pair) for pair in torch.nonzero(ds_out[2].any(dim=-1)).tolist()}
        assert kept_forced == kept_deepspeed


def test_lossless_gate_drops_nothing_and_pads_to_the_largest_count() -> None:
    ids_TK, weights_TK = _skewed_routing(128, 8, 2, seed=3)
    gate = RoutingGate(num_experts=8, k=2, drop_tokens=False, eval_capacity_factor=1.0, min_capacity=4).eval()
    gate.hand_routing((ids_TK, weights_TK))
    stats = gate_stats(2, gate(torch.zeros(128, 4)), None)
    assert stats.dropped == 0
    assert stats.capacity == int(np.bincount(ids_TK.numpy().ravel(), minlength=8).max())


def test_vanilla_bytes_counts_the_padded_buffer_per_peer() -> None:
    # 2 nodes x 2 ranks, 8 experts: 2 per rank; capacity 10 rows of 16 fp32 values
    intra, inter = vanilla_bytes(capacity=10, num_experts=8, hidden=16, itemsize=4, topology=Topology(2, 2))
    per_peer = 2 * 10 * 16 * 4
    assert intra == 2 * 1 * per_peer  # dispatch + combine, one same-node peer
    assert inter == 2 * 2 * per_peer  # dispatch + combine, two remote peers
