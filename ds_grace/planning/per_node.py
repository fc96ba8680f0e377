"""Placement when there are fewer experts than GPUs (E < R): copies planned node by node.

Shape legend: E experts, R ranks (GPUs), N nodes, G GPUs per node, S slots per GPU.

Every GPU holds exactly S expert slots (R x S >= E copies). Each node fills its G x S slots with the
experts its tokens need most: every expert when G x S >= E (then no token leaves its node, since
the runtime's TAR choice takes an instance on the token's own node first), else the node's share of
a co-activation grouping of the experts into nodes plus the heaviest experts it lacks. The slots left
go, one at a time, to the expert with the largest load per copy (at most one copy per GPU), and the
copies are packed onto the node's GPUs heaviest first (EPLB's intra-node step). WRR weights are 1
(an even split over a node's copies). Pure: no torch.
"""

from __future__ import annotations

import numpy as np

from ds_grace.planning.baselines import fill_node, layer_from_slots
from ds_grace.planning.grouping import hierarchical_grouping
from ds_grace.planning.plan import LayerPlan, PlanError
from ds_grace.topology import Topology


def check_slots_cover(num_experts: int, topology: Topology, slots_per_gpu: int) -> None:
    """Raise PlanError unless S slots on every GPU hold every expert (R x S >= E) and S <= E."""
    world = topology.world_size
    if not 1 <= slots_per_gpu <= num_experts or world * slots_per_gpu < num_experts:
        raise PlanError(
            f"slots per GPU ({slots_per_gpu}) must be in [ceil(E / GPUs) = {-(-num_experts // world)}, "
            f"E = {num_experts}] so that {world} GPUs hold all {num_experts} experts"
        )


def node_members(
    loads_E: np.ndarray, affinity_EE: np.ndarray | None, topology: Topology, slots_per_gpu: int
) -> list[np.ndarray]:
    """The experts each node holds (each at least once somewhere): all of them when a node's
    G x S slots can; else a co-activation grouping into nodes topped up with the heaviest missing."""
    num_experts = len(loads_E)
    node_slots = topology.gpus_per_node * slots_per_gpu
    if node_slots >= num_experts:
        return [np.arange(num_experts) for _ in range(topology.num_nodes)]
    num_nodes = topology.num_nodes
    if num_experts >= num_nodes and affinity_EE is not None:
        home_E = hierarchical_grouping(
            [affinity_EE],
            Topology(num_nodes=num_nodes, gpus_per_node=1),
            max_experts_per_gpu=node_slots,
            loads_LE=np.asarray(loads_E, dtype=np.float64)[None, :],
            load_slack=0.0,
        ).expert2rank_LE[0]
    else:  # fewer experts than nodes (or no affinity): expert e's home is node e mod N, heaviest first
        home_E = np.empty(num_experts, dtype=np.int64)
        home_E[np.argsort(-np.asarray(loads_E), kind="stable")] = np.arange(num_experts) % num_nodes
    members = []
    for node in range(num_nodes):
        own = np.flatnonzero(home_E == node)
        missing = [int(e) for e in np.argsort(-np.asarray(loads_E), kind="stable") if home_E[e] != node]
        members.append(np.sort(np.concatenate([own, missing[: node_slots - len(own)]]).astype(np.int64)))
    return members


def per_node_layer(
    loads_E: np.ndarray,
    topology: Topology,
    *,
    slots_per_gpu: int,
    affinity_EE: np.ndarray | None = None,
) -> LayerPlan:
    """A layer with exactly `slots_per_gpu` slots on every GPU, filled node by node (module doc).
    The primary of an expert is its copy on the lowest rank."""
    loads = np.asarray(loads_E, dtype=np.float64)
    num_experts, gpus = len(loads), topology.gpus_per_node
    check_slots_cover(num_experts, topology, slots_per_gpu)
    slots: list[list[int]] = [[] for _ in range(topology.world_size)]
    # every expert needs >= 1 copy: a node of G x S slots holds at most G copies of one expert
    weights = loads + loads.sum() * 1e-9 + 1e-12  # idle experts still get their one copy
    for node, experts in enumerate(node_members(loads, affinity_EE, topology, slots_per_gpu)):
        fill_node(
            slots, experts, weights[experts], first_rank=node * gpus, gpus=gpus, slots_per_gpu=slots_per_gpu
        )
    return layer_from_slots(slots, num_experts)
