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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from ds_grace.config import GraceConfig, parse_grace_block
from ds_grace.planning.baselines import contiguous_primary, eplb_layer, single_instance_layer
from ds_grace.planning.grouping import (
    check_fits,
    hierarchical_grouping,
    rebalance_primaries,
    spread_within_nodes,
)
from ds_grace.planning.per_node import per_node_layer
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError, RoutingPolicy
from ds_grace.planning.replication import (
    ReplicaPlacement,
    instance_loads,
    layer_plan_from,
    locality_swaps,
    replicate,
    seed_replicas,
)
from ds_grace.planning.robust import (
    ROBUST_VARIANT,
    SAMPLE_FITTED,
    Variant,
    drift_ratio,
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
        layers = _grace_layers(source, topology, cfg, meta=meta, load_slack=load_slack, variant=chosen)
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
    benchmarks/README.md); else the sample-fitted planner (``SAMPLE_FITTED``)."""
    if variant is not None:
        return variant
    slots = resolve_slots_per_gpu(cfg, num_experts=loads_LE.shape[1], topology=topology)
    if cfg.replication.robust and slots is not None and isinstance(source, RoutingTrace):
        return ROBUST_VARIANT
    return SAMPLE_FITTED


def planning_loads(source: LoadSource, loads_LE: np.ndarray, variant: Variant) -> np.ndarray:
    """loads_LE the grace planner plans on: recent loads on the layers the recency gate picks, then
    shrunk toward their mean (planning/robust.py); the loads as given without per-token data."""
    if not isinstance(source, RoutingTrace):
        return loads_LE
    if variant.recency is not None:
        recent_LE = recent_loads(source, variant.recency)
        loads_LE = np.where(recency_gate(source, variant)[:, None], recent_LE, loads_LE)
    if variant.shrunk_loads:
        loads_LE = shrunk_loads(loads_LE, shrinkage(source))
    return loads_LE


def recency_gate(source: RoutingTrace, variant: Variant) -> np.ndarray:
    """gate_L: the layers whose sample drifts (drift_ratio > variant.recency_gate; every layer if None)."""
    if variant.recency_gate is None:
        return np.ones(source.num_layers, dtype=bool)
    return drift_ratio(source) > variant.recency_gate


def slot_caps(
    cfg: GraceConfig, *, slots: int | None, num_experts: int, world: int, variant: Variant
) -> tuple[int | None, int | None]:
    """(cap, group_cap): slots per GPU (S; without equal slots grace.grouping.max_experts_per_gpu) and
    primaries per GPU (up to cap, or ceil(E / GPUs) with variant.replica_room so that every GPU keeps
    room for replicas)."""
    cap = cfg.grouping.max_experts_per_gpu if slots is None else slots
    return cap, cap if slots is None or not variant.replica_room else -(-num_experts // world)


def group_primaries(
    source: LoadSource,
    loads_LE: np.ndarray,
    topology: Topology,
    cfg: GraceConfig,
    meta: dict[str, Any],
    *,
    load_slack: float | None,
    caps: tuple[int | None, int | None],
    spread: bool,
) -> tuple[np.ndarray, list[np.ndarray] | None, list[np.ndarray] | None]:
    """(primaries_LE, grouping affinities, intra-layer affinities): hierarchical grouping by affinity
    with at most caps[1] primaries per GPU (then ``spread_within_nodes`` if `spread`), or contiguous
    primaries within caps[0] slots per GPU without grouping (``slot_caps``)."""
    num_layers, num_experts = loads_LE.shape
    cap, group_cap = caps
    if not cfg.grouping.enabled:
        check_fits(num_experts, topology, cap)
        primaries = np.tile(contiguous_primary(num_experts, topology.world_size), (num_layers, 1))
        intra = affinity_matrices(source) if isinstance(source, RoutingTrace) else None
        return primaries, None, intra
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
    if spread:
        primaries = np.stack(
            [spread_within_nodes(primaries[i], loads_LE[i], intra[i], topology) for i in range(num_layers)]
        )
    meta["grouping"] = {
        "affinity": cfg.grouping.affinity,
        "ratio": result.ratio,
        "ratio_curve": [list(point) for point in result.ratio_curve],
        "kept_node_affinity": result.kept_node_affinity,
        "kept_gpu_affinity": result.kept_gpu_affinity,
        "load_slack": load_slack,
    }
    return primaries, affinities, intra


def replica_options(
    cfg: GraceConfig, *, cap: int | None, slots: int | None, affinity_EE: np.ndarray | None
) -> dict:
    """The keyword arguments of ``replicate`` for one layer under `cfg`."""
    rep = cfg.replication
    return dict(
        mode=rep.mode,
        extra_slots_per_gpu=rep.extra_slots_per_gpu,
        max_experts_per_gpu=cap,
        routing_policy=cfg.routing.policy,
        affinity_EE=affinity_EE,
        slots_per_gpu=slots,
    )


def swap_for_locality(
    loads_E: np.ndarray,
    primary: np.ndarray,
    placement: ReplicaPlacement,
    ids_TK: np.ndarray,
    topology: Topology,
    *,
    tolerance: float,
    options: dict[str, Any],
) -> ReplicaPlacement:
    """``locality_swaps`` on `placement`; if any replica moved, WRR weights refitted (same slots)."""
    swapped = locality_swaps(
        loads_E,
        primary,
        placement.pairs(),
        ids_TK,
        topology,
        tolerance=tolerance,
        policy=options["routing_policy"],
        weight_R=np.asarray(placement.rank_weights),
    )
    if set(swapped) == set(placement.pairs()):
        return placement
    return replicate(loads_E, primary, topology, initial=swapped, greedy=False, **options)


def predicted_balancedness(gpu_R: np.ndarray) -> float:
    gpu = np.asarray(gpu_R)
    return float(gpu.mean() / gpu.max()) if gpu.max() > 0 else 1.0


def replication_meta(
    cfg: GraceConfig,
    layers: list[LayerPlan],
    *,
    num_experts: int,
    world: int,
    slots: int | None,
    balance: list[float],
) -> dict[str, Any]:
    """meta["replication"] of a grace plan."""
    rep = cfg.replication
    return {
        "enabled": rep.enabled,
        "mode": rep.mode,
        "extra_slots_per_gpu": rep.extra_slots_per_gpu if slots is None else slots - -(-num_experts // world),
        "slots_per_gpu": slots,
        "replicas": sum(layer.replica_count() for layer in layers),
        "predicted_balancedness": float(np.mean(balance)) if balance else None,
    }


def _grace_layers(
    source: LoadSource, topology: Topology, cfg: GraceConfig, *, meta: dict[str, Any], load_slack: float | None,
    variant: Variant,
) -> list[LayerPlan]:  # fmt: skip
    """The grace planner's layers under `variant`, planned on ``planning_loads``."""
    world = topology.world_size
    loads_LE = planning_loads(source, expert_loads(source), variant)
    num_layers, num_experts = loads_LE.shape
    slots = resolve_slots_per_gpu(cfg, num_experts=num_experts, topology=topology)
    swap_L = np.zeros(num_layers, dtype=bool)
    if variant.swap_tolerance is not None and isinstance(source, RoutingTrace) and slots is not None:
        swap_L = recency_gate(source, variant)  # drifting layers: replicas swapped for locality
    cap, group_cap = slot_caps(cfg, slots=slots, num_experts=num_experts, world=world, variant=variant)
    primaries, affinities, intra = group_primaries(
        source,
        loads_LE,
        topology,
        cfg,
        meta,
        load_slack=load_slack,
        caps=(cap, group_cap),
        spread=variant.spread,
    )

    def place(index: int, options: dict[str, Any]) -> tuple[np.ndarray, ReplicaPlacement]:
        if affinities is None or load_slack is None:
            return primaries[index], replicate(loads_LE[index], primaries[index], topology, **options)
        rebalance = Rebalance(
            affinities[index], topology, cfg, load_slack, meta["grouping"]["ratio"], options, group_cap
        )
        return rebalance.best(loads_LE[index], primaries[index], slots)

    swaps = (swap_L, variant.swap_tolerance)
    return replica_layers(source, loads_LE, primaries, topology, cfg, meta, caps=(cap, slots), intra=intra, swaps=swaps, place=place)  # fmt: skip


