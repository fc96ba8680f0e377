"""Baseline placements with the planner's interface: DeepSpeed's contiguous placement and an
EPLB-style load-only hierarchical replication and packing (DeepSeek EPLB's published algorithm,
reimplemented here). The Occult baseline (equal-size co-activation groups) is
``hierarchical_grouping(..., equal_sizes=True)`` with no replication.

Shape legend: L layers, E experts, R ranks, X items being packed, P physical slots.
"""

from __future__ import annotations

import numpy as np

from ds_grace.planning.plan import LayerPlan, PlanError
from ds_grace.topology import Topology


def contiguous_primary(num_experts: int, world_size: int) -> np.ndarray:
    """expert2rank_E of DeepSpeed-MoE: rank r holds experts r*E/D .. (r+1)*E/D - 1."""
    if num_experts < world_size:
        raise PlanError(
            f"num_experts ({num_experts}) must be >= the world size ({world_size}) for a contiguous placement"
        )
    return np.arange(num_experts, dtype=np.int64) * world_size // num_experts


def single_instance_layer(expert2rank_E: np.ndarray, world_size: int) -> LayerPlan:
    """A LayerPlan with exactly one instance per expert (no replicas)."""
    slots = [np.flatnonzero(expert2rank_E == r).tolist() for r in range(world_size)]
    return LayerPlan.from_lists(slots=slots, primary=[int(r) for r in expert2rank_E])


def _balanced_packing(
    weight_X: np.ndarray, num_packs: int, items_per_pack: int, label_X: np.ndarray | None = None
) -> np.ndarray:
    """pack_X: heaviest item first into the lightest pack with room (and without its label)."""
    num_items = len(weight_X)
    if num_items != num_packs * items_per_pack:
        raise PlanError(f"cannot pack {num_items} items into {num_packs} packs of {items_per_pack}")
    label = np.arange(num_items) if label_X is None else label_X
    pack_X = np.full(num_items, -1, dtype=np.int64)
    pack_load = np.zeros(num_packs)
    pack_count = np.zeros(num_packs, dtype=np.int64)
    for item in np.lexsort((np.arange(num_items), -weight_X)):
        taken = np.zeros(num_packs, dtype=bool)
        taken[pack_X[(label == label[item]) & (pack_X >= 0)]] = True
        allowed = np.flatnonzero((pack_count < items_per_pack) & ~taken)
        if len(allowed) == 0:
            _swap_in(item, pack_X, label, pack_count, items_per_pack, weight_X, pack_load)
            continue
        pack = int(allowed[np.argmin(pack_load[allowed])])
        pack_X[item] = pack
        pack_load[pack] += weight_X[item]
        pack_count[pack] += 1
    return pack_X


def _swap_in(
    item: int,
    pack_X: np.ndarray,
    label: np.ndarray,
    pack_count: np.ndarray,
    items_per_pack: int,
    weight_X: np.ndarray,
    pack_load: np.ndarray,
) -> None:
    """Every pack with room already holds item's label: move an item out of a full pack into it."""
    for room in np.flatnonzero(pack_count < items_per_pack):
        for other in np.flatnonzero(pack_X >= 0):
            target = pack_X[other]
            if target == room:
                continue
            target_labels = set(label[pack_X == target].tolist()) - {label[other]}
            room_labels = set(label[pack_X == room].tolist())
            if label[item] not in target_labels and label[other] not in room_labels:
                pack_X[other], pack_X[item] = room, target
                pack_load[target] += weight_X[item] - weight_X[other]
                pack_load[room] += weight_X[other]
                pack_count[room] += 1
                return
    raise PlanError("EPLB packing cannot keep instances of one expert on distinct GPUs")


