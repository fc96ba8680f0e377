"""GraceMoE on 4 spawned gloo ranks: parity, counters, DeepSpeed drop-in, memory and timeout.

Spawns are costly (imports), so each test batches many cases into one spawn: the selfcheck runs
random cases (plans with replicas; random, zero-token-rank, one-expert and masked routings;
fp32 and bf16; hierarchical, flat and flat without dedup) on 2x2, 1x4 and 4x1 and checks outputs
against a single-process reference, the modes against each other, and every counter against the
traffic the routing implies.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from deepspeed.moe.layer import MoE
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ds_grace.cli import main
from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.commands.selfcheck import MODES, RELATIVE_TOLERANCE, SCENARIOS, random_layer_plan, run_selfcheck
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.planning.plan import LayerPlan
from ds_grace.topology import Topology

pytestmark = pytest.mark.multirank

HIDDEN = 32
TIMEOUT_S = 2.0


def test_selfcheck_2x2_parity_modes_and_counters():
    result = run_selfcheck(Topology(2, 2), cases=12, seed=1)
    assert result["summary"]["cases"] == 12
    details = result["details"]
    assert {d["scenario"] for d in details} == set(SCENARIOS) and {d["dtype"] for d in details} == {
        "fp32",
        "bf16",
    }
    for case in details:
        assert case["routes"] > 0 and case["computed_routes"] == {mode: case["routes"] for mode in MODES}, (
            case
        )
        assert all(case["counters_ok"].values()), case
        assert max(case["abs_diff"].values()) <= case["tolerance"], case
        # hierarchical vs flat: fp32 differs only in summation order
        if case["dtype"] == "fp32":
            assert max(case["mode_diff"].values()) <= case["tolerance"], case
    assert result["summary"] == {
        "cases": 12,
        "mismatches": 0,
        "dropped_routes": 0,
        "max_abs_diff": max(max(d["abs_diff"].values()) for d in details),
        "max_abs_diff_by_dtype": {
            dtype: max(max(d["abs_diff"].values()) for d in details if d["dtype"] == dtype)
            for dtype in ("fp32", "bf16")
        },
    }
    assert result["summary"]["max_abs_diff_by_dtype"]["fp32"] <= 1e-5


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 4), (4, 1)])
def test_selfcheck_cli_1x4_and_4x1(nodes, gpus, capsys):
    rc = main(
        ["selfcheck", "--world-size", str(nodes * gpus), "--nodes", str(nodes), "--cases", "12", "--json"]
    )
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["cases"] == 12 and summary["mismatches"] == 0 and summary["dropped_routes"] == 0, summary
    assert 0 < summary["max_abs_diff"] <= RELATIVE_TOLERANCE["bf16"] * 10
    assert rc == 0


def _expert() -> nn.Module:
    return nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))


def _deepspeed_moe(*, k: int, num_experts: int, ep_size: int, expert_seed: int) -> MoE:
    """A DeepSpeed MoE with lossless settings; gate shared by all ranks, experts seeded by caller."""
    moe = MoE(
        HIDDEN,
        _expert(),
        num_experts=num_experts,
        ep_size=ep_size,
        k=k,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
        min_capacity=0,
    ).eval()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(
            torch.randn(num_experts, HIDDEN, generator=torch.Generator().manual_seed(7))
        )
        generator = torch.Generator().manual_seed(expert_seed)
        for param in moe.deepspeed_moe.experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / HIDDEN**0.5)
    if ep_size > 1:
        moe.set_deepspeed_parallelism()
    return moe


def _compare(reference: tuple, candidate: tuple) -> dict[str, float | bool]:
    y_ref, l_ref, counts_ref = reference
    y, l_aux, counts = candidate
    return {
        "diff": float((y.float() - y_ref.float()).abs().max()),
        "scale": max(1.0, float(y_ref.float().abs().max())),
        "same_shape": y.shape == y_ref.shape and y.dtype == y_ref.dtype,
        "l_aux_equal": bool(torch.equal(l_aux, l_ref)),
        "counts_equal": bool(torch.equal(counts, counts_ref)),
    }


class _AllocatedBytes(TorchDispatchMode):
    """Sums the bytes of the new storages that torch ops return on this thread (views and in-place
    results share an input's storage and are not counted): what a forward materialises, an upper
    bound of its peak that, unlike the peak, does not depend on when gloo's threads free buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        new = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
        }
        self.bytes += sum(new.values())
        return out


def _allocated_bytes(fn) -> int:
    with _AllocatedBytes() as counter:
        fn()
    return counter.bytes


