"""Online re-grouping: re-plan primaries and replicas from recent routing, paying for bytes moved (pure).

Shape legend: L MoE layers, E experts, R ranks, T tokens of the recent window, K top-k.

Each interval, for every layer, candidate moves are scored on the recent window:
- "replicas": the replica re-plan of ``replan`` (primaries stay; few replicas move);
- "regroup": the layer as a fresh GRACE plan fitted on the window would place it (primaries move
  too), relabelled onto the live GPUs so that as many instances as possible stay where they are
  (nodes, then GPUs inside a node, matched by the instances they share: scipy's assignment); the
  same with its replicas re-placed for the window's loads (``replan_layer``), or refined by slot
  swaps (``ds_grace.planning.batch_balance.swap_refine``); the live layer after one swap, and after
  the swaps the budget pays for (two copies each); and steps toward the regrouped layer, one node at a time
  (``node_parts``; not where a node already holds every expert), which fit a tight budget where the
  whole layer does not.
A candidate's cost is ``batch_balance.BatchObjective``: cross-node copies per token / K + (1 - mean
balancedness of batches of a forward's tokens resampled from the window), the expected loads of the
runtime's instance choice: a forward waits for its busiest GPU, and at a forward's size experts chosen
together on one GPU load it together. Its gain is the drop of that cost; its bytes are the instances
it adds on ranks that do not hold them (x the expert's bytes). Moves with a gain of at least MIN_GAIN
that add no more than LOCALITY_SLACK of the live layer's cross-node copies are taken by gain per byte,
best first, while the bytes of the interval stay within the budget
(``grace.replication.online.max_bytes_per_interval``); at most one per layer. A node that holds every
expert keeps holding every expert: the window may not use them all, the next tokens may. Every rank
that calls ``regroup`` with the same inputs gets the same plan (the batches are drawn from a seeded
generator).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ds_grace.config import GraceConfig
from ds_grace.online.replan import MIN_GAIN
from ds_grace.planning.batch_balance import BatchObjective, routed_weights, swap_refine
from ds_grace.planning.build import build_plan
from ds_grace.planning.plan import GracePlan, LayerPlan, RoutingPolicy
from ds_grace.planning.replication import replan_layer
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace

# a move may not add cross-node copies beyond this share of the live layer's (locality is kept; a
# layer whose nodes hold every expert stays so)
LOCALITY_SLACK = 0.02


@dataclass(frozen=True)
class Move:
    layer: int
    kind: str  # "replicas" or "regroup"
    plan: LayerPlan
    gain: float
    nbytes: int


@dataclass(frozen=True)
class RegroupResult:
    """plan is None when no move pays; moves are the ones taken, in the order taken."""

    plan: GracePlan | None
    moves: tuple[Move, ...]
    bytes_moved: int


def added_instances(old: LayerPlan, new: LayerPlan) -> int:
    """Instances `new` places on a rank that does not hold that expert in `old` (copies to make)."""
    return sum(1 for rank, experts in enumerate(new.slots) for e in experts if e not in old.slots[rank])


def relabel_onto(live: LayerPlan, fresh: LayerPlan, topology: Topology) -> LayerPlan:
    """`fresh` with its nodes and GPUs renamed to keep the most instances where `live` has them:
    per node pair, the GPUs matched by shared instances; then the nodes matched by the total."""
    gpus, nodes = topology.gpus_per_node, topology.num_nodes
    live_sets = [set(s) for s in live.slots]
    fresh_sets = [set(s) for s in fresh.slots]
    shared = np.array([[len(f & s) for s in live_sets] for f in fresh_sets], dtype=np.int64)
    node_score = np.zeros((nodes, nodes), dtype=np.int64)
    gpu_match: dict[tuple[int, int], np.ndarray] = {}
    for a in range(nodes):
        for b in range(nodes):
            block = shared[a * gpus : (a + 1) * gpus, b * gpus : (b + 1) * gpus]
            rows, cols = linear_sum_assignment(-block)
            node_score[a, b] = int(block[rows, cols].sum())
            gpu_match[(a, b)] = cols[np.argsort(rows)]
    node_rows, node_cols = linear_sum_assignment(-node_score)
    rank_map = np.empty(topology.world_size, dtype=np.int64)  # fresh rank -> live rank
    for a, b in zip(node_rows, node_cols):
        rank_map[a * gpus : (a + 1) * gpus] = b * gpus + gpu_match[(int(a), int(b))]
    slots: list[list[int]] = [[] for _ in range(topology.world_size)]
    weights: list[list[float]] = [[] for _ in range(topology.world_size)]
    for rank, (experts, ws) in enumerate(zip(fresh.slots, fresh.slot_weights)):
        target = int(rank_map[rank])
        kept_order = {e: i for i, e in enumerate(live.slots[target])}
        pairs = sorted(zip(experts, ws), key=lambda p: (kept_order.get(p[0], len(kept_order)), p[0]))
        slots[target] = [e for e, _ in pairs]
        weights[target] = [w for _, w in pairs]
    primary = [int(rank_map[r]) for r in fresh.primary]
    return LayerPlan.from_lists(slots=slots, primary=primary, slot_weights=weights)


def full_nodes(layer: LayerPlan, topology: Topology) -> np.ndarray:
    """full_N: the nodes whose GPUs hold an instance of every expert (no token leaves them)."""
    held_NE = np.zeros((topology.num_nodes, layer.num_experts), dtype=bool)
    for rank, experts in enumerate(layer.slots):
        held_NE[rank // topology.gpus_per_node, list(experts)] = True
    return held_NE.all(axis=1)


def keeps_full_nodes(live: LayerPlan, candidate: LayerPlan, topology: Topology) -> bool:
    """Whether every node that holds every expert in `live` still does in `candidate`."""
    return not (full_nodes(live, topology) & ~full_nodes(candidate, topology)).any()


def layer_objective(
    window: RoutingTrace,
    layer_index: int,
    topology: Topology,
    policy: RoutingPolicy,
    *,
    batch_tokens: int | None = None,
) -> BatchObjective:
    """The cost of one layer's plans on the window, at batches of batch_tokens tokens (None: the whole
    window as one batch), ``ds_grace.planning.batch_balance``."""
    ids_TK = window.topk_ids[layer_index]
    return BatchObjective.of_window(
        ids_TK, window.num_experts, topology, policy, batch_tokens=batch_tokens or len(ids_TK)
    )


def candidate_moves(
    live: GracePlan,
    window: RoutingTrace,
    *,
    config: GraceConfig,
    expert_nbytes: int,
    regroup: bool = True,
    batch_tokens: int | None = None,
    max_swaps: int | None = None,
) -> list[Move]:
    """Every layer's best paying move on the window (module doc), unsorted."""
    topology, policy = live.topology, config.routing.policy
    fresh = build_plan(window, topology=topology, config=config) if regroup else None
    loads_LE = window.loads()
    moves = []
    for index, layer in enumerate(live.layers):
        if loads_LE[index].sum() == 0:
            continue
        objective = layer_objective(window, index, topology, policy, batch_tokens=batch_tokens)
        now_copies, now_balance = objective.scores(routed_weights(layer, policy))
        most_copies = now_copies * (1.0 + LOCALITY_SLACK)
        options = [("replicas", _replicas_replanned(layer, loads_LE[index], topology, policy))]
        if fresh is not None:
            regrouped = relabel_onto(layer, fresh.layers[index], topology)
            rebalanced = _replicas_replanned(regrouped, loads_LE[index], topology, policy)
            options += [("regroup", regrouped), ("regroup", rebalanced)]
            options += [
                ("regroup", swap_refine(layer, objective, max_copies=most_copies, max_swaps=max_swaps)),
                ("regroup", swap_refine(layer, objective, max_copies=most_copies, max_swaps=1)),
                ("regroup", swap_refine(regrouped, objective, max_copies=most_copies)),
            ]
            if not full_nodes(layer, topology).any():  # else no node has locality to gain
                options += [("regroup", part) for part in node_parts(layer, regrouped, topology)]
        best: Move | None = None
        for kind, candidate in options:
            if candidate == layer or not keeps_full_nodes(layer, candidate, topology):
                continue
            copies, balance = objective.scores(routed_weights(candidate, policy))
            gain = objective.combine(now_copies, now_balance) - objective.combine(copies, balance)
            nbytes = added_instances(layer, candidate) * expert_nbytes
            if gain < MIN_GAIN or copies > most_copies + 1e-12:
                continue
            move = Move(index, kind, candidate, gain, nbytes)
            if best is None or _per_byte(move) > _per_byte(best):
                best = move
        if best is not None:
            moves.append(best)
    return moves


