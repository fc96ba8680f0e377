"""Flat or hierarchical dispatch, per layer and per forward: a cost model calibrated at start-up.

Shape legend: R expert-parallel ranks, N nodes, G GPUs per node, C summary columns.

The model of one MoE layer's payload collectives (the row-count exchange is common to both
paths and left out):

    flat         = 2 * alpha_ep + 2 * (link_flat * inter_s_per_byte + intra_flat * intra_s_per_byte) * row
    hierarchical = 2 * alpha_ep + 2 * alpha_intra
                   + 2 * (link_hier * inter_s_per_byte + intra_hier * intra_s_per_byte) * row

with row = the dispatch row plus the combine row (bytes), link_* the rows on the busiest node link
(the larger direction) and intra_* the rows of the busiest rank inside a node. The rows come from
the summary every rank sends with its row counts (``summary_columns``: the same values to every
peer, so after the exchange every rank holds every rank's summary and takes the same decision).

``calibrate`` times small and large all-to-alls on the EP and intra-node groups once (the link's
per-byte cost from the slope between two large sizes, so that a shaped link's burst does not hide it)
and averages the parameters over the EP group, so every rank holds identical parameters. Collective.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ds_grace.comm.groups import GraceGroups
from ds_grace.topology import Topology

CALIBRATION_REPEATS = 5
# per remote-node peer: two sizes, both beyond a shaped link's burst allowance, so that the slope
# between them is the link's per-byte cost (a burst shortens both transfers alike)
CALIBRATION_INTER_BYTES = (64 * 1024, 192 * 1024)
CALIBRATION_INTRA_BYTES = 256 * 1024  # per same-node peer


@dataclass(frozen=True)
class PathModel:
    """Calibrated costs: seconds per collective round and per byte (identical on every rank)."""

    alpha_ep_s: float
    alpha_intra_s: float
    inter_s_per_byte: float  # one node's link to the other nodes
    intra_s_per_byte: float  # one rank, inside its node

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [self.alpha_ep_s, self.alpha_intra_s, self.inter_s_per_byte, self.intra_s_per_byte],
            dtype=torch.float64,
        )


def rank_summary(member_TR: torch.Tensor, *, ep_index: int, topology: Topology) -> torch.Tensor:
    """summary_C of one rank from member_TR[t, r] (token t has a route on rank r):

    [0:N]   flat rows this rank sends to each node (itself excluded);
    [N:2N]  hierarchical stage-1 rows to each remote node (one per token and node; own node 0);
    [2N:3N] hierarchical stage-2 rows the relay of each node forwards inside it for these tokens
            (one per token and hosting GPU other than the relay).
    """
    nodes, gpus = topology.num_nodes, topology.gpus_per_node
    member_TNG = member_TR.view(member_TR.shape[0], nodes, gpus)
    flat_N = member_TNG.sum(dim=(0, 2))
    flat_N[topology.node_of(ep_index)] -= member_TR[:, ep_index].sum()
    reached_TN = member_TNG.any(dim=2)
    stage1_N = reached_TN.sum(0)
    stage1_N[topology.node_of(ep_index)] = 0
    local = topology.local_rank_of(ep_index)
    stage2_N = member_TNG.sum(dim=(0, 2)) - member_TNG[:, :, local].sum(0)
    return torch.cat([flat_N, stage1_N, stage2_N]).to(torch.int64)


def path_costs(
    summary_RC: np.ndarray, *, topology: Topology, model: PathModel, row_bytes: int
) -> tuple[float, float]:
    """(flat seconds, hierarchical seconds) of the payload collectives, from every rank's summary."""
    nodes, gpus = topology.num_nodes, topology.gpus_per_node
    summary_RC = np.asarray(summary_RC, dtype=np.float64)
    flat_RN, stage1_RN, stage2_RN = (summary_RC[:, i * nodes : (i + 1) * nodes] for i in range(3))
    node_R = np.arange(topology.world_size) // gpus

    def busiest_link(to_RN: np.ndarray) -> float:
        cross_RN = to_RN * (node_R[:, None] != np.arange(nodes)[None, :])
        out_N = np.bincount(node_R, weights=cross_RN.sum(axis=1), minlength=nodes)
        in_N = cross_RN.sum(axis=0)
        return float(max(out_N.max(), in_N.max()))

    intra_flat = float(flat_RN[np.arange(topology.world_size), node_R].max())
    # stage 2: the relay (node n, local rank l) forwards the rows of every origin with local rank l
    local_R = np.arange(topology.world_size) % gpus
    relay_NG = np.zeros((nodes, gpus))
    np.add.at(relay_NG.T, local_R, stage2_RN)
    intra_hier = float(relay_NG.max())
    bytes_term = 2.0 * row_bytes
    flat = 2 * model.alpha_ep_s + bytes_term * (
        busiest_link(flat_RN) * model.inter_s_per_byte + intra_flat * model.intra_s_per_byte
    )
    hier = (
        2 * model.alpha_ep_s
        + 2 * model.alpha_intra_s
        + bytes_term
        * (busiest_link(stage1_RN) * model.inter_s_per_byte + intra_hier * model.intra_s_per_byte)
    )
    return flat, hier


