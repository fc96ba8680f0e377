"""Every path on 4 spawned gloo ranks (2 nodes x 2): flat, hierarchical, auto (forced both ways, turned by
one rank's residual or exploration request), low-latency (static buffers), flat without dedup; at any
skew (all tokens to one expert), with a rank holding no token and with uneven tokens per rank.

Every output is compared with a single-process reference; every route is computed once; every rank
takes the same path. Per layer forward the host reads (uploads included) and collectives are counted
(benchmarks/counting.py) and held to the budgets: low-latency 0 host reads, the normal paths exactly
one (the header round's), 3 / 5 / 2 collectives; on the counting benchmark's workload
(benchmarks/count_hot_path.py, decode and prefill) also at most half the non-view aten ops (the
experts' own excluded) of the implementation this one replaced, measured there: flat 132,
hierarchical 167, low-latency 138.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.count_hot_path import _count_rank as count_hot_path_rank
from benchmarks.counting import count_hot_path
from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.comm.path_model import CALIBRATION_INTER_BYTES, PathModel, PathPolicy, calibrate
from ds_grace.commands.selfcheck import SCENARIOS, make_case, make_experts, make_tokens
from ds_grace.config import GraceConfig
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.online.replay import reference_output
from ds_grace.topology import Topology

pytestmark = pytest.mark.multirank

TOPOLOGY = Topology(2, 2)
# forced decisions: a (negative) credit per intra-node round -> hierarchical; costly intra-node rounds -> flat
PREFER_HIER = PathModel(alpha_ep_s=0.0, alpha_intra_s=-1.0, inter_s_per_byte=0.0, intra_s_per_byte=0.0)
PREFER_FLAT = PathModel(alpha_ep_s=0.0, alpha_intra_s=1e6, inter_s_per_byte=0.0, intra_s_per_byte=0.0)
TIE = PathModel(alpha_ep_s=0.0, alpha_intra_s=0.0, inter_s_per_byte=0.0, intra_s_per_byte=0.0)
BEFORE_ATEN_OPS = {"flat": 132, "hierarchical": 167, "low-latency": 138}
COLLECTIVES = {"flat": 3, "hierarchical": 5, "low-latency": 2}
HOST_READS = {"flat": 1, "hierarchical": 1, "low-latency": 0}  # the header round's one read
LOW_LATENCY_BOUND = 160


def _tokens(case, seed, rank, scenario):
    x_TD, ids_TK, w_TK = make_tokens(case, seed, rank)
    if scenario == "all_to_one_expert":  # every route of every token to one expert (k = 1)
        ids_TK, w_TK = ids_TK[:, :1].clone().fill_(case.hot_expert), torch.ones(ids_TK.shape[0], 1)
    return x_TD.float(), ids_TK, w_TK


def _runs(ctx: RankContext) -> dict[str, tuple[RuntimeOptions, PathModel | None, tuple[int, int], bool]]:
    """name -> (options, forced model, rank 0's residual microseconds, rank 0 asks to explore)."""
    ll = RuntimeOptions(path="hierarchical", low_latency_max_tokens=LOW_LATENCY_BOUND)
    mine = ctx.rank == 0
    return {
        "flat": (RuntimeOptions(path="flat"), None, (0, 0), False),
        "hierarchical": (RuntimeOptions(path="hierarchical"), None, (0, 0), False),
        "flat_no_dedup": (RuntimeOptions(path="flat", dedup=False), None, (0, 0), False),
        "low-latency": (ll, None, (0, 0), False),
        "auto_forced_hier": (RuntimeOptions(path="auto"), PREFER_HIER, (0, 0), False),
        "auto_forced_flat": (RuntimeOptions(path="auto"), PREFER_FLAT, (0, 0), False),
        # only rank 0 reports a residual; the mean over 4 ranks turns every rank (-1 s, +3 s)
        "residual_turns_hier": (RuntimeOptions(path="auto"), TIE, (0, -4_000_000) if mine else (0, 0), False),
        "residual_turns_flat": (RuntimeOptions(path="auto"), PREFER_HIER, (0, 12_000_000) if mine else (0, 0), False),
        # corrected (1.0 s, 0.9 s): hierarchical preferred; rank 0 asks to explore: every rank goes flat
        "explore_turns_flat": (RuntimeOptions(path="auto"), TIE, (4_000_000, 3_600_000) if mine else (0, 0), mine),
    }  # fmt: skip


def _layer(case, experts, ctx, options, model, residual_us, explore, warm_up) -> GraceMoE:
    """A layer warmed up (its device tables built: by one forward of each path an auto layer can take),
    then given the forced policy."""
    layer = GraceMoE.from_experts(
        experts, hidden_size=case.hidden, k=case.k, layer_plan=case.plan, topology=ctx.topology,
        ep_index=ctx.rank, options=options,
    )  # fmt: skip
    for warm_model in (PREFER_FLAT, PREFER_HIER) if options.path == "auto" else (model or TIE,):
        layer.deepspeed_moe.path_policy = PathPolicy(
            options.path, topology=ctx.topology, model=lambda m=warm_model: m
        )
        layer.forward_routed(*warm_up)
    layer.deepspeed_moe.path_policy = PathPolicy(options.path, topology=ctx.topology, model=lambda: TIE)
    if model is not None:
        policy = PathPolicy("auto", topology=ctx.topology, model=lambda: model)
        policy.feedback.residual_s = [residual_us[0] * 1e-6, residual_us[1] * 1e-6]
        if explore:
            policy.feedback.since_request = policy.feedback.explore_interval - 1
        layer.deepspeed_moe.path_policy = policy
    return layer


def _forward(layer, inputs, name, bound):
    experts = list(layer.deepspeed_moe.experts.deepspeed_experts)
    before = sum(layer.comm_counters.expert_rows)
    kwargs = {"low_latency_tokens": bound} if name == "low-latency" else {}
    with count_hot_path(experts) as counts:
        y_TD = layer.forward_routed(*inputs, **kwargs)
    computed = sum(layer.comm_counters.expert_rows) - before
    return y_TD, counts, computed


def _paths_rank(ctx: RankContext) -> list[dict]:
    out = []
    seed = 3
    with torch.no_grad():
        for index in range(len(SCENARIOS)):
            case = make_case(seed, index, ctx.topology, ("fp32",))
            scenario = "all_to_one_expert" if case.scenario == "one_expert" else case.scenario
            experts = [e.float() for e in make_experts(case, seed)]
            x_TD, ids_TK, w_TK = _tokens(case, seed, ctx.rank, scenario)
            copies = ctx.rank + 1  # uneven: rank r holds r + 1 copies of its tokens
            big = tuple(torch.cat([t] * copies) for t in (x_TD, ids_TK, w_TK))
            reference = reference_output(experts, x_TD, ids_TK, w_TK).float()
            reference_big = reference_output(experts, *big).float()
            result = {"scenario": scenario, "tokens": int(x_TD.shape[0]), "runs": {}}
            for name, (options, model, residual, explore) in _runs(ctx).items():
                for size, inputs, ref in (
                    ("even", (x_TD, ids_TK, w_TK), reference),
                    ("big", big, reference_big),
                ):
                    layer = _layer(case, experts, ctx, options, model, residual, explore, inputs)
                    bound = 4 * max(case.tokens_per_rank)  # every rank's token count in either size
                    y_TD, counts, computed = _forward(layer, inputs, name, bound)
                    result["runs"][f"{name}/{size}"] = {
                        "diff": float((y_TD - ref).abs().max()) if y_TD.numel() else 0.0,
                        "scale": max(1.0, float(ref.abs().max())) if ref.numel() else 1.0,
                        "routes": int((inputs[1] >= 0).sum()), "computed": computed,
                        "path": layer.deepspeed_moe.last_path, "explored": layer.deepspeed_moe.path_policy.last_explored,
                        **counts.as_dict(),
                    }  # fmt: skip
            out.append(result)
    out.append({"served": _served_as_configured(ctx, seed)})
    out.append({"counts": count_hot_path_rank(ctx)})
    model = calibrate(layer.deepspeed_moe.groups(), repeats=2)
    out.append({"model": list(model.as_tensor().tolist())})
    return out


def _served_as_configured(ctx: RankContext, seed: int) -> list[dict]:
    """The default grace block: auto path, calibrated at start-up; decode steps promised to the
    low-latency path with the primary copies (grace.routing.low_latency_policy)."""
    case = make_case(seed, 2, ctx.topology, ("fp32",))
    experts = [e.float() for e in make_experts(case, seed)]
    layer = GraceMoE.from_experts(
        experts, hidden_size=case.hidden, k=case.k, layer_plan=case.plan, topology=ctx.topology, ep_index=ctx.rank,
        options=RuntimeOptions.from_config(GraceConfig()),
    )  # fmt: skip
    x_TD, ids_TK, w_TK = _tokens(case, seed, ctx.rank, "random")
    x_TD, ids_TK, w_TK = x_TD[:4], ids_TK[:4], w_TK[:4]
    reference = reference_output(experts, x_TD, ids_TK, w_TK).float()
    replica_slots = [s for s, e in enumerate(case.plan.slots[ctx.rank]) if case.plan.primary[e] != ctx.rank]
    served = []
    with torch.no_grad():
        for step in range(3):
            layer.set_low_latency_tokens(4 if step else None)
            before = list(layer.comm_counters.expert_rows)
            y_TD = layer.forward_routed(x_TD, ids_TK, w_TK)
            after = list(layer.comm_counters.expert_rows) + [0] * len(before)
            rows = [
                after[s] - (before[s] if s < len(before) else 0)
                for s in range(len(case.plan.slots[ctx.rank]))
            ]
            served.append({"path": layer.deepspeed_moe.last_path, "replica_rows": sum(rows[s] for s in replica_slots),
                           "diff": float((y_TD - reference).abs().max()) if y_TD.numel() else 0.0})  # fmt: skip
    return served


def _both_rank(ctx: RankContext) -> tuple[list[dict], list[float]]:
    """Both tests' forwards in one spawn of the 4 ranks (their start-up is most of the cost)."""
    return _paths_rank(ctx), _transport_rank(ctx)


@pytest.fixture(scope="module")
def per_rank() -> list[tuple[list[dict], list[float]]]:
    return run_on_ranks(_both_rank, topology=TOPOLOGY, timeout_s=600, collective_timeout_s=120)


def test_every_path_is_lossless_agrees_on_every_rank_and_keeps_its_budgets(per_rank):
    results = [paths for paths, _ in per_rank]
    *cases, _, _, _ = results[0]
    # the counting benchmark's workload (benchmarks/count_hot_path.py), the one the budgets were set on,
    # on every rank, with the instance choice a lookup (TAR on its plan) and sampled (WRR)
    rows = [(name, phase, row) for *_, counts, _ in results for name, phases in counts["counts"].items()
            for phase, row in phases.items()]  # fmt: skip
    assert {name for name, _, _ in rows} == {p + s for p in COLLECTIVES for s in ("", "/sampled")}
    for name, phase, row in rows:
        path = name.split("/")[0]
        assert row["path_taken"] == path and row["collectives"] == COLLECTIVES[path], (name, phase, row)
        assert row["host_reads"] == HOST_READS[path], (name, phase, row)
        assert row["aten_ops"] <= BEFORE_ATEN_OPS[path] // 2, (name, phase, row["aten_ops_by_name"])
    # the lookup takes fewer ops than the sequence on every path and phase
    by_name = {(name, phase): row["aten_ops"] for name, phase, row in rows}
    assert all(
        by_name[(p, ph)] < by_name[(p + "/sampled", ph)] for p in COLLECTIVES for ph in ("decode", "prefill")
    )
    for index, case in enumerate(cases):
        per_rank = [rank_results[index] for rank_results in results]
        for name in case["runs"]:
            runs = [r["runs"][name] for r in per_rank]
            for rank, run in enumerate(runs):
                assert run["diff"] <= 1e-5 * run["scale"], (case["scenario"], name, rank, run)
            # no route dropped or computed twice, over all ranks
            assert sum(r["computed"] for r in runs) == sum(r["routes"] for r in runs), (
                case["scenario"],
                name,
            )
            assert len({(r["path"], r["collectives"]) for r in runs}) == 1, (name, runs)
            path = runs[0]["path"]
            assert runs[0]["collectives"] == COLLECTIVES[path], (name, runs[0])
            for run in runs:  # the auto path's feedback columns and the experts' group ends: no upload
                assert run["host_reads"] == HOST_READS[path], (name, run["host_reads_by_kind"])
        run = {name: r for name, r in case["runs"].items()}
        assert run["flat/even"]["path"] == "flat" and run["hierarchical/big"]["path"] == "hierarchical"
        assert run["low-latency/big"]["path"] == "low-latency" and run["low-latency/big"]["host_reads"] == 0
        assert run["auto_forced_hier/even"]["path"] == "hierarchical"
        assert run["auto_forced_flat/even"]["path"] == "flat"
        assert run["residual_turns_hier/even"]["path"] == "hierarchical"
        assert run["residual_turns_flat/even"]["path"] == "flat"
        assert run["explore_turns_flat/even"]["path"] == "flat"  # one rank's request turns all
        assert all(r["runs"]["explore_turns_flat/even"]["explored"] for r in per_rank)
    assert {c["scenario"] for c in cases} == {
        "random",
        "zero_token_rank",
        "all_to_one_expert",
        "masked_routes",
    }
    assert any(r[i]["tokens"] == 0 for r in results for i in range(len(cases)))  # a rank with no token

    for rank, forwards in enumerate(rank_results[-3]["served"] for rank_results in results):
        assert all(f["diff"] <= 1e-5 for f in forwards), (rank, forwards)
        assert forwards[0]["path"] in ("flat", "hierarchical")
        assert [f["path"] for f in forwards[1:]] == ["low-latency"] * 2
        # low-latency forwards: every route to its expert's primary copy (grace.routing.low_latency_policy)
        assert [f["replica_rows"] for f in forwards[1:]] == [0, 0], (rank, forwards)
    models = {tuple(rank_results[-1]["model"]) for rank_results in results}
    assert len(models) == 1  # the calibrated parameters are identical on every rank
    alpha_ep, alpha_intra, inter, intra, burst = models.pop()
    assert alpha_ep > 0 and alpha_intra > 0 and inter >= 0 and intra >= 0
    # the burst fitted on an unshaped local link lies within [0, the smaller transfer's link bytes]
    assert 0.0 <= burst <= 2 * 2 * CALIBRATION_INTER_BYTES[0]
    assert np.isfinite([alpha_ep, alpha_intra, inter, intra, burst]).all()


def _transport_rank(ctx: RankContext) -> list[float]:
    """The same forwards carried by DeepSpeed's padded all-to-all (the transport seam)."""
    from ds_grace.comm.transport import DeepSpeedTransport

    seed = 3
    case = make_case(seed, 0, ctx.topology, ("fp32",))
    experts = [e.float() for e in make_experts(case, seed)]
    x_TD, ids_TK, w_TK = _tokens(case, seed, ctx.rank, "random")
    reference = reference_output(experts, x_TD, ids_TK, w_TK).float()
    bound = max(case.tokens_per_rank)
    diffs = []
    with torch.no_grad():
        for path in ("flat", "hierarchical"):
            options = RuntimeOptions(path=path, low_latency_max_tokens=bound)
            layer = GraceMoE.from_experts(
                experts, hidden_size=case.hidden, k=case.k, layer_plan=case.plan, topology=ctx.topology,
                ep_index=ctx.rank, options=options,
            )  # fmt: skip
            # padded to every rank's token count times the top-k: no peer's rows exceed it
            layer.deepspeed_moe.set_transport(DeepSpeedTransport(capacity=bound * case.k * ctx.world_size))
            for kwargs in ({}, {"low_latency_tokens": bound}):
                y_TD = layer.forward_routed(x_TD, ids_TK, w_TK, **kwargs)
                diffs.append(float((y_TD - reference).abs().max()) if y_TD.numel() else 0.0)
    return diffs


def test_deepspeed_padded_all_to_all_carries_every_path(per_rank):
    results = [transport for _, transport in per_rank]
    for rank, diffs in enumerate(results):
        assert len(diffs) == 4 and max(diffs) <= 1e-4, (rank, diffs)
