"""The dispatch paths on 4 spawned gloo ranks (2 nodes x 2): low-latency buffers (every rank fits,
some ranks overflow, a rank with no token), the per-forward flat/hierarchical choice forced both
ways and calibrated at start-up, at any skew (all tokens to one expert) with uneven tokens per rank.

Every output is compared with a single-process reference; every route must be computed once;
every rank must take the same path; the collectives per forward are counted (low-latency: two,
flat: three, hierarchical: five).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ds_grace.comm.all_to_all import combine, dispatch
from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.comm.path_model import CALIBRATION_INTER_BYTES, PathModel, calibrate
from ds_grace.commands.selfcheck import SCENARIOS, make_case, make_experts, make_tokens
from ds_grace.config import GraceConfig
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.online.replay import reference_output
from ds_grace.routing import choose_instances
from ds_grace.topology import Topology

pytestmark = pytest.mark.multirank

TOPOLOGY = Topology(2, 2)
# forced decisions: a (negative) credit per intra-node round -> hierarchical; costly intra-node rounds -> flat
PREFER_HIER = PathModel(alpha_ep_s=0.0, alpha_intra_s=-1.0, inter_s_per_byte=0.0, intra_s_per_byte=0.0)
PREFER_FLAT = PathModel(alpha_ep_s=0.0, alpha_intra_s=1e6, inter_s_per_byte=0.0, intra_s_per_byte=0.0)
TIE = PathModel(alpha_ep_s=0.0, alpha_intra_s=0.0, inter_s_per_byte=0.0, intra_s_per_byte=0.0)


class _CountingAllToAll:
    """Counts torch.distributed.all_to_all_single calls (the payload and header rounds)."""

    def __init__(self) -> None:
        self.calls = 0
        self._original = dist.all_to_all_single

    def __enter__(self) -> _CountingAllToAll:
        def counted(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *_: object) -> None:
        dist.all_to_all_single = self._original


def _routed(
    layer: GraceMoE,
    x_TD,
    ids_TK,
    w_TK,
    *,
    path_model,
    low_latency_rows,
    hierarchical=True,
    local=False,
    path_residual_us=(0, 0),
    explore_path=False,
):
    """One forward through dispatch/combine with explicit path options (what forward_routed does)."""
    moe = layer.deepspeed_moe
    rank_TK, slot_TK = choose_instances(moe.route_table(x_TD.device), ids_TK, origin_rank=moe.ep_index)
    groups = moe.groups()
    with _CountingAllToAll() as counter:
        x_QD, meta = dispatch(
            x_TD, rank_TK, slot_TK, w_TK, groups=groups, slot_stride=moe._slot_stride,
            num_local_slots=moe.num_local_experts, hierarchical=hierarchical, counters=moe.comm_counters,
            path_model=path_model, low_latency_rows=low_latency_rows, local_experts=moe.experts if local else None,
            path_residual_us=path_residual_us, explore_path=explore_path,
        )  # fmt: skip
        y_TD = combine(moe.experts(x_QD, meta.slot_splits), meta, groups=groups, counters=moe.comm_counters)
    local_routes = 0 if meta.local is None else int(meta.local.route_row_Q.shape[0])
    return y_TD, meta, counter.calls, sum(meta.slot_splits) + local_routes, local_routes


def _tokens(case, seed, rank, scenario):
    x_TD, ids_TK, w_TK = make_tokens(case, seed, rank)
    if scenario == "all_to_one_expert":  # every route of every token to one expert (k = 1)
        ids_TK, w_TK = ids_TK[:, :1].clone().fill_(case.hot_expert), torch.ones(ids_TK.shape[0], 1)
    return x_TD.float(), ids_TK, w_TK


def _paths_rank(ctx: RankContext) -> list[dict]:
    with torch.no_grad():
        return _paths_cases(ctx)


def _paths_cases(ctx: RankContext) -> list[dict]:
    out = []
    seed = 3
    for index in range(len(SCENARIOS)):
        case = make_case(seed, index, ctx.topology, ("fp32",))
        scenario = "all_to_one_expert" if case.scenario == "one_expert" else case.scenario
        experts = [e.float() for e in make_experts(case, seed)]
        layer = GraceMoE.from_experts(
            experts, hidden_size=case.hidden, k=case.k, layer_plan=case.plan, topology=ctx.topology,
            ep_index=ctx.rank,
        )  # fmt: skip
        x_TD, ids_TK, w_TK = _tokens(case, seed, ctx.rank, scenario)
        # uneven tokens: rank r holds r + 1 copies of its tokens in the overflow run
        big = (
            torch.cat([x_TD] * (ctx.rank + 1)),
            torch.cat([ids_TK] * (ctx.rank + 1)),
            torch.cat([w_TK] * (ctx.rank + 1)),
        )
        counts = [int(x_TD.shape[0])]
        max_tokens = max(case.tokens_per_rank)
        reference = reference_output(experts, x_TD, ids_TK, w_TK).float()
        reference_big = reference_output(experts, *big).float()
        runs = {
            "count_exchange_flat": ((x_TD, ids_TK, w_TK), None, None, False),
            "count_exchange_hier": ((x_TD, ids_TK, w_TK), None, None, True),
            "ll_every_rank_fits": ((x_TD, ids_TK, w_TK), None, max_tokens, True),
            "ll_some_ranks_overflow": (big, None, max_tokens, True),
            "ll_zero_rows_buffer": ((x_TD, ids_TK, w_TK), None, 0, True),
            "forced_hier": ((x_TD, ids_TK, w_TK), PREFER_HIER, None, True),
            "forced_flat": ((x_TD, ids_TK, w_TK), PREFER_FLAT, None, True),
            "ll_overflow_forced_hier": (big, PREFER_HIER, max_tokens, True),
            # own routes computed while the first payload round is in flight
            "local_first_flat": ((x_TD, ids_TK, w_TK), None, None, False),
            "local_first_hier": ((x_TD, ids_TK, w_TK), None, None, True),
            "local_first_ll_overflow": (big, PREFER_HIER, max_tokens, True),
            "local_first_ll_fits": ((x_TD, ids_TK, w_TK), None, max_tokens, True),
            # measured residuals in the header: only rank 0 reports one, every rank follows the mean
            "residual_turns_hier": ((x_TD, ids_TK, w_TK), TIE, None, True),
            "residual_turns_flat": ((x_TD, ids_TK, w_TK), PREFER_HIER, None, True),
            # corrected (1.0 s, 0.9 s): hierarchical preferred; rank 0 asks to explore: every rank goes flat
            "explore_turns_flat": ((x_TD, ids_TK, w_TK), TIE, None, True),
            "no_explore_stays_hier": ((x_TD, ids_TK, w_TK), TIE, None, True),
        }
        residuals = {  # rank 0's (flat, hierarchical) microseconds; mean over 4 ranks: -1 s and +3 s
            "residual_turns_hier": (0, -4_000_000) if ctx.rank == 0 else (0, 0),
            "residual_turns_flat": (0, 12_000_000) if ctx.rank == 0 else (0, 0),
            "explore_turns_flat": (4_000_000, 3_600_000) if ctx.rank == 0 else (0, 0),
            "no_explore_stays_hier": (4_000_000, 3_600_000) if ctx.rank == 0 else (0, 0),
        }
        result = {"scenario": scenario, "tokens": counts, "runs": {}}
        for name, (inputs, model, ll, hierarchical) in runs.items():
            y_TD, meta, calls, computed, local_routes = _routed(
                layer, *inputs, path_model=model, low_latency_rows=ll, hierarchical=hierarchical,
                local=name.startswith("local_first"), path_residual_us=residuals.get(name, (0, 0)),
                explore_path=name == "explore_turns_flat" and ctx.rank == 0,
            )  # fmt: skip
            ref = reference_big if inputs is big else reference
            result["runs"][name] = {
                "diff": float((y_TD - ref).abs().max()) if y_TD.numel() else 0.0,
                "scale": max(1.0, float(ref.abs().max())) if ref.numel() else 1.0,
                "routes": int((inputs[1] >= 0).sum()), "computed": computed, "calls": calls,
                "hierarchical_used": meta.hierarchical_used, "max_tokens": meta.max_tokens,
                "local_routes": local_routes, "explored": meta.path_explored,
            }  # fmt: skip
        out.append(result)

    # the layer as the default grace block serves it: calibrated at start-up, low-latency from the
    # second forward on (the first learns every rank's token count)
    case = make_case(seed, 2, ctx.topology, ("fp32",))
    experts = [e.float() for e in make_experts(case, seed)]
    layer = GraceMoE.from_experts(
        experts, hidden_size=case.hidden, k=case.k, layer_plan=case.plan, topology=ctx.topology, ep_index=ctx.rank,
        options=RuntimeOptions.from_config(GraceConfig()),
    )  # fmt: skip
    x_TD, ids_TK, w_TK = _tokens(case, seed, ctx.rank, "random")
    reference = reference_output(experts, x_TD, ids_TK, w_TK).float()
    served = []
    counters = layer.deepspeed_moe.comm_counters
    # rows computed on copies that are not their expert's primary (low-latency forwards use primaries)
    replica_slots = [s for s, e in enumerate(case.plan.slots[ctx.rank]) if case.plan.primary[e] != ctx.rank]
    for _ in range(3):
        before = list(counters.expert_rows)
        with _CountingAllToAll() as counter:
            y_TD = layer.forward_routed(x_TD, ids_TK, w_TK)
        after = counters.expert_rows + [0] * (len(before) - len(counters.expert_rows))
        rows = [a - (before[s] if s < len(before) else 0) for s, a in enumerate(after)]
        served.append({"path": layer.deepspeed_moe.last_path, "calls": counter.calls,
                       "diff": float((y_TD - reference).abs().max()) if y_TD.numel() else 0.0,
                       "replica_rows": sum(rows[s] for s in replica_slots if s < len(rows))})  # fmt: skip
    model = calibrate(layer.deepspeed_moe.groups(), repeats=2)
    out.append({"served": served, "model": list(model.as_tensor().tolist())})
    return out


def test_every_path_is_lossless_and_takes_the_same_rounds_on_every_rank():
    results = run_on_ranks(_paths_rank, topology=TOPOLOGY, timeout_s=300, collective_timeout_s=60)
    *cases, _ = results[0]
    for index, case in enumerate(cases):
        per_rank = [rank_results[index] for rank_results in results]
        for name in case["runs"]:
            runs = [r["runs"][name] for r in per_rank]
            for rank, run in enumerate(runs):
                assert run["diff"] <= 1e-5 * run["scale"], (case["scenario"], name, rank, run)
                assert run["computed"] >= 0
            # no route dropped or computed twice, over all ranks
            assert sum(r["computed"] for r in runs) == sum(r["routes"] for r in runs), (
                case["scenario"],
                name,
            )
            # the same path and the same number of collectives on every rank
            assert len({(r["hierarchical_used"], r["calls"], r["max_tokens"]) for r in runs}) == 1, (
                name,
                runs,
            )
        run = case["runs"]
        assert run["count_exchange_flat"]["calls"] == 3 and run["count_exchange_hier"]["calls"] == 5
        assert run["count_exchange_flat"]["hierarchical_used"] is False
        assert run["ll_every_rank_fits"]["calls"] == 2  # no count exchange: buffer round + combine
        assert run["ll_every_rank_fits"]["hierarchical_used"] is None
        assert run["ll_every_rank_fits"]["max_tokens"] == max(r["tokens"][0] for r in per_rank)
        # ranks 1..3 hold 2..4x the tokens: they overflow (normal hierarchical rounds), rank 0 may fit
        assert run["ll_some_ranks_overflow"]["hierarchical_used"] is True
        assert run["ll_some_ranks_overflow"]["calls"] in (5, 6)  # + the low-latency combine if any rank fit
        assert run["ll_zero_rows_buffer"]["calls"] in (1, 5)  # header only when no rank holds a token
        assert run["forced_hier"]["hierarchical_used"] is True and run["forced_hier"]["calls"] == 5
        assert run["forced_flat"]["hierarchical_used"] is False and run["forced_flat"]["calls"] == 3
        assert run["ll_overflow_forced_hier"]["hierarchical_used"] is True
        assert run["residual_turns_hier"]["hierarchical_used"] is True  # tie + mean residual -1 s
        assert run["residual_turns_flat"]["hierarchical_used"] is False  # -2 s + mean residual +3 s
        assert run["no_explore_stays_hier"]["hierarchical_used"] is True
        assert run["explore_turns_flat"]["hierarchical_used"] is False  # one rank's request turns all
        assert run["explore_turns_flat"]["explored"] and not run["no_explore_stays_hier"]["explored"]
        assert run["local_first_flat"]["calls"] == 3 and run["local_first_hier"]["calls"] == 5
        assert run["local_first_ll_overflow"]["hierarchical_used"] is True
        assert (
            run["local_first_ll_fits"]["calls"] == 2
            and run["local_first_ll_fits"]["hierarchical_used"] is None
        )
        assert all(r["runs"]["count_exchange_hier"]["local_routes"] == 0 for r in per_rank)
        if case["scenario"] != "all_to_one_expert":  # a rank's own routes to itself skipped the collectives
            assert any(r["runs"]["local_first_hier"]["local_routes"] > 0 for r in per_rank)
    assert {c["scenario"] for c in cases} == {
        "random",
        "zero_token_rank",
        "all_to_one_expert",
        "masked_routes",
    }
    assert any(0 in [r[i]["tokens"][0] for r in results] for i in range(len(cases)))  # a rank with no token

    served = [rank_results[-1]["served"] for rank_results in results]
    for rank, forwards in enumerate(served):
        assert all(f["diff"] <= 1e-5 for f in forwards), (rank, forwards)
        assert forwards[0]["path"] in ("flat", "hierarchical")  # first forward: count exchange
        assert [f["path"] for f in forwards[1:]] == ["low-latency"] * 2 and forwards[1]["calls"] == 2
        # low-latency forwards: every route to its expert's primary copy (grace.routing.low_latency_policy)
        assert [f["replica_rows"] for f in forwards[1:]] == [0, 0], (rank, forwards)
    assert sum(forwards[0]["replica_rows"] for forwards in served) > 0  # TAR used replicas on the first
    assert len({tuple((f["path"], f["calls"]) for f in forwards) for forwards in served}) == 1
    models = {tuple(rank_results[-1]["model"]) for rank_results in results}
    assert len(models) == 1  # the calibrated parameters are identical on every rank
    alpha_ep, alpha_intra, inter, intra, burst = models.pop()
    assert alpha_ep > 0 and alpha_intra > 0 and inter >= 0 and intra >= 0
    # the burst fitted on an unshaped local link lies within [0, the smaller transfer's link bytes]
    assert 0.0 <= burst <= 2 * 2 * CALIBRATION_INTER_BYTES[0]