def choose_hierarchical(
    summary_RC: np.ndarray, *, topology: Topology, model: PathModel, row_bytes: int
) -> bool:
    """True when the hierarchical path is predicted faster (ties: flat, fewer rounds)."""
    flat, hier = path_costs(summary_RC, topology=topology, model=model, row_bytes=row_bytes)
    return hier < flat


_CACHE: dict[GraceGroups, PathModel] = {}


def calibrated_model(groups: GraceGroups, *, repeats: int = CALIBRATION_REPEATS) -> PathModel:
    """This EP group's PathModel: calibrated (collectively) on first use, then cached."""
    if groups not in _CACHE:
        _CACHE[groups] = calibrate(groups, repeats=repeats)
    return _CACHE[groups]


def calibrate(groups: GraceGroups, *, repeats: int = CALIBRATION_REPEATS) -> PathModel:
    """Time tiny and large all-to-alls (median of `repeats`), average over the EP group. Collective."""
    if repeats < 1:
        raise ValueError(f"repeats ({repeats}) must be >= 1")
    topology = groups.topology
    if groups.ep_group is None:
        return PathModel(0.0, 0.0, 0.0, 0.0)
    world, gpus, me = topology.world_size, topology.gpus_per_node, groups.ep_index
    tiny = [1] * world
    alpha_ep = _median_time(groups.ep_group, tiny, tiny, repeats)
    alpha_intra = 0.0
    intra_s_per_byte = 0.0
    if gpus > 1 and groups.intra_group is not None:
        alpha_intra = _median_time(groups.intra_group, [1] * gpus, [1] * gpus, repeats)
        big = [CALIBRATION_INTRA_BYTES // 8] * gpus
        t_intra = _median_time(groups.intra_group, big, big, repeats)
        intra_s_per_byte = max(t_intra - alpha_intra, 0.0) / ((gpus - 1) * CALIBRATION_INTRA_BYTES)
    inter_s_per_byte = 0.0
    if topology.num_nodes > 1:
        my_node = topology.node_of(me)
        times = []
        for per_peer in CALIBRATION_INTER_BYTES:
            splits = [0 if topology.node_of(r) == my_node else per_peer // 8 for r in range(world)]
            times.append(_median_time(groups.ep_group, splits, splits, max(2, repeats // 2)))
        small, large = CALIBRATION_INTER_BYTES
        link_bytes = gpus * (world - gpus) * (large - small)  # one node's ranks to all remote peers
        inter_s_per_byte = max(times[1] - times[0], 0.0) / link_bytes
    local = PathModel(alpha_ep, alpha_intra, inter_s_per_byte, intra_s_per_byte).as_tensor()
    dist.all_reduce(local, group=groups.ep_group)
    mean = (local / world).tolist()
    return PathModel(*mean)


def _median_time(group: Any, send_splits: list[int], recv_splits: list[int], repeats: int) -> float:
    send = torch.zeros(sum(send_splits), dtype=torch.int64)
    recv = torch.empty(sum(recv_splits), dtype=torch.int64)
    samples = []
    dist.barrier(group=group)
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dist.all_to_all_single(
            recv, send, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group
        )
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])
