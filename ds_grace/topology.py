"""Cluster topology and rank layouts as pure functions.

Ranks are laid out node-major, as DeepSpeed's launcher assigns them:
rank = node * gpus_per_node + local_rank.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    num_nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        for field_name in ("num_nodes", "gpus_per_node"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"topology.{field_name} ({value!r}) must be an integer >= 1")

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank // self.gpus_per_node

    def local_rank_of(self, rank: int) -> int:
        self._check_rank(rank)
        return rank % self.gpus_per_node

    def ranks_of_node(self, node: int) -> list[int]:
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node ({node}) must be in [0, {self.num_nodes})")
        return list(range(node * self.gpus_per_node, (node + 1) * self.gpus_per_node))

    def peer_rank(self, rank: int, node: int) -> int:
        """The rank on `node` with the same local rank as `rank`."""
        return node * self.gpus_per_node + self.local_rank_of(rank)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank ({rank}) must be in [0, {self.world_size}) for {self}")

    def __str__(self) -> str:
        return f"{self.num_nodes} nodes x {self.gpus_per_node} GPUs"


def hierarchical_rank_layout(world_size: int, gpus_per_node: int) -> tuple[list[list[int]], list[list[int]]]:
    """Return (intra_node_groups, inter_node_groups) for a node-major rank layout.

    intra_node_groups[n] lists the ranks of node n; inter_node_groups[l] lists the ranks
    with local rank l on every node (the peers that exchange cross-node traffic).
    """
    if gpus_per_node < 1 or world_size < 1 or world_size % gpus_per_node != 0:
        raise ValueError(
            f"world_size ({world_size}) must be a positive multiple of gpus_per_node ({gpus_per_node})"
        )
    num_nodes = world_size // gpus_per_node
    intra = [list(range(n * gpus_per_node, (n + 1) * gpus_per_node)) for n in range(num_nodes)]
    inter = [list(range(local, world_size, gpus_per_node)) for local in range(gpus_per_node)]
    return intra, inter
