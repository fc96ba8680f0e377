"""Why balance trails EPLB after a traffic shift: four probes on the drift replay (pure, no ranks).

The drift target asks GRACE's re-grouped plan to balance each interval after the shift at least as well
as EPLB re-planned on the same windows. These probes separate the instance choice from the placement,
on the pairs and shapes of ``bench_drift.py`` (window of 4 intervals, interval i scored with what was
fitted on the window that ends at interval i - 1; means from the 4th interval on):

- ``lp_routing``: the re-grouped plan as committed (``regroup``, 10 % byte budget), served with an
  instance choice fitted on the window by a linear program per layer: first the lowest max GPU load the
  placement allows for the window's loads (origins uniform), then, at that load, the fewest cross-node
  routes (and, at 1 % of that cost, cross-GPU routes). Moving no weights, it is the best balance any
  per-(origin rank, expert) instance choice can give on the window. Scored in sample (the window) and
  out of sample (the next interval), against TAR on the same plan.
- ``fresh_wrr``: a GRACE plan fitted on every window with no byte cap, served with EPLB's own instance
  choice (even split over all copies), against EPLB's plan of the same window; GPU and node balancedness.
- ``--swaps`` (slow on Qwen1.5 2x4), two re-arrangements of the fresh GRACE plan inside each node (node
  membership, so cross-node copies, unchanged), served with TAR: slots swapped between GPUs of a node
  while that lowers the mean over the window's intervals of max / mean GPU load; and the node's instances
  re-packed onto its GPUs ignoring co-activation, heaviest first onto the least loaded GPU with a free
  slot (EPLB's packing; the fresh layer is kept where the greedy runs out of room).
- ``per_node``: a plan fitted on every window node by node, locality kept only between nodes: the
  experts grouped into nodes by co-activation, each node topped up with the heaviest experts it lacks
  (``ds_grace.planning.per_node.node_members``), then EPLB's intra-node step on each node (replicas to
  the largest load per copy, packed by load, co-activation ignored) with each expert's load scaled by
  the share of origins TAR sends to that node; served with TAR, against EPLB's plan of the same window.

Prints one line per row and probe; writes benchmarks/results/drift_balance_probe.json.
Usage: python benchmarks/drift_balance_probe.py [--pairs ...] [--shapes 2x2 2x4] [--swaps]
       [--probes lp_routing fresh_wrr per_node] [--window 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import sparse  # noqa: E402
from scipy.optimize import linprog  # noqa: E402

from benchmarks.bench_drift import BUDGET_SHARE, SETTLE, pairs  # noqa: E402
from ds_grace.config import GraceConfig  # noqa: E402
from ds_grace.files import write_text_atomic  # noqa: E402
from ds_grace.online.drift import token_slice  # noqa: E402
from ds_grace.online.regroup import regroup  # noqa: E402
from ds_grace.planning.baselines import fill_node, layer_from_slots  # noqa: E402
from ds_grace.planning.batch_balance import swapped as swap_slots  # noqa: E402
from ds_grace.planning.build import build_plan  # noqa: E402
from ds_grace.planning.metrics import (  # noqa: E402
    copies_per_token,
    expected_reach,
    expert_loads,
    routing_probabilities,
)
from ds_grace.planning.per_node import node_members  # noqa: E402
from ds_grace.planning.plan import GracePlan, LayerPlan, instance_table  # noqa: E402
from ds_grace.planning.stats import affinity_matrices  # noqa: E402
from ds_grace.topology import Topology  # noqa: E402
from ds_grace.trace import RoutingTrace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROBES = ("lp_routing", "fresh_wrr", "per_node")
GPU_COST = 0.01  # cost of a cross-GPU route, in cross-node routes


def lp_routing(layer: LayerPlan, topology: Topology, loads_E: np.ndarray) -> np.ndarray:
    """prob_GER of the instance choice with the lowest max GPU load for loads_E, then fewest crossings."""
    num_ranks, gpn = topology.world_size, topology.gpus_per_node
    inst_rank_EI, _ = instance_table(layer)
    expert_V, inst_V = np.nonzero(inst_rank_EI >= 0)
    demand_E = np.asarray(loads_E, dtype=np.float64) / num_ranks + 1e-9
    origin_X = np.repeat(np.arange(num_ranks), len(expert_V))  # one variable per (origin, instance)
    expert_X = np.tile(expert_V, num_ranks)
    dest_X = inst_rank_EI[expert_X, np.tile(inst_V, num_ranks)]
    columns = np.arange(len(origin_X))
    served = sparse.csr_matrix((np.ones(len(columns)), (origin_X * layer.num_experts + expert_X, columns)))
    load = sparse.csr_matrix((np.ones(len(columns)), (dest_X, columns)), shape=(num_ranks, len(columns)))
    demand = np.tile(demand_E, num_ranks)[: served.shape[0]]
    with_max = sparse.hstack([load, -np.ones((num_ranks, 1))]).tocsr()
    served_max = sparse.hstack([served, sparse.csr_matrix((served.shape[0], 1))]).tocsr()
    cost_max = np.r_[np.zeros(len(columns)), 1.0]
    lowest = linprog(cost_max, A_ub=with_max, b_ub=np.zeros(num_ranks), A_eq=served_max, b_eq=demand)
    crossing = (dest_X // gpn != origin_X // gpn) + GPU_COST * (dest_X != origin_X)
    flows = linprog(crossing, A_ub=load, b_ub=np.full(num_ranks, lowest.x[-1]), A_eq=served, b_eq=demand).x
    prob_GER = np.zeros((num_ranks, layer.num_experts, num_ranks))
    np.add.at(prob_GER, (origin_X, expert_X, dest_X), flows / demand_E[expert_X])
    return prob_GER


def scored(tokens: RoutingTrace, topology: Topology, prob_LGER: list[np.ndarray]) -> tuple[float, float]:
    """(cross-node copies per token, GPU balancedness) of tokens under per-layer instance choices."""
    loads_LE = expert_loads(tokens)
    copies, balance = [], []
    for index, prob_GER in enumerate(prob_LGER):
        gpu_R = loads_LE[index] @ prob_GER.mean(axis=0)
        balance.append(gpu_R.mean() / gpu_R.max())
        node_GEN = prob_GER.reshape(*prob_GER.shape[:2], topology.num_nodes, -1).sum(axis=3)
        ids = tokens.topk_ids[index]
        rows = expected_reach(ids, prob_GER), expected_reach(ids, node_GEN)
        copies.append(copies_per_token(*rows, topology=topology, num_tokens=len(ids))[0])
    return float(np.mean(copies)), float(np.mean(balance))


def balances(tokens: RoutingTrace, plan: GracePlan, policy: str) -> tuple[float, float]:
    """(GPU, node) balancedness of tokens on plan with the given instance choice."""
    loads_LE, gpu, node = expert_loads(tokens), [], []
    for index, layer in enumerate(plan.layers):
        gpu_R = loads_LE[index] @ routing_probabilities(layer, plan.topology, policy).mean(axis=0)
        node_N = gpu_R.reshape(plan.topology.num_nodes, -1).sum(axis=1)
        gpu.append(gpu_R.mean() / gpu_R.max())
        node.append(node_N.mean() / node_N.max())
    return float(np.mean(gpu)), float(np.mean(node))


def swapped(layer: LayerPlan, a: int, i: int, b: int, j: int) -> LayerPlan | None:
    """layer with slot i of rank a and slot j of rank b exchanged (primaries follow), None if invalid."""
    if layer.slots[a][i] in layer.slots[b] or layer.slots[b][j] in layer.slots[a]:
        return None
    return swap_slots(layer, a, i, b, j)


def swap_within_nodes(layer: LayerPlan, topology: Topology, loads_CE: np.ndarray) -> LayerPlan:
    """First-improvement swaps between GPUs of a node on the mean over chunks of max / mean GPU load."""

    def spread(candidate: LayerPlan) -> float:
        gpu_CR = loads_CE @ routing_probabilities(candidate, topology, "tar").mean(axis=0)
        return float(np.mean(gpu_CR.max(axis=1) / np.maximum(gpu_CR.mean(axis=1), 1e-12)))

    best, gpn = spread(layer), topology.gpus_per_node
    for _ in range(2):
        improved = False
        for node in range(topology.num_nodes):
            for a, b in itertools.combinations(range(node * gpn, (node + 1) * gpn), 2):
                for i, j in itertools.product(range(len(layer.slots[a])), range(len(layer.slots[b]))):
                    candidate = swapped(layer, a, i, b, j)
                    if candidate is not None and (value := spread(candidate)) < best - 1e-9:
                        layer, best, improved = candidate, value, True
        if not improved:
            break
    return layer


def repacked(layer: LayerPlan, topology: Topology, loads_E: np.ndarray) -> LayerPlan:
    """Each node's instances packed onto its GPUs by window load, heaviest first (layer if stuck)."""
    gpn, room = topology.gpus_per_node, [len(s) for s in layer.slots]
    slots: list[list[int]] = [[] for _ in layer.slots]
    weights: list[list[float]] = [[] for _ in layer.slots]
    primary = list(layer.primary)
    for node in range(topology.num_nodes):
        ranks = range(node * gpn, (node + 1) * gpn)
        held = [(r, e, w) for r in ranks for e, w in zip(layer.slots[r], layer.slot_weights[r])]
        node_weight = {e: sum(w for _, f, w in held if f == e) for _, e, _ in held}
        load = dict.fromkeys(ranks, 0.0)
        for rank, expert, weight in sorted(held, key=lambda h: -loads_E[h[1]] * h[2] / node_weight[h[1]]):
            free = [r for r in ranks if len(slots[r]) < room[r] and expert not in slots[r]]
            if not free:
                return layer
            target = min(free, key=load.__getitem__)
            slots[target].append(expert)
            weights[target].append(weight)
            load[target] += loads_E[expert] * weight / node_weight[expert]
            primary[expert] = target if primary[expert] == rank else primary[expert]
    return LayerPlan.from_lists(slots=slots, slot_weights=weights, primary=primary)


