"""``build_plan``: the single planning entry point, from routing data to a GracePlan.

Shape legend: L layers, E experts, R ranks.

Policies (same interface):
- "grace": hierarchical grouping by affinity (grace.grouping.*), then replication
  (grace.replication.*) with WRR weights for the routing policy (grace.routing.policy). By default
  (load_slack=0.0, beyond the paper) groups are also evened out by load and primaries and
  replicas are refined jointly: a replica budget of ~12 % of the experts cannot even out an
  affinity-only grouping (on the OLMoE loads balancedness fell to ~0.5-0.65 without this);
  load_slack=None keeps the paper's affinity-only grouping. With equal slots and a per-token trace
  it plans for traffic the trace did not record (grace.replication.robust; planning/robust.py);
- "contiguous": DeepSpeed-MoE's placement, one instance per expert;
- "occult": equal-size co-activation groups (nodes, then GPUs), one instance per expert;
- "eplb": load-only hierarchical replication and packing, evaluated with an even split over
  instances ("wrr" with equal weights).
Memory is per GPU: in budget mode grace and eplb give every GPU exactly S slots, all used
(``resolve_slots_per_gpu``: grace.replication.slots_per_gpu, default ceil(E / D) + extra_slots_per_gpu).
Pure and deterministic: no torch, no torch.distributed, no global state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal

import numpy as np

from ds_grace.config import GraceConfig, parse_grace_block
from ds_grace.planning.baselines import (
    contiguous_primary,
    eplb_layer,
    node_packed_layer,
    single_instance_layer,
)
from ds_grace.planning.grouping import (
    check_fits,
    hierarchical_grouping,
    rebalance_primaries,
    spread_within_nodes,
)
from ds_grace.planning.metrics import expected_gpu_loads
from ds_grace.planning.per_node import per_node_layer
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError, RoutingPolicy
from ds_grace.planning.replication import (
    ReplicaPlacement,
    instance_loads,
    layer_plan_from,
    locality_swaps,
    replicate,
    robust_gpu_loads,
    seed_replicas,
    split_seed_replicas,
)
from ds_grace.planning.robust import (
    ROBUST_VARIANT,
    Variant,
    block_loads,
    drift_ratio,
    load_spread,
    recent_loads,
    shrinkage,
    shrunk_loads,
)
from ds_grace.planning.stats import LoadSource, affinity_matrices, expert_loads, grouping_affinities
from ds_grace.topology import Topology
from ds_grace.trace import ExpertLoads, RoutingTrace

PlannerPolicy = Literal["grace", "contiguous", "occult", "eplb"]
PLANNER_POLICIES: tuple[str, ...] = ("grace", "contiguous", "occult", "eplb")
DEFAULT_LOAD_SLACK = 0.0
REBALANCE_ROUNDS = 2


def resolve_config(
    config: GraceConfig | None = None,
    *,
    grouping: Mapping[str, Any] | None = None,
    replication: Mapping[str, Any] | None = None,
    routing_policy: RoutingPolicy | None = None,
) -> GraceConfig:
    """`config` (default: GraceConfig()) with overrides of grace.grouping.* / grace.replication.*
    fields, validated like a ds_config (errors are GraceConfigError naming the field)."""
    base = GraceConfig() if config is None else config
    if not grouping and not replication and routing_policy is None:
        return base
    block = base.model_dump(exclude_unset=True)  # keeps which fields were set (slots_per_gpu check)
    block.setdefault("grouping", {}).update(dict(grouping or {}))
    block.setdefault("replication", {}).update(dict(replication or {}))
    if routing_policy is not None:
        block.setdefault("routing", {})["policy"] = routing_policy
    return parse_grace_block(block)


def resolve_slots_per_gpu(
    cfg: GraceConfig, *, num_experts: int, topology: Topology, policy: str = "grace"
) -> int | None:
    """S, the expert slots of every GPU (equal memory): grace.replication.slots_per_gpu when set, else
    ceil(E / GPUs) + grace.replication.extra_slots_per_gpu; S must be in [ceil(E / GPUs), E] and
    within grace.grouping.max_experts_per_gpu. For "grace", None (no equal budget) when replication
    is disabled or in mode "paper"; "eplb" always has S slots (ceil(E / GPUs) without replication)."""
    rep = cfg.replication
    if policy != "eplb" and (not rep.enabled or rep.mode != "budget"):
        return None
    world = topology.world_size
    if num_experts >= world:  # fewer experts than GPUs: every GPU holds S copies (planning/per_node.py)
        check_fits(num_experts, topology, cfg.grouping.max_experts_per_gpu)
    minimum = -(-num_experts // world)
    if rep.slots_per_gpu is None:
        slots = minimum + (rep.extra_slots_per_gpu if rep.enabled else 0)
        source = (
            f"ceil(E / GPUs) + grace.replication.extra_slots_per_gpu ({rep.extra_slots_per_gpu}) = {slots}"
        )
    else:
        slots = rep.slots_per_gpu
        source = f"grace.replication.slots_per_gpu ({slots})"
        if "extra_slots_per_gpu" in rep.model_fields_set and rep.extra_slots_per_gpu != slots - minimum:
            raise PlanError(
                f"grace.replication.extra_slots_per_gpu ({rep.extra_slots_per_gpu}) must equal "
                f"grace.replication.slots_per_gpu ({slots}) - ceil(E / GPUs) ({minimum}) = {slots - minimum} "
                f"for {num_experts} experts on {world} GPUs; set only one of them"
            )
    if not minimum <= slots <= num_experts:
        raise PlanError(
            f"{source} must be in [ceil(E / GPUs) = {minimum}, E = {num_experts}] for {num_experts} experts "
            f"on {world} GPUs"
        )
    cap = cfg.grouping.max_experts_per_gpu
    if cap is not None and cap < slots:
        raise PlanError(
            f"grace.grouping.max_experts_per_gpu ({cap}) is below the {slots} slots per GPU of {source}"
        )
    return slots


def _fingerprint(source: LoadSource) -> str:
    if isinstance(source, (RoutingTrace, ExpertLoads)):
        return source.fingerprint
    loads = np.ascontiguousarray(expert_loads(source))
    return hashlib.sha256(loads.tobytes() + str(loads.shape).encode()).hexdigest()[:32]


def _needs_tokens(source: LoadSource, policy: str) -> RoutingTrace:
    if not isinstance(source, RoutingTrace):
        raise PlanError(
            f"policy {policy!r} groups experts by co-activation and needs per-token routing, but the source "
            "holds loads only; derive a per-token trace (ds_grace.trace.derive_trace_from_loads), disable "
            "grace.grouping.enabled, or use policy 'eplb' or 'contiguous'"
        )
    return source


def build_plan(
    source: LoadSource,
    *,
    topology: Topology,
    policy: PlannerPolicy = "grace",
    config: GraceConfig | None = None,
    grouping: Mapping[str, Any] | None = None,
    replication: Mapping[str, Any] | None = None,
    routing_policy: RoutingPolicy | None = None,
    eplb_num_groups: int | None = None,
    load_slack: float | None = DEFAULT_LOAD_SLACK,
    variant: Variant | None = None,
) -> GracePlan:
    """Plan expert placement for `topology` from a RoutingTrace, ExpertLoads or loads_LE array.

    Options come from `config` (a GraceConfig; default GraceConfig()), overridden field by field by
    `grouping` (grace.grouping.*: enabled, ratio, affinity, max_experts_per_gpu), `replication`
    (grace.replication.*: enabled, mode, extra_slots_per_gpu) and `routing_policy`
    (grace.routing.policy). grace.grouping.max_experts_per_gpu caps the slots of every GPU for all
    policies. `eplb_num_groups` sets EPLB's expert groups (default: one expert per group).
    `load_slack` (grace only, beyond the paper): after clustering, groups are evened out by load
    until none carries more than (1 + load_slack) x the mean; None keeps the paper's pure
    affinity grouping. `variant` (grace only) overrides the planning variant
    (``ds_grace.planning.robust.Variant``; default: see ``_grace_variant``).
    """
    if policy not in PLANNER_POLICIES:
        raise PlanError(f"policy ({policy!r}) must be one of {', '.join(map(repr, PLANNER_POLICIES))}")
    cfg = resolve_config(config, grouping=grouping, replication=replication, routing_policy=routing_policy)
    loads_LE = expert_loads(source)
    num_layers, num_experts = loads_LE.shape
    world = topology.world_size
    cap = cfg.grouping.max_experts_per_gpu
    meta: dict[str, Any] = {"max_experts_per_gpu": cap}
    layers: list[LayerPlan]
    if policy == "grace" and _per_node(cfg, num_experts=num_experts, topology=topology):
        layers = _per_node_layers(source, loads_LE, topology, cfg, meta)
    elif policy == "contiguous":
        check_fits(num_experts, topology, cap)
        layer = single_instance_layer(contiguous_primary(num_experts, world), world)
        layers = [layer] * num_layers
        meta["routing_policy"] = "tar"
    elif policy == "occult":
        trace = _needs_tokens(source, policy)
        result = hierarchical_grouping(
            affinity_matrices(trace), topology, max_experts_per_gpu=cap, equal_sizes=True
        )
        layers = [single_instance_layer(primary, world) for primary in result.expert2rank_LE]
        meta.update(
            routing_policy="tar",
            kept_node_affinity=result.kept_node_affinity,
            kept_gpu_affinity=result.kept_gpu_affinity,
        )
    elif policy == "eplb":
        slots = resolve_slots_per_gpu(cfg, num_experts=num_experts, topology=topology, policy="eplb")
        extra = slots - -(-num_experts // world)
        meta["slots_per_gpu"] = slots
        layers = [
            eplb_layer(
                loads,
                topology,
                extra_slots_per_gpu=extra,
                num_groups=eplb_num_groups,
                max_experts_per_gpu=cap,
            )
            for loads in loads_LE
        ]
        meta.update(routing_policy="wrr", extra_slots_per_gpu=extra)
    else:
        chosen = _grace_variant(source, loads_LE, topology, cfg, variant)
        layers = _grace_layers(source, loads_LE, topology, cfg, meta, load_slack, chosen)
        meta["variant"] = asdict(chosen)
    return GracePlan(
        topology=topology,
        layers=tuple(layers),
        policy=policy,
        trace_fingerprint=_fingerprint(source),
        meta=meta,
    )


def _per_node(cfg: GraceConfig, *, num_experts: int, topology: Topology) -> bool:
    """Copies planned node by node (planning/per_node.py) when there are fewer experts than GPUs, or
    when a node's slots hold every expert (budget mode): then no token needs another node.
    Measured on Mixtral at 2x4, S = 2, planned on gsm8k and scored on humaneval (and back): 0 cross-node
    copies and balancedness 0.819 / 0.808, against 0.066 / 0.024 copies and 0.753 / 0.795 for the
    grouping planner (benchmarks/README.md)."""
    if num_experts < topology.world_size:
        return True
    slots = resolve_slots_per_gpu(cfg, num_experts=num_experts, topology=topology)
    return slots is not None and topology.gpus_per_node * slots >= num_experts


def _per_node_layers(
    source: LoadSource, loads_LE: np.ndarray, topology: Topology, cfg: GraceConfig, meta: dict[str, Any]
) -> list[LayerPlan]:
    """S copies on every GPU, node by node (planning/per_node.py)."""
    num_experts, world = loads_LE.shape[1], topology.world_size
    slots = resolve_slots_per_gpu(cfg, num_experts=num_experts, topology=topology)
    if slots is None:
        raise PlanError(
            f"num_experts ({num_experts}) is below the world size ({world}): every GPU needs a copy, so "
            "grace.replication must be enabled in mode 'budget'"
        )
    affinity = affinity_matrices(source) if isinstance(source, RoutingTrace) else None
    layers = [
        per_node_layer(
            loads, topology, slots_per_gpu=slots, affinity_EE=None if affinity is None else affinity[i]
        )
        for i, loads in enumerate(loads_LE)
    ]
    meta.update(
        routing_policy=cfg.routing.policy,
        slots_per_gpu=slots,
        replication={
            "enabled": True,
            "mode": "budget",
            "extra_slots_per_gpu": slots - 1,
            "slots_per_gpu": slots,
            "replicas": sum(layer.replica_count() for layer in layers),
            "per_node": True,
        },
    )
    return layers


def _grace_variant(
    source: LoadSource,
    loads_LE: np.ndarray,
    topology: Topology,
    cfg: GraceConfig,
    variant: Variant | None,
) -> Variant:
    """The planning variant: `variant` if given; else, with grace.replication.robust (default), equal
    slots and a per-token trace, ``ROBUST_VARIANT`` (planning/robust.py says why; the numbers:
    benchmarks/README.md); else the sample-fitted planner (``Variant()``)."""
    if variant is not None:
        return variant
    slots = resolve_slots_per_gpu(cfg, num_experts=loads_LE.shape[1], topology=topology)
    if cfg.replication.robust and slots is not None and isinstance(source, RoutingTrace):
        return ROBUST_VARIANT
    return Variant()


def _grace_layers(
    source: LoadSource,
    loads_LE: np.ndarray,
    topology: Topology,
    cfg: GraceConfig,
    meta: dict[str, Any],
    load_slack: float | None,
    variant: Variant,
) -> list[LayerPlan]:
    world = topology.world_size
    num_layers, num_experts = loads_LE.shape
    slots = resolve_slots_per_gpu(cfg, num_experts=num_experts, topology=topology)
    sampled = isinstance(source, RoutingTrace)
    lam_L = shrinkage(source) if sampled else np.zeros(num_layers)
    if variant.recency is not None and sampled:
        recent_LE = recent_loads(source, variant.recency)
        if variant.recency_gate is None:
            loads_LE = recent_LE
        else:  # only layers whose halves differ beyond sampling noise
            loads_LE = np.where((drift_ratio(source) > variant.recency_gate)[:, None], recent_LE, loads_LE)
    blocks_LBE = block_loads(source, variant.blocks) if variant.blocks > 1 and sampled else None
    if variant.shrunk_loads and sampled:
        loads_LE = shrunk_loads(loads_LE, lam_L)
        if blocks_LBE is not None:
            blocks_LBE = np.stack(
                [shrunk_loads(blocks_LBE[:, b], lam_L) for b in range(variant.blocks)], axis=1
            )
    if variant.jitter > 0:  # the planner's sensitivity to its inputs (noise floor: benchmarks/README.md)
        noise_LE = np.random.default_rng(variant.jitter_seed).standard_normal(loads_LE.shape)
        loads_LE = loads_LE * (1.0 + variant.jitter * noise_LE)
    # drifting layers (shrinkage >= variant.drift_shrinkage) get variant.replicas on loads raised by
    # their spread; the others the budget greedy (measured: benchmarks/README.md)
    drifting_L = np.ones(num_layers, dtype=bool)
    if variant.drift_shrinkage is not None:
        drifting_L = lam_L >= variant.drift_shrinkage
    if variant.uncertainty > 0 and sampled:
        loads_LE = loads_LE + variant.uncertainty * load_spread(source) * drifting_L[:, None]
    # on drifting layers (the recency gate): replicas split inside nodes (variant.split_z) and swapped
    # for locality (variant.swap_tolerance); measured: benchmarks/README.md
    spread_LE = np.zeros_like(loads_LE)
    split_L = swap_L = np.zeros(num_layers, dtype=bool)
    if (variant.split_z > 0 or variant.swap_tolerance is not None) and sampled and slots is not None:
        spread_LE = load_spread(source)
        gate_L = np.ones(num_layers, dtype=bool)
        if variant.recency_gate is not None:
            gate_L = drift_ratio(source) > variant.recency_gate
        split_L = gate_L & (variant.split_z > 0)
        swap_L = gate_L & (variant.swap_tolerance is not None)
    cap = cfg.grouping.max_experts_per_gpu if slots is None else slots
    # primaries per GPU: up to S, or ceil(E / GPUs) so that every GPU keeps room for replicas
    group_cap = cap if slots is None or not variant.replica_room else -(-num_experts // world)
    routing: RoutingPolicy = cfg.routing.policy
    intra: list[np.ndarray] | None = None
    if cfg.grouping.enabled:
        trace = _needs_tokens(source, "grace")
        affinities = grouping_affinities(trace, cfg.grouping.affinity)
        intra = affinities if cfg.grouping.affinity == "intra" else affinity_matrices(trace)
        result = hierarchical_grouping(
            affinities,
            topology,
            ratio=cfg.grouping.ratio,
            max_experts_per_gpu=group_cap,
            loads_LE=loads_LE,
            load_slack=load_slack,
        )
        primaries = result.expert2rank_LE
        if variant.spread:
            primaries = np.stack(
                [
                    spread_within_nodes(
                        primaries[i],
                        loads_LE[i],
                        intra[i],
                        topology,
                        block_loads_BE=None if blocks_LBE is None else blocks_LBE[i],
                    )
                    for i in range(num_layers)
                ]
            )
        meta["grouping"] = {
            "affinity": cfg.grouping.affinity,
            "ratio": result.ratio,
            "ratio_curve": [list(point) for point in result.ratio_curve],
            "kept_node_affinity": result.kept_node_affinity,
            "kept_gpu_affinity": result.kept_gpu_affinity,
            "load_slack": load_slack,
        }
    else:
        check_fits(num_experts, topology, cap)
        primaries = np.tile(contiguous_primary(num_experts, world), (num_layers, 1))
        if isinstance(source, RoutingTrace):
            intra = affinity_matrices(source)
    rep = cfg.replication
    layers, predicted_balance = [], []
    for index in range(num_layers):
        if not rep.enabled:
            layers.append(single_instance_layer(primaries[index], world))
            continue
        options = dict(
            mode=rep.mode,
            extra_slots_per_gpu=rep.extra_slots_per_gpu,
            max_experts_per_gpu=cap,
            routing_policy=routing,
            affinity_EE=None if intra is None else intra[index],
            slots_per_gpu=slots,
            weight_bound=variant.weight_bound,
        )
        primary = primaries[index]
        replicas = variant.replicas if drifting_L[index] else "greedy"
        if replicas == "node_packed" and slots is not None:
            layer = node_packed_layer(
                loads_LE[index], primary // topology.gpus_per_node, topology, slots_per_gpu=slots
            )
            layers.append(layer)
            gpu = expected_gpu_loads(loads_LE[index], layer, topology, routing)
            predicted_balance.append(float(gpu.mean() / gpu.max()) if gpu.max() > 0 else 1.0)
            continue
        if replicas == "per_copy" and slots is not None:
            seeds = seed_replicas(loads_LE[index], primary, topology, rep.extra_slots_per_gpu, cap, slots)
            placement = replicate(
                loads_LE[index],
                primary,
                topology,
                initial=seeds,
                greedy=False,
                fit_weights=variant.fitted_weights,
                **options,
            )
        elif cfg.grouping.enabled and load_slack is not None:
            primary, placement = _rebalance(
                loads_LE[index],
                primary,
                affinities[index],
                topology,
                cfg,
                load_slack,
                meta["grouping"]["ratio"],
                options,
                group_cap,
                slots,
                split=(spread_LE[index], variant) if split_L[index] else None,
            )
        else:
            placement = replicate(loads_LE[index], primary, topology, **options)
        if swap_L[index]:
            swapped = locality_swaps(
                loads_LE[index],
                spread_LE[index],
                primary,
                placement.pairs(),
                source.topk_ids[index],
                topology,
                z=variant.split_z,
                tolerance=float(variant.swap_tolerance),
                policy=routing,
                weight_R=np.asarray(placement.rank_weights),
            )
            if set(swapped) != set(placement.pairs()):  # same replicas per GPU; WRR weights refitted
                placement = replicate(
                    loads_LE[index], primary, topology, initial=swapped, greedy=False, **options
                )
        layers.append(layer_plan_from(primary, placement, num_ranks=world))
        gpu = np.asarray(placement.predicted_gpu_loads)
        predicted_balance.append(float(gpu.mean() / gpu.max()) if gpu.max() > 0 else 1.0)
    meta["routing_policy"] = routing
    meta["replication"] = {
        "enabled": rep.enabled,
        "mode": rep.mode,
        "extra_slots_per_gpu": rep.extra_slots_per_gpu if slots is None else slots - -(-num_experts // world),
        "slots_per_gpu": slots,
        "replicas": sum(layer.replica_count() for layer in layers),
        "predicted_balancedness": float(np.mean(predicted_balance)) if predicted_balance else None,
        "drifting_layers": [int(i) for i in np.flatnonzero(drifting_L)]
        if variant.replicas != "greedy"
        else [],
    }
    return layers


def _max_load(placement: ReplicaPlacement) -> float:
    return max(placement.predicted_gpu_loads)


def _rebalance(
    loads_E: np.ndarray,
    primary: np.ndarray,
    affinity: np.ndarray,
    topology: Topology,
    cfg: GraceConfig,
    load_slack: float,
    ratio: float | None,
    options: dict[str, Any],
    cap: int | None,
    slots: int | None,
    split: tuple[np.ndarray, Variant] | None = None,
) -> tuple[np.ndarray, ReplicaPlacement]:
    """Primaries and replicas, jointly (beyond the paper): start from a load-only replica guess
    (budget mode) or the paper's replicas, move primaries away from where replicas are, replicate
    again starting from the replicas that still fit; keep the round with the lowest max GPU load.
    ``split`` (spread_E, variant; measured, not the default): the guess is ``split_seed_replicas``
    and rounds are scored by the max of ``robust_gpu_loads``."""
    budget = cfg.replication.mode == "budget"
    rounds: list[tuple[np.ndarray, ReplicaPlacement]] = []
    split_seeds = budget and split is not None and slots is not None

    def score(round_: tuple[np.ndarray, ReplicaPlacement]) -> float:
        moved_E, placement = round_
        if not split_seeds or split is None:
            return _max_load(placement)
        hosts = np.zeros((len(loads_E), topology.world_size), dtype=bool)
        hosts[np.arange(len(loads_E)), moved_E] = True
        for e, r in placement.pairs():
            hosts[e, r] = True
        robust_R = robust_gpu_loads(
            loads_E,
            split[0],
            hosts,
            topology,
            z=split[1].split_z,
            policy=cfg.routing.policy,
            weight_R=np.asarray(placement.rank_weights),
        )
        return float(robust_R.max())

    if split_seeds and split is not None and slots is not None:
        pairs = split_seed_replicas(
            loads_E,
            split[0],
            primary,
            topology,
            slots,
            z=split[1].split_z,
            policy=cfg.routing.policy,
            tolerance=split[1].split_tolerance,
        )
    elif budget:
        pairs = seed_replicas(loads_E, primary, topology, cfg.replication.extra_slots_per_gpu, cap, slots)
    else:
        rounds.append((primary, replicate(loads_E, primary, topology, **options)))
        pairs = rounds[0][1].pairs()
    weights = np.ones(topology.world_size)
    for _ in range(REBALANCE_ROUNDS):
        hosts = np.zeros((len(loads_E), topology.world_size), dtype=bool)
        hosts[np.arange(len(loads_E)), primary] = True
        replica_hosts = np.zeros_like(hosts)
        for e, r in pairs:
            replica_hosts[e, r] = True
        instance_ER = instance_loads(
            loads_E, hosts | replica_hosts, weights, topology, cfg.routing.policy, primary
        )
        moved = rebalance_primaries(
            primary,
            affinity,
            instance_ER,
            replica_hosts,
            topology,
            ratio=ratio,
            max_experts_per_gpu=cap,
            slack=load_slack,
        )
        kept = [(e, r) for e, r in pairs if moved[e] != r]
        if budget:  # start from the replicas that still fit, spend what is left
            candidate = replicate(loads_E, moved, topology, initial=kept, **options)
        else:  # the paper's rule again, preferring the replicas already placed
            candidate = replicate(loads_E, moved, topology, previous=kept, **options)
        rounds.append((moved, candidate))
        if np.array_equal(moved, primary) and set(candidate.pairs()) == set(pairs):
            break
        primary, pairs, weights = moved, candidate.pairs(), np.asarray(candidate.rank_weights)
    return min(rounds, key=score)
