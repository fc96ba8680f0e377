"""Dispatch as data: the hops of each path and the rows each hop sends (pure: no torch.distributed, so
a traffic model may import it as well as the executor in ds_grace.comm.all_to_all).

Shape legend: T tokens, K top-k, V rows a rank holds before a hop, P peers of the hop's group,
S rows it sends, R expert-parallel (EP) ranks, N nodes, G GPUs per node.

A route's destination is the EP rank computing it. A path is a tuple of hops; each hop maps every
destination to the peer (index in the hop's group) a row travels to on the way there:

- flat: one hop over the EP group, a row once per destination GPU (its routes there ride along);
- hierarchical (N > 1): hop 1 over the EP group to the relay of each destination node (the GPU
  there with this rank's local rank; its own node's relay is itself), a row once per node; hop 2
  inside the node, a row once per destination GPU;
- low-latency: the flat hop with a fixed buffer of rows per peer (ds_grace.comm.all_to_all).

Combine runs the hops in reverse, adding a token's weighted outputs at every hop, so a token
crosses each node boundary at most once per direction.

The traffic model: ``hop_rows`` counts one origin's rows per hop of these same hops in numpy, from
its rows per destination rank and node (integers: one forward, ``path_rows``; floats: expectations
over instance choices, the planner's metrics); ``fixed_rows`` the fixed buffers of the low-latency
path and of DeepSpeed's padded all-to-all. The planner and replayed metrics, the simulator and the
benchmark's byte counts all count traffic with these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ds_grace.topology import Topology

PathName = Literal["flat", "hierarchical"]
PATHS: tuple[PathName, ...] = ("flat", "hierarchical")


@dataclass(frozen=True)
class Hop:
    """One all-to-all of a path: over `group` ("ep" or "intra"), peer_of_dest[d] is the peer (index
    into peer_ep_ranks) a row for destination EP rank d goes to, or -1 (not reached by this hop)."""

    group: Literal["ep", "intra"]
    peer_of_dest: tuple[int, ...]
    peer_ep_ranks: tuple[int, ...]

    @property
    def num_peers(self) -> int:
        return len(self.peer_ep_ranks)


def path_hops(path: PathName, topology: Topology, ep_index: int) -> tuple[Hop, ...]:
    """The hops of `path` from EP rank `ep_index` (hierarchical on one node is the flat hop)."""
    world, gpus = topology.world_size, topology.gpus_per_node
    everyone = tuple(range(world))
    if path == "flat" or topology.num_nodes == 1:
        return (Hop("ep", everyone, everyone),)
    if path != "hierarchical":
        raise ValueError(f"path ({path!r}) must be one of {', '.join(PATHS)}")
    local, node = topology.local_rank_of(ep_index), topology.node_of(ep_index)
    relay = tuple(topology.node_of(d) * gpus + local for d in everyone)
    inside = tuple(topology.local_rank_of(d) if topology.node_of(d) == node else -1 for d in everyone)
    return Hop("ep", relay, everyone), Hop("intra", inside, tuple(topology.ranks_of_node(node)))


def membership(code_VK: torch.Tensor, peer_of_code_C: torch.Tensor, num_peers: int) -> torch.Tensor:
    """member_VP[v, p]: does a route of row v travel through peer p.

    code_VK holds the routes' codes (``ds_grace.routing.route_codes``; 0: no route); peer_of_code_C[c]
    is the peer code c reaches, num_peers where the hop does not reach it (and for code 0)."""
    peer_VK = peer_of_code_C[code_VK]
    member_VP = torch.zeros(code_VK.shape[0], num_peers + 1, dtype=torch.bool, device=code_VK.device)
    return member_VP.scatter_(1, peer_VK, True)[:, :num_peers]


def value_counts(values: torch.Tensor, length: int) -> torch.Tensor:
    """counts_L[v]: how many entries of `values` (integers in [0, length)) equal v, int64, on their device.

    torch.bincount reads the values' min and max back to the host on CUDA, minlength or not: a sync.
    Adding ones at the values into a zero vector of fixed length needs no host value."""
    flat = values.reshape(-1)
    counts_L = torch.zeros(length, dtype=torch.int64, device=values.device)
    return counts_L.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))


def code_peer_lookup(hop: Hop, slot_stride: int, device: torch.device) -> torch.Tensor:
    """peer_of_code_C for ``membership``: the peer of `hop` each route code travels to, code c in
    [0, world x slot_stride] (destination (c - 1) // slot_stride), num_peers for code 0 and for the
    destinations the hop does not reach."""
    peer_D1 = [*(peer if peer >= 0 else hop.num_peers for peer in hop.peer_of_dest), hop.num_peers]
    dest_C = torch.arange(-1, len(hop.peer_of_dest) * slot_stride, device=device).floor_divide(slot_stride)
    return torch.tensor(peer_D1, dtype=torch.long, device=device)[dest_C]


def rows_by_peer(member_VP: torch.Tensor, num_sent: int) -> torch.Tensor:
    """src_row_S: the row of every (row, peer) of member_VP, grouped by peer, rows in order.

    num_sent (member_VP.sum(), known on the host from the header round) sizes the output: a
    static-shape op, no host read."""
    return torch.nonzero_static(member_VP.t(), size=num_sent)[:, 1]


def hop_rows(
    rows_R: np.ndarray, rows_N: np.ndarray, *, path: PathName, topology: Topology, origin: int
) -> list[np.ndarray]:
    """Rows one origin sends per hop, [hop][sender EP rank, receiver EP rank] (self included), from
    its row counts: rows_R[r] rows with a route on EP rank r, rows_N[n] rows with a route on node n.

    Integer counts give the rows of one forward; expected counts (floats, over instance choices) give
    expected rows. Hop 1 is sent by the origin; hop 2 (hierarchical) by the relays, one per node."""
    rows_R, rows_N = np.asarray(rows_R), np.asarray(rows_N)
    world, gpus, nodes = topology.world_size, topology.gpus_per_node, topology.num_nodes
    dtype = np.result_type(rows_R, rows_N, np.int64)
    first = np.zeros((world, world), dtype=dtype)
    if path == "flat" or nodes == 1:
        first[origin] = rows_R
        return [first]
    relays = np.arange(nodes) * gpus + topology.local_rank_of(origin)
    first[origin, relays] = rows_N
    second = np.zeros((world, world), dtype=dtype)
    second[np.repeat(relays, gpus), np.arange(world)] = rows_R
    return [first, second]


def path_rows(member_TR: np.ndarray, *, path: PathName, topology: Topology, origin: int) -> list[np.ndarray]:
    """Rows one origin's tokens send per hop (``hop_rows``); member_TR[t, r]: token t has a route
    computed on EP rank r. Pure numpy: the traffic model of the planner, the replayed metrics, the
    simulator and the benchmark."""
    member_TR = np.asarray(member_TR, dtype=bool)
    reached_TN = member_TR.reshape(-1, topology.num_nodes, topology.gpus_per_node).any(axis=2)
    return hop_rows(member_TR.sum(0), reached_TN.sum(0), path=path, topology=topology, origin=origin)


def fixed_rows(rows_per_peer: int, *, topology: Topology, origin: int) -> list[np.ndarray]:
    """The one hop of a fixed-buffer all-to-all from `origin`: rows_per_peer rows to every EP rank
    (itself included), whatever the routes: the low-latency path
    (``DispatchExecutor.dispatch_low_latency``) and DeepSpeed's padded all-to-all
    (``ds_grace.comm.transport.DeepSpeedTransport``: E/R experts' capacity rows per peer)."""
    world = topology.world_size
    first = np.zeros((world, world), dtype=np.int64)
    first[origin] = rows_per_peer
    return [first]


def cross_node_mask(topology: Topology) -> np.ndarray:
    """crosses_RR[s, r]: EP ranks s and r sit on different nodes (a row between them uses a link)."""
    node_R = np.arange(topology.world_size) // topology.gpus_per_node
    return node_R[:, None] != node_R[None, :]
