"""Flat or hierarchical dispatch, per layer and per forward: a cost model calibrated at start-up.

Shape legend: R expert-parallel ranks, N nodes, G GPUs per node, C summary columns.

The model of one MoE layer's payload collectives (the row-count exchange is common to both
paths and left out), summed over the dispatch round (row = the dispatch row) and the combine round
(row = the combine row):

    flat         = 2 * alpha_ep + sum_rounds link(link_flat * row) + intra_flat * row * intra_s_per_byte
    hierarchical = 2 * alpha_ep + 2 * alpha_intra
                   + sum_rounds link(link_hier * row) + intra_hier * row * intra_s_per_byte
    link(bytes)  = max(0, bytes - inter_burst_bytes) * inter_s_per_byte

with link_* the rows on the busiest node link (the larger direction) and intra_* the rows of the
busiest rank inside a node. A shaped link (token bucket) lets a round after an idle gap (the
experts run between dispatch and combine) send its first inter_burst_bytes at line speed: only the
bytes beyond it cost the link's rate. The rows come from the summary every rank sends with its row
counts (``summary_columns``: the same values to every peer, so after the exchange every rank holds
every rank's summary and takes the same decision).

``calibrate`` times small and large all-to-alls on the EP and intra-node groups once: the link's
per-byte cost from the slope between two large sizes, each sent after an idle gap, and its burst
from the intercept (what the smaller transfer did not pay of alpha + bytes * rate); then averages
the parameters over the EP group, so every rank holds identical parameters. Collective.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ds_grace.comm.groups import GraceGroups
from ds_grace.topology import Topology

PATH_MODES = ("flat", "hierarchical", "auto")
CALIBRATION_REPEATS = 5
# per remote-node peer: two sizes, both beyond a shaped link's burst allowance, so that the slope
# between them is the link's per-byte cost (a burst shortens both transfers alike)
CALIBRATION_INTER_BYTES = (128 * 1024, 384 * 1024)
# before each inter-node sample: long enough for a shaped link's token bucket to refill (a burst of
# up to 100 ms of traffic), as it does while the experts run between dispatch and combine
CALIBRATION_IDLE_S = 0.1
CALIBRATION_INTRA_BYTES = 256 * 1024  # per same-node peer


@dataclass(frozen=True)
class PathModel:
    """Calibrated costs: seconds per collective round and per byte (identical on every rank)."""

    alpha_ep_s: float
    alpha_intra_s: float
    inter_s_per_byte: float  # one node's link to the other nodes
    intra_s_per_byte: float  # one rank, inside its node
    inter_burst_bytes: float = 0.0  # one node's link: bytes a round after an idle gap sends at line speed

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [
                self.alpha_ep_s,
                self.alpha_intra_s,
                self.inter_s_per_byte,
                self.intra_s_per_byte,
                self.inter_burst_bytes,
            ],
            dtype=torch.float64,
        )

    def link_s(self, link_bytes: float) -> float:
        """Seconds one round's `link_bytes` on the busiest node link cost beyond the burst."""
        return max(0.0, link_bytes - self.inter_burst_bytes) * self.inter_s_per_byte


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
    stage1_N[topology.node_of(ep_index)].zero_()  # a fill: no host value is uploaded
    local = topology.local_rank_of(ep_index)
    stage2_N = member_TNG.sum(dim=(0, 2)) - member_TNG[:, :, local].sum(0)
    return torch.cat([flat_N, stage1_N, stage2_N]).to(torch.int64)