def _replicate(weight_X: np.ndarray, num_physical: int, max_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(phy2log_P, logcnt_X): add replicas one at a time to the expert with the largest load per copy."""
    logcnt = np.ones(len(weight_X), dtype=np.int64)
    phy2log = list(range(len(weight_X)))
    for _ in range(num_physical - len(weight_X)):
        per_copy = np.where(logcnt < max_count, weight_X / logcnt, -np.inf)
        chosen = int(np.argmax(per_copy))
        if per_copy[chosen] == -np.inf:
            raise PlanError(
                f"{num_physical} physical slots need more than {max_count} instances of an expert; "
                "lower grace.replication.extra_slots_per_gpu"
            )
        phy2log.append(chosen)
        logcnt[chosen] += 1
    return np.array(phy2log, dtype=np.int64), logcnt


def eplb_layer(
    loads_E: np.ndarray,
    topology: Topology,
    *,
    extra_slots_per_gpu: int,
    num_groups: int | None = None,
    max_experts_per_gpu: int | None = None,
) -> LayerPlan:
    """EPLB-style placement of one layer: every GPU gets exactly ceil(E / D) + extra_slots_per_gpu
    slots (at most E: one GPU never holds two copies of an expert), every slot used.

    Hierarchical when num_groups divides into the nodes (E % num_groups == 0 and
    num_groups % N == 0): pack expert groups onto nodes by load, replicate inside each node (one more
    copy of the expert with the largest load per copy, repeatedly), pack the copies onto the node's
    GPUs by load per copy. Otherwise the global policy: the same on one node of D GPUs. num_groups
    defaults to E (groups of one expert). Unlike DeepSeek's reference, two copies of one expert never
    share a GPU (the plan format forbids it). All instances get WRR weight 1 (even split).
    """
    loads = np.asarray(loads_E, dtype=np.float64)
    num_experts, world = len(loads), topology.world_size
    per_gpu = -(-num_experts // world) + extra_slots_per_gpu
    if max_experts_per_gpu is not None and per_gpu > max_experts_per_gpu:
        raise PlanError(
            f"grace.grouping.max_experts_per_gpu ({max_experts_per_gpu}) is below the {per_gpu} slots per GPU "
            "an EPLB plan with this many extra slots needs"
        )
    if per_gpu > num_experts:
        raise PlanError(
            f"an EPLB plan with {per_gpu} slots per GPU would hold an expert twice on one GPU; "
            f"at most E = {num_experts} slots per GPU"
        )
    num_groups = num_experts if num_groups is None else num_groups
    # hierarchical when the groups divide into the nodes and a node's experts fill its GPUs' slots
    # (more slots per GPU than experts per node would need two copies on one GPU): else global
    if (
        num_groups >= 1
        and num_experts % num_groups == 0
        and num_groups % topology.num_nodes == 0
        and per_gpu <= num_experts // topology.num_nodes
    ):
        num_nodes, gpus = topology.num_nodes, topology.gpus_per_node
    else:
        num_nodes, gpus, num_groups = 1, world, 1
    group_size = num_experts // num_groups
    group_load = loads.reshape(num_groups, group_size).sum(axis=1)
    group2node = _balanced_packing(group_load, num_nodes, num_groups // num_nodes)
    slots: list[list[int]] = [[] for _ in range(world)]
    for node in range(num_nodes):
        groups = np.flatnonzero(group2node == node)
        experts = (groups[:, None] * group_size + np.arange(group_size)[None, :]).ravel()
        fill_node(slots, experts, loads[experts], first_rank=node * gpus, gpus=gpus, slots_per_gpu=per_gpu)
    return layer_from_slots(slots, num_experts)


def fill_node(
    slots: list[list[int]],
    experts_X: np.ndarray,
    loads_X: np.ndarray,
    *,
    first_rank: int,
    gpus: int,
    slots_per_gpu: int,
) -> None:
    """EPLB's intra-node step: copies to the expert with the largest load per copy until the node's
    gpus x slots_per_gpu slots are full (at most one per GPU), packed heaviest first onto the GPUs
    first_rank .. first_rank + gpus - 1 of `slots` (appended)."""
    phy2local, count = _replicate(loads_X, slots_per_gpu * gpus, max_count=gpus)
    per_copy = loads_X[phy2local] / count[phy2local]
    phy2gpu = _balanced_packing(per_copy, gpus, slots_per_gpu, label_X=phy2local)
    for phy, gpu in enumerate(phy2gpu):
        slots[first_rank + int(gpu)].append(int(experts_X[phy2local[phy]]))


def layer_from_slots(slots: list[list[int]], num_experts: int) -> LayerPlan:
    """The LayerPlan of `slots` (sorted per rank), every expert's primary its copy on the lowest rank."""
    ordered = [sorted(s) for s in slots]
    primary = [min(r for r, held in enumerate(ordered) if e in held) for e in range(num_experts)]
    return LayerPlan.from_lists(slots=ordered, primary=primary)