def _contiguous_plan(num_experts: int, topology: Topology) -> LayerPlan:
    per_rank = num_experts // topology.world_size
    slots = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(topology.world_size)]
    return LayerPlan.from_lists(slots=slots, primary=[e // per_rank for e in range(num_experts)])


def _drop_in_rank(ctx: RankContext) -> dict:
    out: dict = {"parity": {}}
    topology = ctx.topology
    plan = random_layer_plan(np.random.default_rng(5), num_experts=8, topology=topology)
    tokens = [5, 17, 9, 30][ctx.rank]
    x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(ctx.rank))
    with torch.no_grad():
        # DeepSpeed's experts spread over the 4 ranks (moved to the plan's ranks by one all-to-all).
        # DeepSpeed's top-1 clips its capacity to the local token count, so with uneven counts its
        # all-to-all sizes disagree across ranks: top-1 gets equal counts (GRACE needs none).
        for k in (1, 2, 4):
            ds_moe = _deepspeed_moe(k=k, num_experts=8, ep_size=4, expert_seed=100 + ctx.rank)
            x_k = x if k > 1 else x[:, :5]
            reference = ds_moe(x_k)
            for hierarchical in (True, False):
                grace = GraceMoE.from_deepspeed(
                    ds_moe,
                    layer_plan=plan,
                    topology=topology,
                    options=RuntimeOptions(path="hierarchical" if hierarchical else "flat"),
                )
                out["parity"][f"ep4_k{k}_{'hier' if hierarchical else 'flat'}"] = _compare(
                    reference, grace(x_k)
                )
            # rank 1 brings no tokens through the gate; the others' outputs do not change (up to the
            # rounding of expert matmuls over other row counts)
            if k == 2:
                y_all = grace(x_k)[0]
                y_empty, _, counts_empty = grace(x_k[:, :0] if ctx.rank == 1 else x_k)
                out["zero_token_forward"] = {
                    "shape": list(y_empty.shape),
                    "diff_to_before": float((y_empty - y_all).abs().max()) if ctx.rank != 1 else 0.0,
                    "counts": counts_empty.tolist(),
                }
        # every rank holds all experts (ep_size 1): slots are copied locally
        ds_full = _deepspeed_moe(k=2, num_experts=8, ep_size=1, expert_seed=3)
        grace = GraceMoE.from_deepspeed(ds_full, layer_plan=plan, topology=topology)
        out["parity"]["ep1_k2_hier"] = _compare(ds_full(x), grace(x))
        ds_bf16 = _deepspeed_moe(k=2, num_experts=8, ep_size=4, expert_seed=100 + ctx.rank).to(torch.bfloat16)
        grace = GraceMoE.from_deepspeed(ds_bf16, layer_plan=plan, topology=topology)
        out["parity"]["ep4_k2_hier_bf16"] = _compare(ds_bf16(x.bfloat16()), grace(x.bfloat16()))

        # activation memory (bytes a forward allocates): GRACE's grows with the routed tokens,
        # DeepSpeed's with E x capacity
        num_experts = 32
        generator = torch.Generator().manual_seed(10 + ctx.rank)
        layer = GraceMoE.from_experts(
            [_expert() for _ in range(num_experts)],
            hidden_size=HIDDEN,
            k=2,
            layer_plan=_contiguous_plan(num_experts, topology),
            topology=topology,
        )
        allocated = {}
        # a first forward stacks the slots' weights once (ds_grace.moe.grouped): not a per-forward cost
        layer.forward_routed(torch.randn(8, HIDDEN), torch.zeros(8, 2, dtype=torch.long), torch.ones(8, 2))
        for tokens_per_rank in (512, 2048):
            x_TD = torch.randn(tokens_per_rank, HIDDEN, generator=generator)
            ids_TK = torch.rand(tokens_per_rank, num_experts, generator=generator).argsort(dim=1)[:, :2]
            weights_TK = torch.full((tokens_per_rank, 2), 0.5)
            allocated[f"grace_balanced_{tokens_per_rank}"] = _allocated_bytes(
                lambda x_TD=x_TD, ids_TK=ids_TK, weights_TK=weights_TK: layer.forward_routed(
                    x_TD, ids_TK, weights_TK
                )
            )
        x_skew = torch.rand(256, HIDDEN, generator=generator) + 0.1
        out["skew_counts"] = {}
        for num_experts in (32, 64):
            # gate weights send every token to experts 0 and 1
            skewed = _deepspeed_moe(k=2, num_experts=num_experts, ep_size=4, expert_seed=200 + ctx.rank)
            skewed.deepspeed_moe.gate.wg.weight.zero_()
            skewed.deepspeed_moe.gate.wg.weight[0] = 1.0
            skewed.deepspeed_moe.gate.wg.weight[1] = 0.5
            grace_skewed = GraceMoE.from_deepspeed(
                skewed, layer_plan=_contiguous_plan(num_experts, topology), topology=topology
            )
            allocated[f"deepspeed_skewed_E{num_experts}"] = _allocated_bytes(
                lambda skewed=skewed: skewed(x_skew)
            )
            grace_skewed(x_skew)  # stacks the slots' weights once
            allocated[f"grace_skewed_E{num_experts}"] = _allocated_bytes(lambda g=grace_skewed: g(x_skew))
            allocated[f"grace_gate_E{num_experts}"] = _allocated_bytes(
                lambda g=grace_skewed: g.deepspeed_moe.gate(x_skew)
            )
            out["skew_counts"][num_experts] = grace_skewed(x_skew)[2].tolist()
        out["allocated"] = allocated

        # collective timeout: rank 3 never joins; the others must fail fast, not hang
        late = GraceMoE.from_experts(
            [_expert() for _ in range(8)],
            hidden_size=HIDDEN,
            k=2,
            layer_plan=plan,
            topology=topology,
            options=RuntimeOptions(timeout_s=TIMEOUT_S),
        )
        late.set_deepspeed_parallelism()
        start = time.monotonic()
        error = None
        if ctx.rank == 3:
            time.sleep(3 * TIMEOUT_S)
        else:
            try:
                late(torch.randn(4, HIDDEN))
            except RuntimeError as exc:
                error = str(exc)
        out["timeout"] = {"error": error, "elapsed_s": time.monotonic() - start}
    return out


def test_deepspeed_drop_in_parity_memory_and_timeout():
    results = run_on_ranks(_drop_in_rank, topology=Topology(2, 2), timeout_s=400, collective_timeout_s=120)
    for rank, result in enumerate(results):
        for name, cmp in result["parity"].items():
            tolerance = 2**-6 if name.endswith("bf16") else 1e-5
            assert cmp["same_shape"] and cmp["l_aux_equal"] and cmp["counts_equal"], (rank, name, cmp)
            assert cmp["diff"] <= tolerance * cmp["scale"], (rank, name, cmp)

    for rank, result in enumerate(results):
        zero = result["zero_token_forward"]
        assert zero["shape"] == ([1, 0, HIDDEN] if rank == 1 else [1, [5, 17, 9, 30][rank], HIDDEN]), zero
        assert zero["diff_to_before"] <= 1e-5, zero
        assert (sum(zero["counts"]) == 0) == (rank == 1), zero

    allocated = [r["allocated"] for r in results]
    print("bytes allocated per forward, by rank:", allocated)
    for rank, p in enumerate(allocated):
        # 4x the routed tokens -> 4x the bytes (up to the routing's spread over ranks and fixed costs):
        # a buffer of fixed size, or one that grows faster than the routed rows, leaves this band
        assert 3.8 <= p["grace_balanced_2048"] / p["grace_balanced_512"] <= 4.2, (rank, p)
    for num_experts in (32, 64):
        assert all(r["skew_counts"][num_experts][:2] == [256, 256] for r in results)
        assert all(sum(r["skew_counts"][num_experts]) == 512 for r in results)
    worst_grace = {e: max(p[f"grace_skewed_E{e}"] for p in allocated) for e in (32, 64)}
    least_deepspeed = {e: min(p[f"deepspeed_skewed_E{e}"] for p in allocated) for e in (32, 64)}
    # same routed tokens, twice the experts: on every rank (the one holding the two hot experts
    # included), what GRACE allocates beyond its gate (whose logits are T x E) grows by E-sized
    # bookkeeping only (under 4 KiB here: the header's routes per slot of every peer, sent and received,
    # and the slot lookup; one more E x D fp32 buffer would be 8 KiB), and its whole layer by the gate's
    # growth; DeepSpeed's doubles
    for rank, p in enumerate(allocated):
        beyond_gate = {e: p[f"grace_skewed_E{e}"] - p[f"grace_gate_E{e}"] for e in (32, 64)}
        assert 0 <= beyond_gate[64] - beyond_gate[32] <= 4096, (rank, beyond_gate, p)
    assert 1.0 <= worst_grace[64] / worst_grace[32] <= 1.25, allocated
    assert least_deepspeed[64] / least_deepspeed[32] >= 1.6, allocated
    # DeepSpeed's dispatch buffer alone is E x capacity x D fp32 (capacity: the 256 tokens of expert 0)
    assert least_deepspeed[64] >= 64 * 256 * HIDDEN * 4
    assert worst_grace[64] * 3 <= least_deepspeed[64], allocated

    assert results[3]["timeout"]["error"] is None
    for rank in range(3):
        timeout = results[rank]["timeout"]
        assert timeout["error"] is not None and "Timed out" in timeout["error"], timeout
        assert TIMEOUT_S * 0.5 <= timeout["elapsed_s"] <= TIMEOUT_S + 15, timeout