def path_costs(
    summary_RC: np.ndarray,
    *,
    topology: Topology,
    model: PathModel,
    dispatch_row_bytes: int,
    combine_row_bytes: int,
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
    rounds = (dispatch_row_bytes, combine_row_bytes)

    def payload_s(link_rows: float, intra_rows: float) -> float:
        return sum(
            model.link_s(link_rows * row) + intra_rows * row * model.intra_s_per_byte for row in rounds
        )

    flat = 2 * model.alpha_ep_s + payload_s(busiest_link(flat_RN), intra_flat)
    hier = 2 * model.alpha_ep_s + 2 * model.alpha_intra_s + payload_s(busiest_link(stage1_RN), intra_hier)
    return flat, hier


def choose_hierarchical(
    summary_RC: np.ndarray,
    *,
    topology: Topology,
    model: PathModel,
    dispatch_row_bytes: int,
    combine_row_bytes: int,
) -> bool:
    """True when the hierarchical path is predicted faster, or within NEAR_TIE of flat (prefers_hierarchical)."""
    costs_s = path_costs(
        summary_RC,
        topology=topology,
        model=model,
        dispatch_row_bytes=dispatch_row_bytes,
        combine_row_bytes=combine_row_bytes,
    )
    return prefers_hierarchical(costs_s)


# A predicted difference within this fraction of the flat path's time is a tie, and a tie goes to the
# hierarchical path: it moves fewer bytes across nodes, and the model's error is about this large. At
# 200 Mbit/s the two paths measured within noise of each other on GRACE's plans (flat / hierarchical:
# 39.9 / 39.6 ms on real OLMoE routing, 41.4 / 39.4 ms on the synthetic one), and a strict comparison
# flipped between them forward by forward, slower than either path alone and with more bytes crossing.
NEAR_TIE = 0.10


def prefers_hierarchical(costs_s: tuple[float, float]) -> bool:
    """The decision from path_costs' (flat, hierarchical) seconds: hierarchical unless flat is predicted
    faster by more than NEAR_TIE of its time. Zero costs (no rows anywhere) keep the flat path."""
    flat, hier = costs_s
    return hier < flat * (1.0 + NEAR_TIE)


FEEDBACK_WEIGHT = 0.3  # weight of the newest measurement in a path's running residual
# Every EXPLORE_EVERY-th per-forward choice takes the other path when its corrected prediction is within
# EXPLORE_WITHIN of the chosen one's: a path not taken keeps the residual of its last forwards, and
# one slow forward there (noise) would otherwise keep it untaken for good. Measured (benchmarks/README.md):
# without it, mixtral-prefill at 200 Mbit/s stayed on the hierarchical path for 20 of 20 forwards
# (32.9 ms) while the flat one ran 28.8 ms; with 1.25x the stale flat residual predicted 44.0 against
# 23.7 ms, out of reach, and the layer stayed hierarchical again (30.5 ms; flat rung 27.6 ms).
EXPLORE_EVERY = 8
EXPLORE_WITHIN = 2.0
# A path never measured has no stale residual to escape, only the model's own error: at 50 Mbit/s its
# median prediction of each path's payload was within 4-13 % of the fixed rungs' (benchmarks/README.md),
# so a path predicted beyond 1.25x of the chosen one is not explored until it has been measured once.
# At 50 Mbit/s flat was predicted 1.4-1.6x the hierarchical path (qwen15, olmoe), and each exploration
# of it cost a forward of 170-200 ms against 85-105.
EXPLORE_UNMEASURED_WITHIN = 1.25
# An exploration that the next choice leaves again (the other path measured slower) doubles the interval
# to the next one, up to this many times EXPLORE_EVERY; one that the next choice keeps resets it. At
# 50 Mbit/s an explored flat forward cost 170-200 ms against 85-105 ms hierarchical (qwen15-prefill):
# a path confirmed slower is re-measured ever more rarely, a close race keeps being re-measured.
EXPLORE_BACKOFF_MAX = 8


def choose_path(
    corrected_s: tuple[float, float], *, explore: bool, measured: tuple[bool, bool] = (True, True)
) -> tuple[bool, bool]:
    """(hierarchical, explored): the preferred path (``prefers_hierarchical``), or with `explore` the
    other one when its corrected seconds are within EXPLORE_WITHIN of the preferred path's
    (EXPLORE_UNMEASURED_WITHIN while the other path is not `measured`: (flat, hierarchical))."""
    hierarchical = prefers_hierarchical(corrected_s)
    chosen, other = corrected_s[int(hierarchical)], corrected_s[int(not hierarchical)]
    within = EXPLORE_WITHIN if measured[int(not hierarchical)] else EXPLORE_UNMEASURED_WITHIN
    if explore and 0.0 < chosen and other <= chosen * within:
        return not hierarchical, True
    return hierarchical, False


class PathFeedback:
    """This rank's measured-minus-predicted seconds of each path (flat, hierarchical), a running mean.

    The start-up model leaves out what a path costs beyond its collectives (packing and index work
    of each stage, waits between stages). Each rank measures the payload rounds of the path a
    forward took (dispatch and combine, experts excluded) and keeps the residual; the residuals ride
    in the row-count exchange (``dispatch``), and every rank corrects the model by the EP group's
    mean residual of each path, so every rank takes the same decision. A path never taken has no
    residual (0), so the model's prediction stands for it until it is tried.
    """

    def __init__(self, *, weight: float = FEEDBACK_WEIGHT, explore_every: int = EXPLORE_EVERY) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight ({weight}) must be in (0, 1]")
        if explore_every < 0:
            raise ValueError(f"explore_every ({explore_every}) must be >= 0 (0: never)")
        self.weight = weight
        self.explore_every = explore_every
        self.residual_s = [0.0, 0.0]
        self.samples = [0, 0]
        # every input below is the same on every rank (the path each forward took, chosen from the
        # header), so every rank asks for exploration on the same forward
        self.explore_interval = explore_every
        self.since_request = 0
        self.explored_path: int | None = None  # the path the last forward explored, until the next choice

    def explore_due(self) -> bool:
        """Whether this rank asks the next per-forward choice to try the other path (the request
        rides in the header; any rank's request turns the whole EP group)."""
        return self.explore_every > 0 and self.since_request == self.explore_interval - 1

    def update(
        self, *, hierarchical: bool, measured_s: float, predicted_s: float, explored: bool = False
    ) -> None:
        """Fold one forward's measured payload seconds of the path taken into its residual; an
        explored path's old residual is stale, so the new measurement replaces it."""
        path = int(hierarchical)
        residual = measured_s - predicted_s
        if self.samples[path] == 0 or explored:
            self.residual_s[path] = residual
        else:
            self.residual_s[path] += self.weight * (residual - self.residual_s[path])
        self.samples[path] += 1
        self.since_request = 0 if self.explore_due() else self.since_request + 1
        if self.explored_path is not None and not explored:
            if path == self.explored_path:  # the explored path is preferred now: keep re-measuring often
                self.explore_interval = self.explore_every
            else:
                self.explore_interval = min(
                    2 * self.explore_interval, EXPLORE_BACKOFF_MAX * self.explore_every
                )
        self.explored_path = path if explored else None

    def measured(self) -> tuple[bool, bool]:
        """Whether this rank has measured (flat, hierarchical) at least once: what it sends in its header."""
        return self.samples[0] > 0, self.samples[1] > 0

    def as_micros(self) -> tuple[int, int]:
        """The residuals in whole microseconds: what this rank sends in its header row."""
        return round(self.residual_s[0] * 1e6), round(self.residual_s[1] * 1e6)


def corrected_costs(costs_s: tuple[float, float], residual_us_R2: np.ndarray) -> tuple[float, float]:
    """The model's (flat, hierarchical) seconds plus the EP group's mean residual of each path
    (residual_us_R2[r] = rank r's residuals in microseconds; identical on every rank)."""
    mean_2 = np.asarray(residual_us_R2, dtype=np.float64).mean(axis=0) * 1e-6
    return costs_s[0] + float(mean_2[0]), costs_s[1] + float(mean_2[1])


# calibration is a measurement of the EP group's links, taken once per group (collective)
_CACHE: dict[GraceGroups, PathModel] = {}


class PathPolicy:
    """Which path a layer's forward takes: fixed ("flat", "hierarchical") or "auto".

    With "auto" (and more than one node) every rank sends, in the header round, its traffic
    summary, its measured residuals, whether it asks to explore and which paths it has measured
    (``header_columns``); every rank then decides the same path from the same received columns
    (``decide``) and folds the forward's measured seconds into its own feedback (``observe``). Owned
    by one layer: nothing is shared between layers or workloads; ``reset`` forgets what was
    measured (every rank of the group between the same two forwards).
    """

    def __init__(
        self, mode: str, *, topology: Topology, model: Callable[[], PathModel] | None = None
    ) -> None:
        if mode not in PATH_MODES:
            raise ValueError(f"grace.communication.path ({mode!r}) must be one of {', '.join(PATH_MODES)}")
        if mode == "auto" and model is None and topology.num_nodes > 1:
            raise ValueError("the auto path needs a path model (calibrated_model)")
        self.mode = mode
        self.topology = topology
        self._model = model
        self.feedback = PathFeedback()
        self.last_costs_s: tuple[float, float] | None = None
        self.last_corrected_s: tuple[float, float] | None = None
        self.last_explored = False
        self._state_host: torch.Tensor | None = None  # staging for the feedback columns (pinned for CUDA)

    @property
    def adaptive(self) -> bool:
        return self.mode == "auto" and self.topology.num_nodes > 1

    def reset(self) -> None:
        """Forget the measured residuals and paths (a new model served over the same group)."""
        self.feedback = PathFeedback()

    def header_columns(self, member_TR: torch.Tensor, ep_index: int) -> torch.Tensor:
        """This rank's columns of the header (the same to every peer)."""
        summary = rank_summary(member_TR, ep_index=ep_index, topology=self.topology)
        flat_us, hier_us = self.feedback.as_micros()
        measured = self.feedback.measured()
        state = [flat_us, hier_us, int(self.feedback.explore_due()), int(measured[0]) | int(measured[1]) << 1]
        return torch.cat([summary, self._staged(state, summary.device)])

    def _staged(self, values: list[int], device: torch.device) -> torch.Tensor:
        """`values` on `device` without a synchronous upload: written into a host buffer this policy owns
        (pinned for CUDA) and copied without blocking. The header round's host read, later in the same
        forward, waits for that copy, so the next forward's write cannot overtake it."""
        if self._state_host is None or len(self._state_host) != len(values):
            pinned = device.type == "cuda"
            self._state_host = torch.zeros(len(values), dtype=torch.int64, pin_memory=pinned)
        self._state_host.numpy()[:] = values
        return self._state_host.to(device, non_blocking=True)

    def decide(self, columns_RC: np.ndarray, *, dispatch_row_bytes: int, combine_row_bytes: int) -> str:
        """The path of this forward, from every rank's header columns (identical on every rank)."""
        if not self.adaptive:
            return "flat" if self.mode == "flat" or self.topology.num_nodes == 1 else "hierarchical"
        assert self._model is not None  # adaptive implies a model
        summary_width = 3 * self.topology.num_nodes
        costs_s = path_costs(
            columns_RC[:, :summary_width], topology=self.topology, model=self._model(),
            dispatch_row_bytes=dispatch_row_bytes, combine_row_bytes=combine_row_bytes,
        )  # fmt: skip
        state_R4 = columns_RC[:, summary_width : summary_width + 4]
        corrected_s = corrected_costs(costs_s, state_R4[:, :2])
        measured = tuple(bool((state_R4[:, 3] >> path & 1).all()) for path in (0, 1))
        hierarchical, explored = choose_path(
            corrected_s, explore=bool(state_R4[:, 2].any()), measured=measured
        )
        self.last_costs_s, self.last_corrected_s, self.last_explored = costs_s, corrected_s, explored
        return "hierarchical" if hierarchical else "flat"

    def observe(self, path: str, *, measured_s: float) -> None:
        """Fold one adaptive forward's payload seconds (experts excluded) into the feedback."""
        if self.adaptive and self.last_costs_s is not None:
            hierarchical = path == "hierarchical"
            self.feedback.update(
                hierarchical=hierarchical, measured_s=measured_s,
                predicted_s=self.last_costs_s[int(hierarchical)], explored=self.last_explored,
            )  # fmt: skip


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
        return PathModel(0.0, 0.0, 0.0, 0.0, 0.0)
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
    inter_burst_bytes = 0.0
    if topology.num_nodes > 1:
        my_node = topology.node_of(me)
        times = []
        for per_peer in CALIBRATION_INTER_BYTES:
            splits = [0 if topology.node_of(r) == my_node else per_peer // 8 for r in range(world)]
            times.append(
                _median_time(groups.ep_group, splits, splits, max(2, repeats // 2), idle_s=CALIBRATION_IDLE_S)
            )
        small_link, large_link = (gpus * (world - gpus) * b for b in CALIBRATION_INTER_BYTES)
        inter_s_per_byte, inter_burst_bytes = link_fit(
            small_bytes=small_link,
            small_s=times[0],
            large_bytes=large_link,
            large_s=times[1],
            alpha_s=alpha_ep,
        )
    local = PathModel(
        alpha_ep, alpha_intra, inter_s_per_byte, intra_s_per_byte, inter_burst_bytes
    ).as_tensor()
    dist.all_reduce(local, group=groups.ep_group)
    mean = (local / world).tolist()
    return PathModel(*mean)


def link_fit(
    *, small_bytes: float, small_s: float, large_bytes: float, large_s: float, alpha_s: float
) -> tuple[float, float]:
    """(seconds per byte, burst bytes) of one node link from two transfers sent after an idle gap:
    t = alpha + max(0, bytes - burst) * s_per_byte, both sizes beyond the burst. The per-byte cost
    is the slope; the burst what the smaller transfer did not pay, within [0, small_bytes]."""
    if not 0 < small_bytes < large_bytes:
        raise ValueError(f"link_fit sizes ({small_bytes}, {large_bytes}) must satisfy 0 < small < large")
    s_per_byte = max(large_s - small_s, 0.0) / (large_bytes - small_bytes)
    if s_per_byte == 0.0:
        return 0.0, 0.0
    unpaid_s = alpha_s + small_bytes * s_per_byte - small_s
    return s_per_byte, min(max(unpaid_s / s_per_byte, 0.0), float(small_bytes))


def _median_time(
    group: Any, send_splits: list[int], recv_splits: list[int], repeats: int, *, idle_s: float = 0.0
) -> float:
    send = torch.zeros(sum(send_splits), dtype=torch.int64)
    recv = torch.empty(sum(recv_splits), dtype=torch.int64)
    samples = []
    dist.barrier(group=group)
    for _ in range(repeats + 1):
        if idle_s > 0:
            time.sleep(idle_s)
            dist.barrier(group=group)
        start = time.perf_counter()
        dist.all_to_all_single(
            recv, send, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group
        )
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])
