"""GraceGate reproduces DeepSpeed TopKGate's deterministic eval routing exactly (no processes)."""

from __future__ import annotations

import pytest
import torch
from deepspeed.moe.sharded_moe import TopKGate

from ds_grace.moe.gate import GraceGate

HIDDEN, EXPERTS = 24, 8


def _deepspeed_gate(k: int) -> TopKGate:
    torch.manual_seed(11 + k)
    return TopKGate(
        HIDDEN, EXPERTS, k, min_capacity=0, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False
    ).eval()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_choice_weights_l_aux_and_counts_equal_deepspeed(k, dtype):
    ds_gate = _deepspeed_gate(k)
    grace_gate = GraceGate.from_deepspeed(ds_gate)
    x_TD = torch.randn(37, HIDDEN).to(dtype)
    with torch.no_grad():
        l_aux, _, _, ids_KT, _, gates_KT, counts = ds_gate(x_TD, None, True)
        out = grace_gate(x_TD)
    assert torch.equal(out.topk_ids_TK, ids_KT.t().long())
    assert torch.equal(out.topk_weights_TK, gates_KT.t())
    assert torch.equal(out.l_aux, l_aux)
    assert torch.equal(out.exp_counts_E, counts)


def test_top1_used_token_masks_routes_like_deepspeed():
    # DeepSpeed's used_token path fails with drop_tokens=False; a capacity of all tokens drops nothing.
    torch.manual_seed(5)
    ds_gate = TopKGate(
        HIDDEN, EXPERTS, 1, eval_capacity_factor=float(EXPERTS), min_capacity=0, use_rts=False
    ).eval()
    grace_gate = GraceGate.from_deepspeed(ds_gate)
    x_TD = torch.randn(12, HIDDEN)
    used_T = (torch.arange(12) % 3 != 0).float()
    with torch.no_grad():
        l_aux, _, _, ids_KT, _, gates_KT, counts = ds_gate(x_TD, used_T, True)
        out = grace_gate(x_TD, used_T)
    assert torch.equal(out.topk_ids_TK, ids_KT.t().long())
    assert out.topk_ids_TK[::3].eq(-1).all()
    assert torch.equal(out.topk_weights_TK, gates_KT.t())
    assert torch.equal(out.l_aux, l_aux) and torch.equal(out.exp_counts_E, counts)


def test_gate_keeps_deepspeed_attributes_and_handles_zero_tokens():
    gate = GraceGate(HIDDEN, EXPERTS, 6)
    assert isinstance(gate, TopKGate) and gate.wg.weight.shape == (EXPERTS, HIDDEN) and gate.k == 6
    out = gate(torch.zeros(0, HIDDEN))
    assert out.topk_ids_TK.shape == (0, 6) and out.l_aux.item() == 0.0
    assert out.exp_counts_E.tolist() == [0] * EXPERTS


def test_gate_k_must_fit():
    with pytest.raises(ValueError, match=r"k \(9\) must be an integer in \[1, num_experts=8\]"):
        GraceGate(HIDDEN, EXPERTS, 9)
    with pytest.raises(ValueError, match=r"k \(0\) must be an integer in \[1, num_experts=8\]"):
        GraceGate(HIDDEN, EXPERTS, 0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gate_reads_nothing_back_from_the_device(k):
    from benchmarks.counting import count_hot_path

    gate = GraceGate(model_dim=16, num_experts=8, k=k)
    x_TD = torch.randn(5, 16)
    with torch.no_grad(), count_hot_path() as counts:
        gate(x_TD)
    assert counts.num_host_reads == 0, counts.host_reads