def node_parts(live: LayerPlan, target: LayerPlan, topology: Topology) -> list[LayerPlan]:
    """Steps toward `target`: per node, `live` with that node's GPUs as `target` has them (weights
    too), where every expert keeps an instance; an expert's primary is its target primary if that
    copy is there, else its live primary if that is, else its lowest-ranked copy."""
    gpus, parts = topology.gpus_per_node, []
    for node in range(topology.num_nodes):
        taken = range(node * gpus, (node + 1) * gpus)
        source = [target if rank in taken else live for rank in range(topology.world_size)]
        slots = [list(plan.slots[rank]) for rank, plan in enumerate(source)]
        if slots == [list(s) for s in live.slots] or len({e for s in slots for e in s}) < live.num_experts:
            continue
        primary = []
        for expert in range(live.num_experts):
            for rank in (target.primary[expert], live.primary[expert]):
                if expert in slots[rank]:
                    primary.append(rank)
                    break
            else:
                primary.append(min(r for r, held in enumerate(slots) if expert in held))
        weights = [list(plan.slot_weights[rank]) for rank, plan in enumerate(source)]
        parts.append(LayerPlan.from_lists(slots=slots, primary=primary, slot_weights=weights))
    return parts


def _replicas_replanned(
    layer: LayerPlan, loads_E: np.ndarray, topology: Topology, policy: RoutingPolicy
) -> LayerPlan:
    """`layer` with its replicas re-placed for `loads_E` (primaries and slot counts kept)."""
    replanned, _ = replan_layer(
        layer, loads_E, topology, routing_policy=policy, slots_per_gpu=[len(s) for s in layer.slots]
    )
    return replanned


