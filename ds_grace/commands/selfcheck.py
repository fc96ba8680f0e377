"""`ds-grace selfcheck`: lossless-parity check of the GRACE runtime on local gloo ranks.

Shape legend: T tokens, D hidden, K top-k, E experts.

Every case draws (from the seed alone, so every rank agrees) a random plan with replicas and
unequal slot counts, random experts, uneven token counts per rank and a routing: random, a rank
with zero tokens, all tokens to one expert, or some routes masked out (-1). Each case runs in
three modes (hierarchical, flat, flat without dedup) and compares every rank's output with a
single-process reference sum_k w_k * expert_k(x); the experts' computed-route counters must add
up to the routes taken, so no route is dropped or computed twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ds_grace.comm.all_to_all import dispatch_row_bytes, header_row_bytes
from ds_grace.comm.collectives import sum_over_ranks
from ds_grace.comm.counters import StageTraffic
from ds_grace.comm.local_ranks import RankContext, RankFailure, run_on_ranks
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.online.replay import reference_output
from ds_grace.planning.plan import LayerPlan
from ds_grace.routing import RouteTable, choose_instances
from ds_grace.topology import Topology

MODES: dict[str, tuple[bool, bool]] = {
    "hierarchical": (True, True),
    "flat": (False, True),
    "flat_nodedup": (False, False),
}
SCENARIOS = ("random", "zero_token_rank", "one_expert", "masked_routes")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# max |y - reference| allowed, as a fraction of max(1, max |reference|): fp32 differs only in summation
# order; bf16 partial sums are rounded to bf16 at each hop (per rank, per node) on the way back.
RELATIVE_TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2}


@dataclass(frozen=True)
class CaseSpec:
    index: int
    num_experts: int
    k: int
    hidden: int
    dtype: str
    scenario: str
    policy: str
    tokens_per_rank: tuple[int, ...]
    hot_expert: int
    plan: LayerPlan


def random_layer_plan(rng: np.random.Generator, *, num_experts: int, topology: Topology) -> LayerPlan:
    """Random primaries (unequal, possibly empty ranks), 1..E/2 replicas, random WRR weights."""
    num_ranks = topology.world_size
    order = rng.permutation(num_experts)
    cuts = np.sort(rng.integers(0, num_experts + 1, size=num_ranks - 1))
    chunks = np.split(order, cuts)
    slots = [[int(e) for e in chunk] for chunk in chunks]
    primary = [0] * num_experts
    for rank, experts in enumerate(slots):
        for e in experts:
            primary[e] = rank
    if num_ranks > 1:
        for e in rng.choice(num_experts, size=int(rng.integers(1, num_experts // 2 + 1)), replace=False):
            hosts = [r for r in range(num_ranks) if int(e) not in slots[r]]
            slots[int(rng.choice(hosts))].append(int(e))
    weights = [[float(w) for w in rng.uniform(0.5, 2.0, size=len(s))] for s in slots]
    return LayerPlan.from_lists(slots=slots, primary=primary, slot_weights=weights)


def make_case(seed: int, index: int, topology: Topology, dtypes: tuple[str, ...]) -> CaseSpec:
    rng = np.random.default_rng([seed, index])
    num_experts = int(rng.choice([4, 8, 16]))
    k = int(rng.choice([k for k in (1, 2, 4, 8) if k <= num_experts]))
    scenario = SCENARIOS[index % len(SCENARIOS)]
    tokens = [int(t) for t in rng.integers(1, 40, size=topology.world_size)]
    if scenario == "zero_token_rank":
        tokens[int(rng.integers(topology.world_size))] = 0
    return CaseSpec(
        index=index,
        num_experts=num_experts,
        k=k,
        hidden=int(rng.choice([8, 17, 32])),
        dtype=dtypes[index % len(dtypes)],
        scenario=scenario,
        policy=("tar", "wrr", "primary")[index % 3],
        tokens_per_rank=tuple(tokens),
        hot_expert=int(rng.integers(num_experts)),
        plan=random_layer_plan(rng, num_experts=num_experts, topology=topology),
    )


def make_experts(spec: CaseSpec, seed: int) -> list[nn.Module]:
    generator = torch.Generator().manual_seed(seed * 100_003 + spec.index)
    experts: list[nn.Module] = []
    for _ in range(spec.num_experts):
        expert = nn.Sequential(
            nn.Linear(spec.hidden, 2 * spec.hidden), nn.GELU(), nn.Linear(2 * spec.hidden, spec.hidden)
        )
        with torch.no_grad():
            for param in expert.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) / spec.hidden**0.5)
        experts.append(expert.to(DTYPES[spec.dtype]))
    return experts


def make_tokens(spec: CaseSpec, seed: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_TD, topk_ids_TK, topk_weights_TK) of `rank` in this case; distinct experts per token."""
    generator = torch.Generator().manual_seed((seed * 100_003 + spec.index) * 1_009 + rank)
    num_tokens, num_experts = spec.tokens_per_rank[rank], spec.num_experts
    x_TD = torch.randn(num_tokens, spec.hidden, generator=generator).to(DTYPES[spec.dtype])
    scores_TE = torch.rand(num_tokens, num_experts, generator=generator)
    if spec.scenario == "one_expert":
        scores_TE[:, spec.hot_expert] = 2.0
    topk_ids_TK = scores_TE.topk(spec.k, dim=1).indices
    topk_weights_TK = torch.softmax(torch.randn(num_tokens, spec.k, generator=generator), dim=1)
    if spec.scenario == "masked_routes":
        masked = torch.rand(num_tokens, spec.k, generator=generator) < 0.2
        topk_ids_TK = torch.where(masked, -1, topk_ids_TK)
    return x_TD, topk_ids_TK, topk_weights_TK