LayerPlacer = Callable[[int, dict[str, Any]], tuple[np.ndarray, ReplicaPlacement]]


def replica_layers(
    source: LoadSource,
    loads_LE: np.ndarray,
    primaries_LE: np.ndarray,
    topology: Topology,
    cfg: GraceConfig,
    meta: dict[str, Any],
    *,
    caps: tuple[int | None, int | None],
    intra: list[np.ndarray] | None,
    swaps: tuple[np.ndarray, float | None],
    place: LayerPlacer,
) -> list[LayerPlan]:
    """The layers: per layer, one instance per expert without replication, else `place` (layer index,
    ``replica_options`` under caps = (cap, S)) gives the primaries and replicas, whose replicas are
    swapped toward locality (``swap_for_locality``) on the layers swaps[0] marks, within tolerance
    swaps[1]. Sets meta["routing_policy"] and meta["replication"] (``replication_meta``)."""
    world = topology.world_size
    cap, slots = caps
    swap_L, tolerance = swaps
    layers, predicted_balance = [], []
    for index, primary in enumerate(primaries_LE):
        if not cfg.replication.enabled:
            layers.append(single_instance_layer(primary, world))
            continue
        options = replica_options(
            cfg, cap=cap, slots=slots, affinity_EE=None if intra is None else intra[index]
        )
        primary, placement = place(index, options)
        if swap_L[index]:
            placement = swap_for_locality(
                loads_LE[index], primary, placement, source.topk_ids[index], topology,
                tolerance=float(tolerance), options=options,
            )  # fmt: skip
        layers.append(layer_plan_from(primary, placement, num_ranks=world))
        predicted_balance.append(predicted_balancedness(placement.predicted_gpu_loads))
    meta["routing_policy"] = cfg.routing.policy
    meta["replication"] = replication_meta(
        cfg, layers, num_experts=loads_LE.shape[1], world=world, slots=slots, balance=predicted_balance
    )
    return layers


