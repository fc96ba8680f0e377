"""The planner variants measured and not adopted, kept so that bench_planner.py can rerun the ablation.

Shape legend: L layers, B blocks, E experts, R ranks.

Each ``ExperimentVariant`` is the product's ``Variant`` (ds_grace/planning/robust.py) plus steps the
product does not take: EPLB's per-copy replica rule or its intra-node packing on the grace nodes,
loads raised by their spread, bounded WRR weights, dealing experts to GPUs by the worst of several
blocks of the sample, replicas split inside nodes against a robust GPU load, and a tiny perturbation
of the planning loads (the noise floor). ``plan_variant`` builds the plan; a variant without those
steps is the product's (``build_plan(variant=...)``). The numbers: benchmarks/README.md, "The robust
planner: what was measured".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal
from unittest import mock

import numpy as np

from ds_grace.config import GraceConfig
from ds_grace.planning import replication
from ds_grace.planning.baselines import fill_node, layer_from_slots
from ds_grace.planning.build import (
    Rebalance,
    _fingerprint,
    build_plan,
    group_primaries,
    planning_loads,
    predicted_balancedness,
    recency_gate,
    replica_layers,
    replication_meta,
    resolve_config,
    resolve_slots_per_gpu,
    slot_caps,
)
from ds_grace.planning.grouping import NodeDeal
from ds_grace.planning.metrics import expected_gpu_loads
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError
from ds_grace.planning.replication import (
    ReplicaPlacement,
    _add_copy,
    instance_loads,
    replicate,
    seed_replicas,
    share_gpu_loads,
)
from ds_grace.planning.robust import Variant, _halves, _shares, shrinkage, shrunk_loads
from ds_grace.planning.stats import LoadSource, expert_loads
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace


@dataclass(frozen=True)
class ExperimentVariant(Variant):
    """replicas: "greedy" (the product's), "per_copy" (EPLB's rule: copies to the expert with the
    largest load per copy, then WRR weights fitted only if fitted_weights, within weight_bound) or
    "node_packed" (EPLB's intra-node step on the grace nodes, weights 1), on the layers whose
    shrinkage is >= drift_shrinkage (None: every layer); uncertainty: loads raised by that many
    ``load_spread`` on those layers; blocks > 1: a node's experts dealt to its GPUs by the worst of
    ``block_loads``; jitter: planning loads x (1 + jitter x N(0, 1)), seeded by jitter_seed;
    split_z > 0: ``split_seed_replicas`` with that z and split_tolerance on the recency-gated layers."""

    replicas: Literal["greedy", "per_copy", "node_packed"] = "greedy"
    fitted_weights: bool = False
    uncertainty: float = 0.0
    drift_shrinkage: float | None = None
    weight_bound: float = 1e3
    blocks: int = 0
    jitter: float = 0.0
    jitter_seed: int = 0
    split_z: float = 0.0
    split_tolerance: float = 0.0


PRODUCT_FIELDS = tuple(f.name for f in fields(Variant))
SHRUNK_ROOM_SPREAD = ExperimentVariant(
    shrunk_loads=True, replica_room=True, spread=True
)  # default until recency
RECENCY = replace(SHRUNK_ROOM_SPREAD, recency=0.5, recency_gate=2.0)  # default until swaps
ROBUST = replace(RECENCY, swap_tolerance=0.02)  # the product's ROBUST_VARIANT
DRIFT_PER_COPY = ExperimentVariant(
    shrunk_loads=True,
    replica_room=True,
    spread=True,
    replicas="per_copy",
    uncertainty=1.0,
    drift_shrinkage=0.3,
)
VARIANTS: dict[str, ExperimentVariant] = {
    "sample_fitted": ExperimentVariant(),
    "shrunk": ExperimentVariant(shrunk_loads=True),
    "room_spread": ExperimentVariant(replica_room=True, spread=True),
    "room_spread_per_copy": ExperimentVariant(replica_room=True, spread=True, replicas="per_copy"),
    "shrunk_node_packed": ExperimentVariant(shrunk_loads=True, replicas="node_packed"),
    "drift_per_copy": DRIFT_PER_COPY,
    "shrunk_room_spread": SHRUNK_ROOM_SPREAD,
    "block_spread": replace(SHRUNK_ROOM_SPREAD, blocks=4),
    "per_copy_bounded": replace(
        SHRUNK_ROOM_SPREAD, replicas="per_copy", fitted_weights=True, weight_bound=2.0
    ),
    "recency": RECENCY,
    "split_inside_nodes": replace(RECENCY, split_z=2.0, split_tolerance=0.01),
    "robust": ROBUST,
}
NOISE_FLOOR_JITTER = 1e-3  # relative; sampling noise of the shipped traces' loads is ~5-10 %
NOISE_FLOOR_SEEDS = (0, 1, 2, 3)


def product_variant(variant: Variant) -> Variant | None:
    """The product's Variant when `variant` uses only the product's steps, else None."""
    if isinstance(variant, ExperimentVariant) and variant != ExperimentVariant(
        **{name: getattr(variant, name) for name in PRODUCT_FIELDS}
    ):
        return None
    return Variant(**{name: getattr(variant, name) for name in PRODUCT_FIELDS})


def load_spread(trace: RoutingTrace) -> np.ndarray:
    """sigma_LE: per layer and expert, half the gap between the loads of the sample's two halves in
    recorded order (each scaled to the layer's total): a one-sample estimate of how far an expert's load
    moves on traffic the sample did not record. 0 where the trace is too small to split."""
    halves = _halves(trace)
    loads_LE = np.asarray(trace.loads(), dtype=np.float64)
    if halves is None:
        return np.zeros_like(loads_LE)
    total_L1 = loads_LE.sum(axis=1, keepdims=True)
    first, rest = (total_L1 * _shares(np.asarray(part.loads(), dtype=np.float64)) for part in halves)
    return np.abs(first - rest) / 2.0


def block_loads(trace: RoutingTrace, num_blocks: int) -> np.ndarray:
    """loads_LBE: per layer, the expert loads of num_blocks consecutive blocks of the tokens in
    recorded order, each block scaled to the layer's total (so blocks of unequal size weigh alike)."""
    loads_LE = np.asarray(trace.loads(), dtype=np.float64)
    out = np.zeros((trace.num_layers, num_blocks, trace.num_experts))
    for layer, ids_TK in enumerate(trace.topk_ids):
        bounds = np.linspace(0, len(ids_TK), num_blocks + 1).round().astype(np.int64)
        for b in range(num_blocks):
            out[layer, b] = np.bincount(
                ids_TK[bounds[b] : bounds[b + 1]].ravel(), minlength=trace.num_experts
            )
    return loads_LE.sum(axis=1)[:, None, None] * _shares(out.reshape(-1, trace.num_experts)).reshape(
        out.shape
    )


def robust_gpu_loads(
    loads_E: np.ndarray,
    spread_E: np.ndarray,
    hosts_ER: np.ndarray,
    topology: Topology,
    *,
    z: float,
    policy: str = "tar",
    weight_R: np.ndarray | None = None,
) -> np.ndarray:
    """robust_R: expected GPU loads plus z standard deviations when every expert's load moves
    independently by spread_E: mu_R + z * sqrt(sum_e (share_eR * spread_e) ** 2)."""
    mu_R, share_ER = share_gpu_loads(loads_E, hosts_ER, topology, policy=policy, weight_R=weight_R)
    return mu_R + z * np.sqrt(((spread_E[:, None] * share_ER) ** 2).sum(axis=0))


def split_seed_replicas(
    loads_E: np.ndarray,
    spread_E: np.ndarray,
    primary: np.ndarray,
    topology: Topology,
    slots: int,
    *,
    z: float,
    policy: str = "tar",
    tolerance: float = 0.0,
) -> list[tuple[int, int]]:
    """``seed_replicas``' order (copies to the expert with the largest load per copy), but each copy
    chooses between the least-loaded GPU of a node without the expert (a cross-node copy) and the
    least-loaded other GPU of a node that holds it (TAR splits that node's share inside it): the split
    where it lowers the max of ``robust_gpu_loads`` by more than tolerance x the mean GPU load."""
    num_experts, world, gpus = len(loads_E), topology.world_size, topology.gpus_per_node
    copies = np.ones(num_experts)
    hosts = np.zeros((num_experts, world), dtype=bool)
    hosts[np.arange(num_experts), primary] = True
    free_R = slots - np.bincount(primary, minlength=world)
    gpu = np.bincount(primary, weights=loads_E, minlength=world)
    pairs: list[tuple[int, int]] = []
    while free_R.sum() > 0:
        e = int(np.argmax(np.where(hosts.sum(axis=1) < world, loads_E / copies, -1.0)))
        node_has = np.repeat(hosts[e].reshape(topology.num_nodes, gpus).any(axis=1), gpus)
        open_R = (free_R > 0) & ~hosts[e]
        if loads_E[e] <= 0 or not open_R.any():
            break
        options = [np.flatnonzero(open_R & mask) for mask in (~node_has, node_has)]
        targets = [int(ranks[np.argmin(gpu[ranks])]) for ranks in options if len(ranks)]
        worst = []
        for t in targets:
            hosts[e, t] = True
            worst.append(
                float(robust_gpu_loads(loads_E, spread_E, hosts, topology, z=z, policy=policy).max())
            )
            hosts[e, t] = False
        t = targets[0]  # a cross-node copy (if any node lacks e) unless the split is clearly better
        if len(targets) == 2 and worst[1] < worst[0] - tolerance * float(loads_E.sum()) / world:
            t = targets[1]
        _add_copy(e, t, loads_E=loads_E, copies=copies, hosts=hosts, free_R=free_R, gpu=gpu, pairs=pairs)
    return pairs


def block_spread_within_nodes(
    expert2rank_E: np.ndarray,
    loads_E: np.ndarray,
    affinity_EE: np.ndarray,
    topology: Topology,
    blocks_BE: np.ndarray,
) -> np.ndarray:
    """``spread_within_nodes`` with each node's experts dealt by the worst of the blocks (``block_loads``):
    an expert goes to the open GPU whose max over the blocks of (its load there + the expert's) is
    lowest, plus the same anti-affinity term."""
    gpus = topology.gpus_per_node
    result = np.asarray(expert2rank_E, dtype=np.int64).copy()
    loads = np.asarray(loads_E, dtype=np.float64)
    for node in range(topology.num_nodes):
        deal = NodeDeal(np.flatnonzero(result // gpus == node), loads, affinity_EE, gpus)
        fill_BG = np.zeros((len(blocks_BE), gpus))
        for expert in deal.order:
            worst_G = (fill_BG + blocks_BE[:, [expert]]).max(axis=0)
            g = deal.place(expert, worst_G)
            fill_BG[:, g] += blocks_BE[:, expert]
            result[expert] = node * gpus + g
    return result


def per_copy_placement(
    loads_E: np.ndarray,
    primary: np.ndarray,
    topology: Topology,
    *,
    seeds: list[tuple[int, int]],
    options: dict[str, Any],
    fitted_weights: bool,
    weight_bound: float,
) -> ReplicaPlacement:
    """The replicas `seeds` (EPLB's per-copy rule) on `primary`, empty slots filled as the product
    does; WRR weights refined by the product's rule with every step clipped to [1 / weight_bound,
    weight_bound] x their mean if fitted_weights, else all 1 (an even split over instances)."""
    with mock.patch.object(replication, "WEIGHT_BOUND", weight_bound):
        placement = replicate(loads_E, primary, topology, initial=seeds, greedy=False, **options)
    if fitted_weights:
        return placement
    hosts_ER = np.zeros((len(loads_E), topology.world_size), dtype=bool)
    hosts_ER[np.arange(len(loads_E)), primary] = True
    for e, r in placement.pairs():
        hosts_ER[e, r] = True
    weight_R = np.ones(topology.world_size)
    policy = options["routing_policy"]
    gpu_R = instance_loads(loads_E, hosts_ER, weight_R, topology, policy, primary).sum(axis=0)
    return replace(
        placement,
        rank_weights=tuple(float(w) for w in weight_R),
        predicted_gpu_loads=tuple(float(x) for x in gpu_R),
    )


def node_packed_layer(
    loads_E: np.ndarray, node_E: np.ndarray, topology: Topology, *, slots_per_gpu: int
) -> LayerPlan:
    """Experts kept on the nodes ``node_E`` gives; inside each node, EPLB's intra-node step
    (``fill_node``): every GPU exactly slots_per_gpu slots. WRR weights 1 (even split)."""
    loads = np.asarray(loads_E, dtype=np.float64)
    gpus, world = topology.gpus_per_node, topology.world_size
    slots: list[list[int]] = [[] for _ in range(world)]
    for node in range(topology.num_nodes):
        experts = np.flatnonzero(np.asarray(node_E) == node)
        if not gpus <= len(experts) <= gpus * slots_per_gpu or slots_per_gpu > len(experts):
            raise PlanError(
                f"node {node} holds {len(experts)} experts: must be in [{max(gpus, slots_per_gpu)}, "
                f"{gpus * slots_per_gpu}] for {gpus} GPUs of {slots_per_gpu} slots"
            )
        fill_node(
            slots, experts, loads[experts], first_rank=node * gpus, gpus=gpus, slots_per_gpu=slots_per_gpu
        )
    return layer_from_slots(slots, len(loads))


def plan_variant(
    source: LoadSource,
    *,
    topology: Topology,
    variant: Variant,
    replication: Mapping[str, Any] | None = None,
    load_slack: float | None = 0.0,
) -> GracePlan:
    """The grace plan of `variant`: the product's (``build_plan``) when it takes only product steps."""
    product = product_variant(variant)
    if product is not None:
        return build_plan(
            source, topology=topology, replication=replication, variant=product, load_slack=load_slack
        )
    assert isinstance(variant, ExperimentVariant)
    return experiment_plan(
        source, topology=topology, variant=variant, replication=replication, load_slack=load_slack
    )


def experiment_plan(
    source: LoadSource,
    *,
    topology: Topology,
    variant: ExperimentVariant,
    replication: Mapping[str, Any] | None = None,
    load_slack: float | None = 0.0,
) -> GracePlan:
    """The grace plan of `variant`: the product planner's steps (``build_plan``) with the experiment
    steps of ``ExperimentVariant`` added where they apply."""
    cfg = resolve_config(replication=replication)
    loads_LE = expert_loads(source)
    num_layers, num_experts = loads_LE.shape
    world = topology.world_size
    slots = resolve_slots_per_gpu(cfg, num_experts=num_experts, topology=topology)
    sampled = isinstance(source, RoutingTrace)
    lam_L = shrinkage(source) if sampled else np.zeros(num_layers)
    blocks_LBE = None
    if variant.blocks > 1 and sampled:
        blocks_LBE = block_loads(source, variant.blocks)
        if variant.shrunk_loads:
            blocks_LBE = np.stack(
                [shrunk_loads(blocks_LBE[:, b], lam_L) for b in range(variant.blocks)], axis=1
            )
    loads_LE = planning_loads(source, loads_LE, variant)
    if variant.jitter > 0:
        noise_LE = np.random.default_rng(variant.jitter_seed).standard_normal(loads_LE.shape)
        loads_LE = loads_LE * (1.0 + variant.jitter * noise_LE)
    drifting_L = np.ones(num_layers, dtype=bool)
    if variant.drift_shrinkage is not None:
        drifting_L = lam_L >= variant.drift_shrinkage
    if variant.uncertainty > 0 and sampled:
        loads_LE = loads_LE + variant.uncertainty * load_spread(source) * drifting_L[:, None]
    gated_L = (
        recency_gate(source, variant) if sampled and slots is not None else np.zeros(num_layers, dtype=bool)
    )
    spread_LE = load_spread(source) if sampled else np.zeros_like(loads_LE)
    cap, group_cap = slot_caps(cfg, slots=slots, num_experts=num_experts, world=world, variant=variant)
    meta: dict[str, Any] = {"max_experts_per_gpu": cfg.grouping.max_experts_per_gpu}
    spread = variant.spread and blocks_LBE is None  # else below, by the worst block
    primaries, affinities, intra = group_primaries(
        source, loads_LE, topology, cfg, meta, load_slack=load_slack, caps=(cap, group_cap), spread=spread
    )
    if variant.spread and blocks_LBE is not None and intra is not None:
        primaries = np.stack(
            [
                block_spread_within_nodes(primaries[i], loads_LE[i], intra[i], topology, blocks_LBE[i])
                for i in range(num_layers)
            ]
        )
    if variant.replicas == "node_packed" and variant.drift_shrinkage is not None:
        raise ValueError("replicas 'node_packed' applies to every layer (drift_shrinkage None)")
    if variant.replicas == "node_packed" and slots is not None and cfg.replication.enabled:
        layers = [
            node_packed_layer(
                loads_LE[i], primaries[i] // topology.gpus_per_node, topology, slots_per_gpu=slots
            )
            for i in range(num_layers)
        ]
        balance = [
            predicted_balancedness(expected_gpu_loads(loads_LE[i], layer, topology, cfg.routing.policy))
            for i, layer in enumerate(layers)
        ]
        meta["routing_policy"] = cfg.routing.policy
        meta["replication"] = replication_meta(
            cfg, layers, num_experts=num_experts, world=world, slots=slots, balance=balance
        )
    else:

        def place(index: int, options: dict[str, Any]) -> tuple[np.ndarray, ReplicaPlacement]:
            return _variant_replicas(
                variant,
                variant.replicas if drifting_L[index] else "greedy",
                loads_E=loads_LE[index],
                primary=primaries[index],
                affinity=None if affinities is None else affinities[index],
                spread_E=spread_LE[index] if gated_L[index] and variant.split_z > 0 else None,
                topology=topology,
                cfg=cfg,
                options=options,
                load_slack=load_slack,
                ratio=meta.get("grouping", {}).get("ratio"),
                group_cap=group_cap,
                slots=slots,
            )

        swaps = (
            gated_L if variant.swap_tolerance is not None else np.zeros(num_layers, dtype=bool),
            variant.swap_tolerance,
        )
        layers = replica_layers(
            source, loads_LE, primaries, topology, cfg, meta, caps=(cap, slots), intra=intra, swaps=swaps,
            place=place,
        )  # fmt: skip
    meta["replication"]["drifting_layers"] = (
        [int(i) for i in np.flatnonzero(drifting_L)] if variant.replicas != "greedy" else []
    )
    meta["variant"] = {f.name: getattr(variant, f.name) for f in fields(variant)}
    return GracePlan(
        topology=topology,
        layers=tuple(layers),
        policy="grace",
        trace_fingerprint=_fingerprint(source),
        meta=meta,
    )


def _variant_replicas(
    variant: ExperimentVariant,
    replicas: str,
    *,
    loads_E: np.ndarray,
    primary: np.ndarray,
    affinity: np.ndarray | None,
    spread_E: np.ndarray | None,
    topology: Topology,
    cfg: GraceConfig,
    options: dict[str, Any],
    load_slack: float | None,
    ratio: float | None,
    group_cap: int | None,
    slots: int | None,
) -> tuple[np.ndarray, ReplicaPlacement]:
    """One layer's primaries and replicas under `variant` (``replicas``: its rule on this layer)."""
    if replicas == "per_copy" and slots is not None:
        seeds = seed_replicas(
            loads_E,
            primary,
            topology,
            cfg.replication.extra_slots_per_gpu,
            options["max_experts_per_gpu"],
            slots,
        )
        placement = per_copy_placement(
            loads_E,
            primary,
            topology,
            seeds=seeds,
            options=options,
            fitted_weights=variant.fitted_weights,
            weight_bound=variant.weight_bound,
        )
        return primary, placement
    if variant.weight_bound != replication.WEIGHT_BOUND:
        raise ValueError("weight_bound applies to replicas 'per_copy' with equal slots only")
    if affinity is None or load_slack is None:
        return primary, replicate(loads_E, primary, topology, **options)
    rebalance = Rebalance(affinity, topology, cfg, load_slack, ratio, options, group_cap)
    if spread_E is None or cfg.replication.mode != "budget" or slots is None:
        return rebalance.best(loads_E, primary, slots)
    policy = cfg.routing.policy

    def robust_max(round_: tuple[np.ndarray, ReplicaPlacement]) -> float:
        moved_E, placement = round_
        hosts = np.zeros((len(loads_E), topology.world_size), dtype=bool)
        hosts[np.arange(len(loads_E)), moved_E] = True
        for e, r in placement.pairs():
            hosts[e, r] = True
        weight_R = np.asarray(placement.rank_weights)
        robust_R = robust_gpu_loads(
            loads_E, spread_E, hosts, topology, z=variant.split_z, policy=policy, weight_R=weight_R
        )
        return float(robust_R.max())

    seeds = split_seed_replicas(
        loads_E,
        spread_E,
        primary,
        topology,
        slots,
        z=variant.split_z,
        policy=policy,
        tolerance=variant.split_tolerance,
    )
    return min(rebalance.rounds(loads_E, primary, seeds), key=robust_max)
