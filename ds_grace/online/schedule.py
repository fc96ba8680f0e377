"""Which replica weights move where, and how many bytes per interval (pure).

A migration from the live plan to a target plan copies every (layer, expert) instance the target
places on a rank that does not host it now. Each copy comes from the live instance nearest to
its destination (same node first, then the primary). The copies form one byte stream in a fixed
order; each interval moves the next bytes of it up to the budget, so every rank derives the same
chunks from the same plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ds_grace.comm.migration import Chunk
from ds_grace.planning.plan import GracePlan, LayerPlan
from ds_grace.topology import Topology


@dataclass(frozen=True)
class ReplicaCopy:
    layer: int
    expert: int
    src: int
    dst: int
    nbytes: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.expert)


def source_rank(live: LayerPlan, expert: int, dst: int, topology: Topology) -> int:
    """The live instance of `expert` to copy from for `dst`: same node first, primary first, lowest rank."""
    hosts = live.instances(expert)
    primary = live.primary[expert]
    return min(hosts, key=lambda r: (topology.node_of(r) != topology.node_of(dst), r != primary, r))


def plan_copies(live: GracePlan, target: GracePlan, *, expert_nbytes: Sequence[int]) -> list[ReplicaCopy]:
    """The copies that turn `live` into `target`, ordered by layer, destination rank, slot."""
    if live.topology != target.topology or live.num_layers != target.num_layers:
        raise ValueError("live and target plans must share topology and layer count")
    if len(expert_nbytes) != live.num_layers:
        raise ValueError(
            f"expert_nbytes has {len(expert_nbytes)} entries; the plans have {live.num_layers} layers"
        )
    copies = []
    for index, (old, new) in enumerate(zip(live.layers, target.layers)):
        for dst, experts in enumerate(new.slots):
            for e in experts:
                if e not in old.slots[dst]:
                    src = source_rank(old, e, dst, live.topology)
                    copies.append(ReplicaCopy(index, e, src, dst, int(expert_nbytes[index])))
    return copies


def freed_replicas(live: GracePlan, target: GracePlan) -> list[tuple[int, int, int]]:
    """(layer, expert, rank) of live instances the target drops."""
    return [
        (index, e, rank)
        for index, (old, new) in enumerate(zip(live.layers, target.layers))
        for rank, experts in enumerate(old.slots)
        for e in experts
        if e not in new.slots[rank]
    ]


def next_chunks(copies: Sequence[ReplicaCopy], *, cursor: int, budget: int | None) -> tuple[list[Chunk], int]:
    """Chunks covering stream bytes [cursor, cursor + budget) (all the rest when budget is None).

    Returns (chunks, new cursor). Each copy owns bytes [offset, offset + nbytes) of the stream.
    """
    total = sum(c.nbytes for c in copies)
    stop = total if budget is None else min(total, cursor + budget)
    chunks = []
    offset = 0
    for copy in copies:
        lo, hi = max(cursor, offset), min(stop, offset + copy.nbytes)
        if lo < hi:
            chunks.append(
                Chunk(key=copy.key, src=copy.src, dst=copy.dst, start=lo - offset, stop=hi - offset)
            )
        offset += copy.nbytes
    return chunks, stop


def cross_node_bytes(chunks: Sequence[Chunk], topology: Topology) -> int:
    return sum(c.nbytes for c in chunks if topology.node_of(c.src) != topology.node_of(c.dst))