def node_fitted(
    loads_E: np.ndarray, topology: Topology, slots_per_gpu: int, affinity_EE: np.ndarray
) -> LayerPlan:
    """The ``per_node`` probe's layer: co-activation groups per node, EPLB's intra-node step inside."""
    members = node_members(loads_E, affinity_EE, topology, slots_per_gpu)
    holders_E = np.zeros(len(loads_E))
    for experts in members:
        holders_E[experts] += 1
    slots: list[list[int]] = [[] for _ in range(topology.world_size)]
    nodes, gpus = topology.num_nodes, topology.gpus_per_node
    for node, experts in enumerate(members):
        # TAR: a node's own origins, plus an even part of the origins on nodes without the expert
        share = (1 + (nodes - holders_E[experts]) / holders_E[experts]) / nodes
        weight = loads_E[experts] * share + loads_E.sum() * 1e-9 + 1e-12
        fill_node(slots, experts, weight, first_rank=node * gpus, gpus=gpus, slots_per_gpu=slots_per_gpu)
    return layer_from_slots(slots, len(loads_E))


def replay(
    served: RoutingTrace,
    per: int,
    fit: Callable[[RoutingTrace, int], Callable[[RoutingTrace], dict]],
    window: int,
):
    """Mean from SETTLE on of scorer(next interval), the scorer fitted on each window."""
    rows, scorer, index = [], None, 0
    while (tokens := token_slice(served, index * per, (index + 1) * per)) is not None:
        if scorer is not None and index >= SETTLE:
            rows.append(scorer(tokens))
        recent = token_slice(served, max(0, index + 1 - window) * per, (index + 1) * per)
        scorer = fit(recent, index)
        index += 1
    return {key: round(float(np.mean([row[key] for row in rows])), 4) for key in rows[0]}


