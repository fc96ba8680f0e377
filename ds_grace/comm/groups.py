"""Process groups for GRACE's hierarchical communication: the only module that creates them.

Within one expert-parallel (EP) group of N x G ranks (node-major, see ds_grace.topology), the
hierarchical path needs
- the EP group itself, for the sizes exchange and the cross-node stage (one global collective with
  zero-size splits where nothing moves, so every node progresses in step);
- the intra-node group of this rank's node, for the forwarding stage;
- the inter-node peer group (same local rank on every node), for peer-only exchanges.
Every group is created with the configured collective timeout, so a missing rank ends in an error
on the others instead of a hang.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ds_grace.topology import Topology, hierarchical_rank_layout


def grace_group_layout(
    ep_ranks: Sequence[int], topology: Topology
) -> tuple[list[list[int]], list[list[int]]]:
    """(intra_node_groups, inter_node_groups) as global ranks, for one EP group.

    ep_ranks[i] is the global rank at expert-parallel index i; index i sits on node i // G with
    local rank i % G. intra_node_groups[n] lists node n's ranks, inter_node_groups[l] the ranks
    with local rank l on every node.
    """
    ranks = [int(r) for r in ep_ranks]
    if len(ranks) != topology.world_size:
        raise ValueError(
            f"ep_ranks has {len(ranks)} ranks but the topology ({topology}) needs {topology.world_size}"
        )
    if len(set(ranks)) != len(ranks) or min(ranks) < 0:
        raise ValueError(f"ep_ranks ({ranks}) must be distinct non-negative ranks")
    intra, inter = hierarchical_rank_layout(topology.world_size, topology.gpus_per_node)
    return [[ranks[i] for i in group] for group in intra], [[ranks[i] for i in group] for group in inter]


@dataclass(frozen=True)
class GraceGroups:
    """This rank's groups. ep_index is its position in ep_ranks (its expert-parallel rank).

    Groups are None only in a single-process run (world of one rank, no torch.distributed).
    """

    topology: Topology
    ep_ranks: tuple[int, ...]
    ep_index: int
    ep_group: Any
    intra_group: Any
    inter_group: Any
    timeout_s: float

    @property
    def node(self) -> int:
        return self.topology.node_of(self.ep_index)

    @property
    def local_rank(self) -> int:
        return self.topology.local_rank_of(self.ep_index)

    @property
    def intra_ep_indices(self) -> list[int]:
        """EP indices of this rank's node, in intra-group rank order."""
        return self.topology.ranks_of_node(self.node)


_CACHE: dict[tuple[Any, ...], GraceGroups] = {}


def create_grace_groups(
    topology: Topology,
    *,
    timeout_s: float,
    ep_rank_lists: Sequence[Sequence[int]] | None = None,
) -> GraceGroups:
    """Create (collectively) and return this rank's GRACE groups; cached per arguments.

    ep_rank_lists lists every EP group of the job (e.g. one per data-parallel replica), each of
    topology.world_size global ranks in EP order; default: one EP group of all ranks. Every rank
    must call this with the same arguments: groups are created in one fixed order (all EP groups,
    then their intra-node groups by node, then their inter-node groups by local rank).
    """
    if not timeout_s > 0:
        raise ValueError(f"grace.communication.timeout_s ({timeout_s}) must be > 0")
    if not dist.is_available() or not dist.is_initialized():
        if topology.world_size != 1:
            raise RuntimeError(
                f"torch.distributed is not initialised; a topology of {topology} needs "
                f"{topology.world_size} ranks (call deepspeed.init_distributed first)"
            )
        return GraceGroups(topology, (0,), 0, None, None, None, float(timeout_s))
    world_size, my_rank = dist.get_world_size(), dist.get_rank()
    if ep_rank_lists is None:
        if world_size != topology.world_size:
            raise ValueError(
                f"ep_rank_lists is required: the world has {world_size} ranks but the topology "
                f"({topology}) covers {topology.world_size}"
            )
        ep_rank_lists = [list(range(world_size))]
    rank_lists = tuple(tuple(int(r) for r in ranks) for ranks in ep_rank_lists)
    key = (rank_lists, topology, float(timeout_s))
    if key in _CACHE:
        return _CACHE[key]
    mine = [i for i, ranks in enumerate(rank_lists) if my_rank in ranks]
    if len(mine) != 1:
        raise ValueError(
            f"rank {my_rank} must be in exactly one of ep_rank_lists ({[list(r) for r in rank_lists]})"
        )
    layouts = [grace_group_layout(ranks, topology) for ranks in rank_lists]
    timeout = timedelta(seconds=float(timeout_s))

    def new(ranks: Sequence[int]) -> Any:
        group = dist.new_group(list(ranks), timeout=timeout)
        return group if my_rank in ranks else None

    ep_groups = [new(ranks) for ranks in rank_lists]
    intra_groups = [[new(ranks) for ranks in intra] for intra, _ in layouts]
    inter_groups = [[new(ranks) for ranks in inter] for _, inter in layouts]
    which = mine[0]
    ep_index = rank_lists[which].index(my_rank)
    groups = GraceGroups(
        topology=topology,
        ep_ranks=rank_lists[which],
        ep_index=ep_index,
        ep_group=ep_groups[which],
        intra_group=intra_groups[which][topology.node_of(ep_index)],
        inter_group=inter_groups[which][topology.local_rank_of(ep_index)],
        timeout_s=float(timeout_s),
    )
    _CACHE[key] = groups
    return groups


def clear_group_cache() -> None:
    """Forget cached groups (after torch.distributed.destroy_process_group)."""
    _CACHE.clear()