def expected_traffic(
    rank_by_origin: Sequence[torch.Tensor],
    slot_by_origin: Sequence[torch.Tensor],
    *,
    topology: Topology,
    ep_index: int,
    hierarchical: bool,
    dedup: bool,
    hidden: int,
    dtype: torch.dtype,
    num_local_slots: int,
    slot_stride: int,
) -> dict[str, Any]:
    """The counters `ep_index` must show after one forward, derived from the routing alone.

    rank_by_origin[o] / slot_by_origin[o]: the chosen instances (rank_TK, slot_TK) of origin rank
    o's routes. Counted token by token from the definition of each stage, independently of how
    ds_grace.comm.all_to_all batches the work. Returns {"stages": ..., "expert_rows": ...}.
    """
    gpus, num_ranks = topology.gpus_per_node, topology.world_size
    stages: dict[str, StageTraffic] = {}
    k = int(rank_by_origin[0].shape[1]) if rank_by_origin else 0
    dispatch_bytes = dispatch_row_bytes(k, hidden, dtype)
    combine_bytes = hidden * torch.empty((), dtype=dtype).element_size()
    header_bytes = header_row_bytes(
        gpus_per_node=gpus, slot_stride=slot_stride, extra=0, hierarchical=hierarchical
    )

    def move(stage: str, src: int, dst: int, nbytes: int) -> None:
        if src == dst or ep_index not in (src, dst):
            return
        scope = "intra" if topology.node_of(src) == topology.node_of(dst) else "inter"
        direction = "sent" if src == ep_index else "recv"
        traffic = stages.setdefault(stage, StageTraffic())
        setattr(traffic, f"rows_{direction}_{scope}", getattr(traffic, f"rows_{direction}_{scope}") + 1)
        setattr(
            traffic, f"bytes_{direction}_{scope}", getattr(traffic, f"bytes_{direction}_{scope}") + nbytes
        )

    if num_ranks > 1:
        for peer in range(num_ranks):
            move("sizes", ep_index, peer, header_bytes)
            move("sizes", peer, ep_index, header_bytes)
    expert_rows = [0] * num_local_slots
    for origin, (ranks_TK, slots_TK) in enumerate(zip(rank_by_origin, slot_by_origin)):
        for ranks, slots in zip(ranks_TK.tolist(), slots_TK.tolist()):
            hosts = [r for r in ranks if r >= 0]
            for r, slot in zip(ranks, slots):
                if r == ep_index:
                    expert_rows[slot] += 1
            if not hierarchical or topology.num_nodes == 1:  # one node: the hierarchical path is the flat hop
                for host in sorted(set(hosts)) if dedup else hosts:
                    move("dispatch", origin, host, dispatch_bytes)
                    move("combine", host, origin, combine_bytes)
                continue
            for node in sorted({h // gpus for h in hosts}):
                relay = node * gpus + origin % gpus
                move("dispatch.stage1", origin, relay, dispatch_bytes)
                move("combine.stage1", relay, origin, combine_bytes)
                for host in sorted({h for h in hosts if h // gpus == node}):
                    move("dispatch.stage2", relay, host, dispatch_bytes)
                    move("combine.stage2", host, relay, combine_bytes)
    return {"stages": {name: t.as_dict() for name, t in stages.items()}, "expert_rows": expert_rows}


def traffic_equal(snapshot: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Counters snapshot equals the expectation (stages with no traffic may be absent on either side)."""

    def moving(stages: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {name: t for name, t in stages.items() if any(t.values())}

    slots = len(expected["expert_rows"])
    counted = list(snapshot["expert_rows"]) + [0] * (slots - len(snapshot["expert_rows"]))
    return moving(snapshot["stages"]) == moving(expected["stages"]) and counted == expected["expert_rows"]


def _selfcheck_rank(
    ctx: RankContext, seed: int, num_cases: int, dtypes: tuple[str, ...], timeout_s: float
) -> list[dict[str, Any]]:
    results = []
    for index in range(num_cases):
        spec = make_case(seed, index, ctx.topology, dtypes)
        experts = make_experts(spec, seed)
        tokens = [make_tokens(spec, seed, rank) for rank in range(ctx.world_size)]
        x_TD, ids_TK, weights_TK = tokens[ctx.rank]
        table = RouteTable.build(spec.plan, ctx.topology, spec.policy)
        chosen = [choose_instances(table, ids, origin_rank=rank) for rank, (_, ids, _) in enumerate(tokens)]
        diffs: dict[str, float] = {}
        mode_diffs: dict[str, float] = {}
        computed: dict[str, int] = {}
        counters_ok: dict[str, bool] = {}
        with torch.no_grad():
            reference = reference_output(experts, x_TD, ids_TK, weights_TK).float()
            scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
            first_y: torch.Tensor | None = None
            for mode, (hierarchical, dedup) in MODES.items():
                options = RuntimeOptions(
                    policy=spec.policy, path="hierarchical" if hierarchical else "flat", dedup=dedup,
                    timeout_s=timeout_s,
                )  # fmt: skip
                layer = GraceMoE.from_experts(
                    experts,
                    hidden_size=spec.hidden,
                    k=spec.k,
                    layer_plan=spec.plan,
                    topology=ctx.topology,
                    ep_index=ctx.rank,
                    options=options,
                )
                y_TD = layer.forward_routed(x_TD, ids_TK, weights_TK).float()
                first_y = y_TD if first_y is None else first_y
                diffs[mode] = float((y_TD - reference).abs().max()) if y_TD.numel() else 0.0
                mode_diffs[mode] = float((y_TD - first_y).abs().max()) if y_TD.numel() else 0.0
                computed[mode] = sum(layer.comm_counters.expert_rows)
                expected = expected_traffic(
                    [c[0] for c in chosen],
                    [c[1] for c in chosen],
                    topology=ctx.topology,
                    ep_index=ctx.rank,
                    hierarchical=hierarchical,
                    dedup=dedup,
                    hidden=spec.hidden,
                    dtype=DTYPES[spec.dtype],
                    num_local_slots=len(spec.plan.slots[ctx.rank]),
                    slot_stride=max(len(slots) for slots in spec.plan.slots),
                )
                counters_ok[mode] = traffic_equal(layer.comm_counters.snapshot(), expected)
        totals = sum_over_ranks([int((ids_TK >= 0).sum()), *computed.values()])
        results.append(
            {
                "index": index,
                "dtype": spec.dtype,
                "abs_diff": diffs,
                "mode_diff": mode_diffs,
                "scale": scale,
                "counters_ok": counters_ok,
                "routes": int(totals[0]),
                "computed_routes": dict(zip(computed, (int(v) for v in totals[1:]))),
            }
        )
    return results


def run_selfcheck(
    topology: Topology,
    *,
    cases: int,
    seed: int = 0,
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Run the cases on local ranks (ds_grace.comm.local_ranks); return the summary plus per-case details."""
    per_rank = run_on_ranks(
        _selfcheck_rank,
        topology=topology,
        args=(seed, cases, dtypes, timeout_s),
        timeout_s=120.0 + 15.0 * cases,
        collective_timeout_s=timeout_s,
    )
    details = []
    mismatches = dropped = 0
    max_abs_diff = 0.0
    max_abs_diff_by_dtype: dict[str, float] = {}
    for index in range(cases):
        rows = [rank_results[index] for rank_results in per_rank]
        tolerance = RELATIVE_TOLERANCE[rows[0]["dtype"]] * max(r["scale"] for r in rows)
        worst = {mode: max(r["abs_diff"][mode] for r in rows) for mode in MODES}
        mode_diff = {mode: max(r["mode_diff"][mode] for r in rows) for mode in MODES}
        counters_ok = {mode: all(r["counters_ok"][mode] for r in rows) for mode in MODES}
        routes = rows[0]["routes"]
        computed = rows[0]["computed_routes"]
        case_dropped = sum(max(0, routes - n) for n in computed.values())
        ok = (
            all(v <= tolerance for v in worst.values())
            and all(v <= tolerance for v in mode_diff.values())
            and all(counters_ok.values())
            and all(n == routes for n in computed.values())
        )
        mismatches += 0 if ok else 1
        dropped += case_dropped
        max_abs_diff = max(max_abs_diff, *worst.values())
        case_dtype = rows[0]["dtype"]
        max_abs_diff_by_dtype[case_dtype] = max(max_abs_diff_by_dtype.get(case_dtype, 0.0), *worst.values())
        spec = make_case(seed, index, topology, dtypes)
        details.append(
            {
                **{key: value for key, value in asdict(spec).items() if key != "plan"},
                "plan": spec.plan.to_dict(),
                "abs_diff": worst,
                "mode_diff": mode_diff,
                "tolerance": tolerance,
                "counters_ok": counters_ok,
                "routes": routes,
                "computed_routes": computed,
                "ok": ok,
            }
        )
    summary = {
        "cases": cases,
        "mismatches": mismatches,
        "dropped_routes": dropped,
        "max_abs_diff": max_abs_diff,
        # bf16 cases differ by rounding steps; fp32 ones only by summation order
        "max_abs_diff_by_dtype": max_abs_diff_by_dtype,
    }
    return {"summary": summary, "details": details}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, default=4, help="local ranks to spawn (default 4)")
    parser.add_argument("--nodes", type=int, default=2, help="nodes the ranks are split into (default 2)")
    parser.add_argument(
        "--cases", type=int, default=12, help="random cases, each run in 3 modes (default 12)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="collective timeout in seconds")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")


def run(args: argparse.Namespace) -> int:
    if args.world_size < 1 or args.nodes < 1 or args.world_size % args.nodes != 0:
        print(
            f"error: --world-size ({args.world_size}) must be a positive multiple of --nodes ({args.nodes})",
            file=sys.stderr,
        )
        return 2
    if args.cases < 1:
        print(f"error: --cases ({args.cases}) must be >= 1", file=sys.stderr)
        return 2
    topology = Topology(num_nodes=args.nodes, gpus_per_node=args.world_size // args.nodes)
    dtypes = ("fp32", "bf16") if args.dtype == "both" else (args.dtype,)
    try:
        result = run_selfcheck(
            topology, cases=args.cases, seed=args.seed, dtypes=dtypes, timeout_s=args.timeout_s
        )
    except RankFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = result["summary"]
    for case in result["details"]:
        if not case["ok"]:
            print(
                f"case {case['index']} ({case['scenario']}, {case['dtype']}) failed: diff {case['abs_diff']}, "
                f"modes vs hierarchical {case['mode_diff']} (tolerance {case['tolerance']:.3g}), "
                f"counters {case['counters_ok']}, routes {case['routes']} computed {case['computed_routes']}",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"selfcheck on {topology}: {summary['cases']} cases x {len(MODES)} modes, "
            f"{summary['mismatches']} mismatches, {summary['dropped_routes']} dropped routes, "
            f"max abs diff {summary['max_abs_diff']:.3g}"
        )
    return 0 if summary["mismatches"] == 0 and summary["dropped_routes"] == 0 else 1