def probe_row(
    profile: RoutingTrace,
    served: RoutingTrace,
    per: int,
    topology: Topology,
    *,
    swaps: bool,
    probes: tuple[str, ...] = PROBES,
    window: int = 4,
) -> dict:
    cfg = GraceConfig()
    slots = -(-profile.num_experts // topology.world_size) + 1
    budget = int(BUDGET_SHARE * profile.num_layers * topology.world_size * slots)
    state = {"live": build_plan(profile, topology=topology, config=cfg)}

    def fit_lp(window: RoutingTrace, _: int) -> Callable[[RoutingTrace], dict]:
        result = regroup(state["live"], window, config=cfg, expert_nbytes=1, max_bytes=budget)
        live = state["live"] = result.plan or state["live"]
        window_LE = expert_loads(window)
        prob = [lp_routing(layer, topology, window_LE[i]) for i, layer in enumerate(live.layers)]
        tar = [routing_probabilities(layer, topology, "tar") for layer in live.layers]
        eplb = build_plan(window, topology=topology, config=cfg, policy="eplb")
        in_sample = scored(window, topology, prob)[1]
        eplb_in_sample = balances(window, eplb, "wrr")[0]

        def score(tokens: RoutingTrace) -> dict:
            (copies, balance), (tar_copies, tar_balance) = (
                scored(tokens, topology, prob),
                scored(tokens, topology, tar),
            )
            return {
                "lp_copies": copies,
                "lp_balancedness": balance,
                "lp_in_sample_balancedness": in_sample,
                "tar_copies": tar_copies,
                "tar_balancedness": tar_balance,
                "eplb_balancedness": balances(tokens, eplb, "wrr")[0],
                "eplb_in_sample_balancedness": eplb_in_sample,
            }

        return score

    def fit_fresh(window: RoutingTrace, _: int) -> Callable[[RoutingTrace], dict]:
        fresh = build_plan(window, topology=topology, config=cfg)
        eplb = build_plan(window, topology=topology, config=cfg, policy="eplb")
        if swaps:
            chunks_LCE = np.stack(
                [
                    expert_loads(token_slice(window, c * per, (c + 1) * per))
                    for c in range(len(window.topk_ids[0]) // per)
                ],
                axis=1,
            )
            layers = tuple(
                swap_within_nodes(layer, topology, chunks_LCE[i]) for i, layer in enumerate(fresh.layers)
            )
            swapped_plan = dataclasses.replace(fresh, layers=layers)
            window_LE = expert_loads(window)
            layers = tuple(repacked(layer, topology, window_LE[i]) for i, layer in enumerate(fresh.layers))
            repacked_plan = dataclasses.replace(fresh, layers=layers)

        def score(tokens: RoutingTrace) -> dict:
            (gpu, node), (eplb_gpu, eplb_node) = balances(tokens, fresh, "wrr"), balances(tokens, eplb, "wrr")
            row = {"fresh_wrr_gpu": gpu, "fresh_wrr_node": node, "eplb_gpu": eplb_gpu, "eplb_node": eplb_node}
            if swaps:
                row["fresh_tar_gpu"] = balances(tokens, fresh, "tar")[0]
                row["swapped_tar_gpu"] = balances(tokens, swapped_plan, "tar")[0]
                row["repacked_tar_gpu"] = balances(tokens, repacked_plan, "tar")[0]
            return row

        return score

    def fit_per_node(window: RoutingTrace, _: int) -> Callable[[RoutingTrace], dict]:
        window_LE, affinity = expert_loads(window), affinity_matrices(window)
        layers = tuple(node_fitted(window_LE[i], topology, slots, affinity[i]) for i in range(len(window_LE)))
        fitted = GracePlan(topology=topology, layers=layers, policy="grace", meta={"routing_policy": "tar"})
        fresh = build_plan(window, topology=topology, config=cfg)
        eplb = build_plan(window, topology=topology, config=cfg, policy="eplb")

        def score(tokens: RoutingTrace) -> dict:
            row = {}
            for key, plan, policy in (
                ("per_node", fitted, "tar"),
                ("fresh", fresh, "tar"),
                ("eplb", eplb, "wrr"),
            ):
                prob = [routing_probabilities(layer, topology, policy) for layer in plan.layers]
                row[f"{key}_copies"], row[f"{key}_balancedness"] = scored(tokens, topology, prob)
            return row

        return score

    fits = {"lp_routing": fit_lp, "fresh_wrr": fit_fresh, "per_node": fit_per_node}
    return {probe: replay(served, per, fits[probe], window) for probe in probes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="*")
    parser.add_argument("--shapes", nargs="*", default=["2x2", "2x4"])
    parser.add_argument("--swaps", action="store_true")
    parser.add_argument("--probes", nargs="*", choices=PROBES, default=list(PROBES))
    parser.add_argument("--window", type=int, default=4, help="intervals each fit sees")
    parser.add_argument("--out", type=Path, default=RESULTS / "drift_balance_probe.json")
    args = parser.parse_args()
    report: dict = {"window": args.window, "rows": {}}
    for name, (profile, served, per) in pairs().items():
        if args.pairs and name not in args.pairs:
            continue
        for shape in args.shapes:
            nodes, gpus = (int(x) for x in shape.split("x"))
            topology = Topology(num_nodes=nodes, gpus_per_node=gpus)
            row = probe_row(
                profile,
                served,
                per,
                topology,
                swaps=args.swaps,
                probes=tuple(args.probes),
                window=args.window,
            )
            report["rows"][f"{name}_{shape}"] = row
            for probe, values in row.items():
                print(f"{name:34s} {shape} {probe:10s} {json.dumps(values)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