def _per_byte(move: Move) -> float:
    return move.gain / max(1, move.nbytes)


def regroup(
    live: GracePlan,
    window: RoutingTrace,
    *,
    config: GraceConfig,
    expert_nbytes: int,
    max_bytes: int | None,
    regroup_primaries: bool = True,
    batch_tokens: int | None = None,
) -> RegroupResult:
    """Take the paying moves by gain per byte within `max_bytes` (None: no cap); see the module doc."""
    if window.num_layers != live.num_layers or window.num_experts != live.num_experts:
        raise ValueError(
            f"window ({window.num_layers} layers x {window.num_experts} experts) does not match the plan "
            f"({live.num_layers} x {live.num_experts})"
        )
    moves = candidate_moves(
        live,
        window,
        config=config,
        expert_nbytes=expert_nbytes,
        regroup=regroup_primaries,
        batch_tokens=batch_tokens,
        max_swaps=None if max_bytes is None else max_bytes // (2 * expert_nbytes),
    )
    taken: list[Move] = []
    spent = 0
    for move in sorted(moves, key=lambda m: (-_per_byte(m), m.layer)):
        if max_bytes is not None and spent + move.nbytes > max_bytes:
            continue
        taken.append(move)
        spent += move.nbytes
    if not taken:
        return RegroupResult(None, (), 0)
    layers = list(live.layers)
    for move in taken:
        layers[move.layer] = move.plan
    revision = int(live.meta.get("online_revision", 0)) + 1
    plan = dataclasses.replace(live, layers=tuple(layers), meta={**live.meta, "online_revision": revision})
    return RegroupResult(plan, tuple(taken), spent)