def _max_load(round_: tuple[np.ndarray, ReplicaPlacement]) -> float:
    return max(round_[1].predicted_gpu_loads)


@dataclass(frozen=True)
class Rebalance:
    """Primaries and replicas of one layer, jointly (beyond the paper): what moving primaries away
    from where replicas are needs (the layer's grouping affinity, grace.grouping.ratio, the
    ``replicate`` options, the primaries-per-GPU cap)."""

    affinity_EE: np.ndarray
    topology: Topology
    cfg: GraceConfig
    load_slack: float
    ratio: float | None
    options: dict[str, Any]
    cap: int | None

    def best(
        self, loads_E: np.ndarray, primary_E: np.ndarray, slots: int | None
    ) -> tuple[np.ndarray, ReplicaPlacement]:
        """Start from a load-only replica guess (budget mode, ``seed_replicas``) or the paper's
        replicas, then ``rounds``; keep the round with the lowest max GPU load."""
        first: list[tuple[np.ndarray, ReplicaPlacement]] = []
        if self.cfg.replication.mode == "budget":
            extra = self.cfg.replication.extra_slots_per_gpu
            pairs = seed_replicas(loads_E, primary_E, self.topology, extra, self.cap, slots)
        else:
            first.append((primary_E, replicate(loads_E, primary_E, self.topology, **self.options)))
            pairs = first[0][1].pairs()
        return min(first + self.rounds(loads_E, primary_E, pairs), key=_max_load)

    def rounds(
        self, loads_E: np.ndarray, primary_E: np.ndarray, pairs: list[tuple[int, int]]
    ) -> list[tuple[np.ndarray, ReplicaPlacement]]:
        """Up to REBALANCE_ROUNDS (primaries, replicas) rounds from the replicas `pairs`: move
        primaries away from where replicas are, replicate again starting from the replicas that
        still fit."""
        budget = self.cfg.replication.mode == "budget"
        topology, primary = self.topology, primary_E
        rounds: list[tuple[np.ndarray, ReplicaPlacement]] = []
        weights = np.ones(topology.world_size)
        for _ in range(REBALANCE_ROUNDS):
            hosts = np.zeros((len(loads_E), topology.world_size), dtype=bool)
            hosts[np.arange(len(loads_E)), primary] = True
            replica_hosts = np.zeros_like(hosts)
            for e, r in pairs:
                replica_hosts[e, r] = True
            instance_ER = instance_loads(
                loads_E, hosts | replica_hosts, weights, topology, self.cfg.routing.policy, primary
            )
            moved = rebalance_primaries(
                primary,
                self.affinity_EE,
                instance_ER,
                replica_hosts,
                topology,
                ratio=self.ratio,
                max_experts_per_gpu=self.cap,
                slack=self.load_slack,
            )
            kept = [(e, r) for e, r in pairs if moved[e] != r]
            if budget:  # start from the replicas that still fit, spend what is left
                candidate = replicate(loads_E, moved, topology, initial=kept, **self.options)
            else:  # the paper's rule again, preferring the replicas already placed
                candidate = replicate(loads_E, moved, topology, previous=kept, **self.options)
            rounds.append((moved, candidate))
            if np.array_equal(moved, primary) and set(candidate.pairs()) == set(pairs):
                break
            primary, pairs, weights = moved, candidate.pairs(), np.asarray(candidate.rank_weights)
        return rounds
