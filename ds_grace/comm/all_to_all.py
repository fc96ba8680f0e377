"""Sparse dispatch and combine of routed tokens, flat or hierarchical (GRACE's HSC).

Shape legend: T tokens on this rank, K top-k, D hidden, R expert-parallel (EP) ranks, N nodes,
G GPUs per node, P peers of one exchange, S rows one exchange sends, V rows it receives,
Q routes computed on this rank (expert input rows), C header columns, W bytes of one row.

Every collective is ``all_to_all_single`` with explicit split sizes (gloo and NCCL). Only real
rows travel: no capacity, no padding (except the bounded low-latency buffer below), no dropped route.

Round 1, the header exchange (one collective over the EP group): every rank sends every peer its
row counts for that peer (flat rows; hierarchical: stage-1 rows too), plus, in low-latency mode,
its token count, and, when the path is chosen per forward, its traffic summary
(``ds_grace.comm.path_model``). The summary is the same for every peer, so after the exchange
every rank holds every rank's summary and picks the same path, with no extra round.

Low-latency mode (``low_latency_rows`` = L > 0): the header travels in a fixed buffer of L rows per
peer; a rank with at most L tokens puts all its rows there (a token goes at most once to each
peer), so when every rank fits, dispatch is this one collective (no count exchange) and combine
one more. A rank with more tokens sends its rows in the normal rounds after it, whose sizes the
header already carries: lossless at any token count, never a hang, the same rounds on every rank
(each rank sees every rank's token count).

Hierarchical dispatch (N > 1):
  stage 1, one collective over the whole EP group: each token goes at most once to each node that
  hosts one of its chosen instances, to the peer GPU there (same local rank; its own node's share
  goes to itself), with zero-size splits everywhere else;
  stage 2, inside every node: each row goes at most once to each GPU hosting its instances.
Flat dispatch: one collective over the EP group, a token once per hosting GPU (or, without
dedup, once per route). Combine runs the same exchanges in reverse; each hop first adds up a
token's weighted expert outputs that sit on the same rank, so a token crosses each node boundary
at most once per direction.

Every dispatched row carries its routes' metadata: code = ep_rank * slot_stride + slot (or -1 when
the route is not for that destination) and the fp32 gate weight, packed with the hidden vector
into one byte row (packed once per forward), so each stage is a single payload collective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ds_grace.comm.counters import TrafficCounters
from ds_grace.comm.groups import GraceGroups
from ds_grace.comm.path_model import (
    PathModel,
    choose_path,
    corrected_costs,
    path_costs,
    rank_summary,
)

_SIZES_BYTES_PER_COUNT = 8


@dataclass(frozen=True)
class Exchange:
    """One dispatch all-to-all, kept so that combine can run it in reverse."""

    stage: str
    group: Any
    peer_ep_ranks: tuple[int, ...]
    src_row_S: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    num_input_rows: int

    @property
    def is_local(self) -> bool:
        return self.group is None


@dataclass(frozen=True)
class Branch:
    """A chain of exchanges from this rank's tokens to `num_rows` received rows (low-latency or normal)."""

    exchanges: tuple[Exchange, ...]
    row_offset: int
    num_rows: int


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs: the branches of this dispatch and the routes computed here.

    route_row_Q[q] is the received row that route q (expert input row q, ordered by local slot)
    came with; route_weight_Q its fp32 gate weight; slot_splits the expert input rows per slot.
    hierarchical_used: the path the normal rounds took (None: no normal round ran);
    max_tokens: the largest token count of any EP rank this forward (low-latency mode, else None);
    path_costs_s: the cost model's (flat, hierarchical) seconds when the path was chosen per forward;
    path_corrected_s: the same plus the EP group's measured residuals, on which the choice was made.
    """

    branches: tuple[Branch, ...]
    route_row_Q: torch.Tensor
    route_weight_Q: torch.Tensor
    slot_splits: tuple[int, ...]
    num_tokens: int
    num_received_rows: int
    out_dtype: torch.dtype
    hierarchical_used: bool | None = None
    max_tokens: int | None = None
    local: _LocalRoutes | None = None  # routes of this rank's own tokens computed here, outputs included
    path_costs_s: tuple[float, float] | None = None
    path_corrected_s: tuple[float, float] | None = None
    path_explored: bool = False  # the per-forward choice took the other path to re-measure it

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        return tuple(exchange for branch in self.branches for exchange in branch.exchanges)


def dispatch_row_bytes(k: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one dispatched row: K int32 codes, K fp32 weights, the hidden vector; 8-aligned."""
    raw = 8 * k + hidden * _itemsize(dtype)
    return (raw + 7) // 8 * 8


def dispatch(
    x_TD: torch.Tensor,
    rank_TK: torch.Tensor,
    slot_TK: torch.Tensor,
    weight_TK: torch.Tensor,
    *,
    groups: GraceGroups,
    slot_stride: int,
    num_local_slots: int,
    hierarchical: bool,
    dedup: bool = True,
    counters: TrafficCounters | None = None,
    path_model: PathModel | None = None,
    path_residual_us: tuple[int, int] = (0, 0),
    explore_path: bool = False,
    path_measured: tuple[bool, bool] = (False, False),
    low_latency_rows: int | None = None,
    local_experts: Callable[[torch.Tensor, Sequence[int]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, DispatchMeta]:
    """Send every routed token to the ranks computing its routes.

    rank_TK / slot_TK: EP rank and local slot of each route's instance (-1: no route), identical
    to what ``ds_grace.routing.choose_instances`` returns; weight_TK: gate weights. slot_stride
    must exceed every rank's slot count. With `path_model` (and hierarchical, N > 1) the normal
    rounds take the path the model predicts faster for this forward's traffic; without it,
    hierarchical decides; `path_residual_us` (this rank's measured-minus-predicted microseconds of
    flat and hierarchical, ``PathFeedback.as_micros``) rides in the header and the EP group's mean
    corrects the model; `explore_path` (``PathFeedback.explore_due``) asks, through the header, that
    this forward try the other path when its prediction is close (``choose_path``; any rank's request
    turns the whole group); `path_measured` (``PathFeedback.measured``: whether this rank has measured
    flat, hierarchical) rides along too, and a path counts as measured when every rank has measured it.
    `low_latency_rows` (None: off) is the low-latency buffer's rows per
    peer; every rank must pass the same value and the same path options. With `local_experts`
    (experts(x_QD, slot_splits) -> out_QD) the routes of this rank's own tokens to itself skip the
    collectives and are computed while the first payload round is in flight (normal rounds only);
    combine adds them in. Returns (x_QD, meta):
    the expert input rows of this rank, grouped by local slot (``meta.slot_splits``), and the
    metadata ``combine`` consumes. Collective: every rank of the EP group must call it.
    """
    if hierarchical and not dedup:
        raise ValueError("dedup (false) must be true when hierarchical is true")
    if not dedup and (path_model is not None or low_latency_rows is not None):
        raise ValueError(
            "dedup (false) must be true for the per-forward path choice and the low-latency mode"
        )
    if low_latency_rows is not None and low_latency_rows < 0:
        raise ValueError(f"low_latency_rows ({low_latency_rows}) must be >= 0")
    if x_TD.dim() != 2 or rank_TK.shape != slot_TK.shape or rank_TK.shape != weight_TK.shape:
        raise ValueError(
            f"x ({tuple(x_TD.shape)}) must be [T, D] and rank/slot/weight ({tuple(rank_TK.shape)}, "
            f"{tuple(slot_TK.shape)}, {tuple(weight_TK.shape)}) [T, K] with the same T"
        )
    if rank_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"routes cover {rank_TK.shape[0]} tokens but x has {x_TD.shape[0]}")
    valid_TK = rank_TK >= 0
    code_TK = torch.where(valid_TK, rank_TK * slot_stride + slot_TK, -1).to(torch.int32)
    layout = _RowLayout(k=int(rank_TK.shape[1]), hidden=int(x_TD.shape[1]), dtype=x_TD.dtype)
    rows = layout.pack(x_TD, code_TK, weight_TK.to(torch.float32))
    dest_TK = torch.where(valid_TK, rank_TK, -1)
    if not dedup:
        received, exchange = _send_rows(
            rows, dest_TK, stage="dispatch", group=groups.ep_group if groups.topology.world_size > 1 else None,
            peer_ep_ranks=tuple(range(groups.topology.world_size)), recv_splits=None, dedup=False,
            layout=layout, groups=groups, counters=counters,
        )  # fmt: skip
        branches = [Branch((exchange,), 0, int(received.shape[0]))]
        return _finish(received, branches, layout, x_TD, groups=groups, slot_stride=slot_stride,
                       num_local_slots=num_local_slots, counters=counters)  # fmt: skip
    return _dispatch_dedup(
        rows, dest_TK, x_TD, layout=layout, groups=groups, slot_stride=slot_stride,
        num_local_slots=num_local_slots, hierarchical=hierarchical, counters=counters, path_model=path_model,
        path_residual_us=path_residual_us, explore_path=explore_path, path_measured=path_measured,
        low_latency_rows=low_latency_rows, local_experts=local_experts,
    )  # fmt: skip


def _dispatch_dedup(
    rows: torch.Tensor,
    dest_TK: torch.Tensor,
    x_TD: torch.Tensor,
    *,
    layout: _RowLayout,
    groups: GraceGroups,
    slot_stride: int,
    num_local_slots: int,
    hierarchical: bool,
    counters: TrafficCounters | None,
    path_model: PathModel | None,
    path_residual_us: tuple[int, int],
    explore_path: bool,
    path_measured: tuple[bool, bool],
    low_latency_rows: int | None,
    local_experts: Callable[[torch.Tensor, Sequence[int]], torch.Tensor] | None,
) -> tuple[torch.Tensor, DispatchMeta]:
    """The deduplicating paths: header round (low-latency buffer or row counts), then, for the ranks
    that did not fit the buffer, the flat or hierarchical rounds; own routes stay local."""
    topology = groups.topology
    world, nodes, gpus, me = topology.world_size, topology.num_nodes, topology.gpus_per_node, groups.ep_index
    tokens = int(dest_TK.shape[0])
    ll = low_latency_rows
    fits = ll is not None and tokens <= ll
    adaptive = path_model is not None and hierarchical and nodes > 1
    member_TR = _membership(dest_TK, world)
    routed_R = member_TR.sum(0)
    zero_R = torch.zeros_like(routed_R)
    local_first = local_experts is not None and world > 1
    # the destinations over the wire: with local_first, routes of this rank's tokens to itself stay here
    net_dest_TK = torch.where(dest_TK == me, -1, dest_TK) if local_first else dest_TK
    net_member_TR = member_TR.clone() if local_first else member_TR
    if local_first:
        net_member_TR[:, me] = False
    relay_TK = torch.where(net_dest_TK >= 0, net_dest_TK // gpus * gpus + groups.local_rank, -1)
    # header columns: counts per peer, then values that are the same for every peer (one tensor op each)
    per_peer: dict[str, torch.Tensor] = {}
    same: dict[str, int] = {}
    if ll is not None:
        per_peer["ll"] = net_member_TR.sum(0) if fits else zero_R
        same["tokens"] = tokens
    per_peer["routed"] = zero_R if fits else net_member_TR.sum(0)
    if hierarchical:
        per_peer["relay"] = zero_R if fits else _membership(relay_TK, world).sum(0)
    if adaptive:
        if fits:  # nothing of this rank goes by the normal rounds
            summary = [0] * (3 * nodes)
        else:
            summary = rank_summary(net_member_TR, ep_index=me, topology=topology).tolist()
        same.update({f"summary{i}": int(value) for i, value in enumerate(summary)})
        same["residual_flat"], same["residual_hier"] = (int(micros) for micros in path_residual_us)
        same["explore"] = int(explore_path)
        same["measured"] = int(path_measured[0]) | int(path_measured[1]) << 1
    names = [*per_peer, *same]
    col = {name: i for i, name in enumerate(names)}
    header_RC = torch.stack(list(per_peer.values()), dim=1).to(torch.int64)
    if same:
        same_RC = torch.tensor(list(same.values()), dtype=torch.int64, device=dest_TK.device).expand(
            world, -1
        )
        header_RC = torch.cat([header_RC, same_RC], dim=1)

    local: _LocalRoutes | None = None

    def run_local() -> None:  # this rank's own routes to itself, while the first round is in flight
        nonlocal local
        if local_first and local is None:
            assert local_experts is not None  # local_first implies experts
            local = _local_routes(rows, dest_TK, me=me, slot_stride=slot_stride, layout=layout,
                                  num_local_slots=num_local_slots, experts=local_experts, counters=counters)  # fmt: skip

    ll_send: tuple[torch.Tensor, torch.Tensor] | None = None
    if fits and ll:
        peer_S, src_row_S = net_member_TR.t().nonzero(as_tuple=True)
        ll_send = (peer_S, src_row_S)
    received_header_RC, ll_rows_V = _exchange_header(
        header_RC, rows, net_dest_TK, ll_send=ll_send, ll=ll or 0, layout=layout, groups=groups, counters=counters,
        while_in_flight=run_local if fits else None,
    )  # fmt: skip
    if fits:
        run_local()
    header = received_header_RC.tolist()
    mine = header_RC.tolist()
    branches: list[Branch] = []
    parts: list[torch.Tensor] = []
    offset = 0
    max_tokens = None
    any_ll, any_normal = False, True
    if ll is not None:
        counts = [row[col["tokens"]] for row in header]
        max_tokens = max(counts)
        any_ll = ll > 0 and any(0 < t <= ll for t in counts)
        any_normal = any(t > ll for t in counts)
    if any_ll:
        assert ll_rows_V is not None  # any_ll implies ll > 0, so the buffer was exchanged
        src_row_S = ll_send[1] if ll_send is not None else dest_TK.new_zeros(0)
        exchange = Exchange(
            stage="dispatch.ll", group=groups.ep_group, peer_ep_ranks=tuple(range(world)), src_row_S=src_row_S,
            send_splits=tuple(int(row[col["ll"]]) for row in mine),
            recv_splits=tuple(int(row[col["ll"]]) for row in header), num_input_rows=tokens,
        )  # fmt: skip
        branches.append(Branch((exchange,), offset, int(ll_rows_V.shape[0])))
        parts.append(ll_rows_V)
        offset += int(ll_rows_V.shape[0])
    hierarchical_used = None
    costs_s: tuple[float, float] | None = None
    corrected_s: tuple[float, float] | None = None
    explored = False
    if any_normal:
        normal_dest_TK = torch.full_like(dest_TK, -1) if fits else net_dest_TK
        hierarchical_used = hierarchical
        if adaptive:
            assert path_model is not None  # adaptive implies a model
            first = col["summary0"]
            summary_RC = np.array([row[first : first + 3 * nodes] for row in header])
            costs_s = path_costs(
                summary_RC, topology=topology, model=path_model,
                dispatch_row_bytes=layout.width, combine_row_bytes=layout.hidden * _itemsize(layout.dtype),
            )  # fmt: skip
            first = col["residual_flat"]
            corrected_s = corrected_costs(costs_s, np.array([row[first : first + 2] for row in header]))
            explore = any(row[col["explore"]] for row in header)
            measured = tuple(all(row[col["measured"]] >> path & 1 for row in header) for path in (0, 1))
            hierarchical_used, explored = choose_path(corrected_s, explore=explore, measured=measured)
        routed_from = [int(row[col["routed"]]) for row in header]
        exchanges: list[Exchange] = []
        current = rows
        if hierarchical_used:
            if nodes > 1:
                normal_relay_TK = torch.full_like(relay_TK, -1) if fits else relay_TK
                current, exchange = _send_rows(
                    current, normal_relay_TK, stage="dispatch.stage1", group=groups.ep_group,
                    peer_ep_ranks=tuple(range(world)), recv_splits=[int(row[col["relay"]]) for row in header],
                    dedup=True, layout=layout, groups=groups, counters=counters, while_in_flight=run_local,
                )  # fmt: skip
                exchanges.append(exchange)
            elif local_first:  # no stage 1 (one node): drop the routes that stay here from the sent codes
                current = rows.clone()
                code_TK = layout.unpack(current).code
                code_TK.copy_(torch.where(dest_TK == me, -1, code_TK))
            node_ranks = tuple(groups.intra_ep_indices)
            code_VK = layout.unpack(current).code
            intra_VK = torch.where(code_VK >= 0, code_VK.long() // slot_stride - node_ranks[0], -1)
            arrivals = np.asarray(routed_from, dtype=np.int64).reshape(nodes, gpus).sum(0).tolist()
            current, exchange = _send_rows(
                current, intra_VK, stage="dispatch.stage2", group=groups.intra_group if gpus > 1 else None,
                peer_ep_ranks=node_ranks, recv_splits=arrivals, dedup=True, layout=layout, groups=groups,
                counters=counters, while_in_flight=run_local,
            )  # fmt: skip
            exchanges.append(exchange)
        else:
            current, exchange = _send_rows(
                current, normal_dest_TK, stage="dispatch", group=groups.ep_group if world > 1 else None,
                peer_ep_ranks=tuple(range(world)), recv_splits=routed_from, dedup=True, layout=layout,
                groups=groups, counters=counters, while_in_flight=run_local,
            )  # fmt: skip
            exchanges.append(exchange)
        branches.append(Branch(tuple(exchanges), offset, int(current.shape[0])))
        parts.append(current)
        offset += int(current.shape[0])
    run_local()
    received = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else rows[:0])
    x_QD, meta = _finish(
        received, branches, layout, x_TD, groups=groups, slot_stride=slot_stride, num_local_slots=num_local_slots,
        counters=counters, hierarchical_used=hierarchical_used, max_tokens=max_tokens,
    )  # fmt: skip
    if costs_s is not None:
        meta = dataclasses.replace(
            meta, path_costs_s=costs_s, path_corrected_s=corrected_s, path_explored=explored
        )
    if local is None:
        return x_QD, meta
    # the local rows come after every received row: their own branch, summed into the tokens in place
    local_branch = Branch((Exchange(stage="local", group=None, peer_ep_ranks=(me,), src_row_S=local.src_row_L,
                                    send_splits=(), recv_splits=(), num_input_rows=tokens),),
                          meta.num_received_rows, int(local.src_row_L.shape[0]))  # fmt: skip
    return x_QD, dataclasses.replace(
        meta,
        branches=(*meta.branches, local_branch),
        local=local,
        num_received_rows=meta.num_received_rows + int(local.src_row_L.shape[0]),
    )


def _finish(
    received_VW: torch.Tensor,
    branches: list[Branch],
    layout: _RowLayout,
    x_TD: torch.Tensor,
    *,
    groups: GraceGroups,
    slot_stride: int,
    num_local_slots: int,
    counters: TrafficCounters | None,
    hierarchical_used: bool | None = None,
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, DispatchMeta]:
    """Bucket the received routes by local slot: the experts' input rows and combine's metadata."""
    me = groups.ep_index
    view = layout.unpack(received_VW)
    route_row_Q, route_weight_Q, slot_splits = _routes_by_slot(
        view, view.code >= 0, me=me, slot_stride=slot_stride, num_local_slots=num_local_slots,
        counters=counters, what="received routes for",
    )  # fmt: skip
    meta = DispatchMeta(
        branches=tuple(branches),
        route_row_Q=route_row_Q,
        route_weight_Q=route_weight_Q,
        slot_splits=tuple(slot_splits),
        num_tokens=int(x_TD.shape[0]),
        num_received_rows=int(received_VW.shape[0]),
        out_dtype=x_TD.dtype,
        hierarchical_used=hierarchical_used,
        max_tokens=max_tokens,
    )
    return view.x.index_select(0, route_row_Q), meta


def combine(
    expert_out_QD: torch.Tensor,
    meta: DispatchMeta,
    *,
    groups: GraceGroups,
    counters: TrafficCounters | None = None,
) -> torch.Tensor:
    """Weight the expert outputs, add them up per token and send them home: returns y_TD.

    expert_out_QD[q] is the output of route q of ``meta``. Sums are kept in fp32 on each rank and
    travel in the input dtype. Collective, like dispatch.
    """
    if expert_out_QD.shape[0] != meta.route_row_Q.shape[0]:
        raise ValueError(
            f"expert_out has {expert_out_QD.shape[0]} rows but dispatch produced {meta.route_row_Q.shape[0]}"
        )
    hidden = int(expert_out_QD.shape[1])
    partial_VD = expert_out_QD.new_zeros(meta.num_received_rows, hidden, dtype=torch.float32)
    partial_VD.index_add_(0, meta.route_row_Q, expert_out_QD.float() * meta.route_weight_Q.unsqueeze(1))
    if meta.local is not None:
        local, start = meta.local, meta.branches[-1].row_offset
        partial_VD.index_add_(
            0, start + local.route_row_Q, local.out_QD.float() * local.route_weight_Q.unsqueeze(1)
        )
    y_TD: torch.Tensor | None = None
    for branch in meta.branches:
        part_VD = partial_VD[branch.row_offset : branch.row_offset + branch.num_rows]
        for exchange in reversed(branch.exchanges):
            if exchange.is_local:
                returned = part_VD
            else:
                returned = _all_to_all(
                    part_VD.to(meta.out_dtype),
                    send_splits=exchange.recv_splits,
                    recv_splits=exchange.send_splits,
                    group=exchange.group,
                )
                if counters is not None:
                    counters.record_exchange(
                        exchange.stage.replace("dispatch", "combine"),
                        send_rows=exchange.recv_splits,
                        recv_rows=exchange.send_splits,
                        peer_ep_ranks=exchange.peer_ep_ranks,
                        ep_index=groups.ep_index,
                        topology=groups.topology,
                        bytes_per_row=hidden * _itemsize(meta.out_dtype),
                    )
            summed = returned.new_zeros(exchange.num_input_rows, hidden, dtype=torch.float32)
            part_VD = summed.index_add_(0, exchange.src_row_S, returned.float())
        y_TD = part_VD if y_TD is None else y_TD + part_VD
    if y_TD is None:
        y_TD = expert_out_QD.new_zeros(meta.num_tokens, hidden, dtype=torch.float32)
    if counters is not None:
        counters.forwards += 1
    return y_TD.to(meta.out_dtype)


def redistribute_expert_tensors(
    owned: Mapping[int, torch.Tensor],
    *,
    owner_of_expert: Sequence[int],
    needed_by_rank: Sequence[Sequence[int]],
    numel: int,
    dtype: torch.dtype,
    device: torch.device | str,
    groups: GraceGroups,
) -> dict[int, torch.Tensor]:
    """Give every EP rank the flat tensors of the experts it needs, from the ranks that own them.

    owned maps expert id -> 1-D tensor of `numel` elements for the experts whose owner_of_expert
    entry is this rank. Sizes follow from the arguments, which every rank passes identically
    (except `owned`), so one all-to-all suffices. Returns expert id -> tensor (dtype, device) for
    every expert in needed_by_rank[this rank]. Collective.
    """
    me, num_ranks = groups.ep_index, groups.topology.world_size
    if len(needed_by_rank) != num_ranks:
        raise ValueError(
            f"needed_by_rank has {len(needed_by_rank)} entries; the EP group has {num_ranks} ranks"
        )
    wanted = [sorted({int(e) for e in experts}) for experts in needed_by_rank]
    send = [[e for e in wanted[q] if owner_of_expert[e] == me] for q in range(num_ranks)]
    recv = [[e for e in wanted[me] if owner_of_expert[e] == r] for r in range(num_ranks)]
    chunks = []
    for e in (e for experts in send for e in experts):
        if e not in owned:
            raise ValueError(f"EP rank {me} owns expert {e} by owner_of_expert but `owned` lacks it")
        if owned[e].numel() != numel:
            raise ValueError(
                f"owned[{e}] has {owned[e].numel()} elements; every expert must have numel={numel}"
            )
        chunks.append(owned[e].reshape(-1).to(device=device, dtype=dtype))
    send_buf = torch.cat(chunks) if chunks else torch.empty(0, dtype=dtype, device=device)
    send_splits = [numel * len(experts) for experts in send]
    recv_splits = [numel * len(experts) for experts in recv]
    if groups.ep_group is None:
        recv_buf = send_buf
    else:
        recv_buf = _all_to_all(
            send_buf, send_splits=send_splits, recv_splits=recv_splits, group=groups.ep_group
        )
    flat_order = [e for experts in recv for e in experts]
    return {e: recv_buf[i * numel : (i + 1) * numel] for i, e in enumerate(flat_order)}


@dataclass(frozen=True)
class _RowLayout:
    k: int
    hidden: int
    dtype: torch.dtype

    @property
    def width(self) -> int:
        return dispatch_row_bytes(self.k, self.hidden, self.dtype)

    def pack(self, x_SD: torch.Tensor, code_SK: torch.Tensor, weight_SK: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(x_SD.shape[0], self.width, dtype=torch.uint8, device=x_SD.device)
        views = self.unpack(buf)
        views.code.copy_(code_SK)
        views.weight.copy_(weight_SK)
        views.x.copy_(x_SD)
        return buf

    def unpack(self, buf: torch.Tensor) -> _Rows:
        k = self.k
        return _Rows(
            x=buf[:, 8 * k : 8 * k + self.hidden * _itemsize(self.dtype)].view(self.dtype),
            code=buf[:, : 4 * k].view(torch.int32),
            weight=buf[:, 4 * k : 8 * k].view(torch.float32),
        )


@dataclass(frozen=True)
class _Rows:
    x: torch.Tensor
    code: torch.Tensor
    weight: torch.Tensor


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _membership(target_VK: torch.Tensor, num_targets: int) -> torch.Tensor:
    """needs_VP[v, p]: does any route of row v go to target p (-1 entries go nowhere)."""
    index = torch.where(target_VK >= 0, target_VK, num_targets).long()
    needs = torch.zeros(target_VK.shape[0], num_targets + 1, dtype=torch.bool, device=target_VK.device)
    needs.scatter_(1, index, True)
    return needs[:, :num_targets]


def _all_to_all(
    send: torch.Tensor,
    *,
    send_splits: Sequence[int],
    recv_splits: Sequence[int],
    group: Any,
    while_in_flight: Callable[[], None] | None = None,
) -> torch.Tensor:
    out = send.new_empty((int(sum(recv_splits)), *send.shape[1:]))
    work = dist.all_to_all_single(
        out,
        send.contiguous(),
        output_split_sizes=list(recv_splits),
        input_split_sizes=list(send_splits),
        group=group,
        async_op=while_in_flight is not None,
    )
    if while_in_flight is not None:
        while_in_flight()
        work.wait()
    return out


@dataclass(frozen=True)
class _LocalRoutes:
    """Routes of this rank's own tokens to itself: rows src_row_L of its tokens, their routes
    (route_row_Q into those rows, ordered by slot), gate weights and expert outputs."""

    src_row_L: torch.Tensor
    route_row_Q: torch.Tensor
    route_weight_Q: torch.Tensor
    out_QD: torch.Tensor


def _local_routes(
    rows_TW: torch.Tensor,
    dest_TK: torch.Tensor,
    *,
    me: int,
    slot_stride: int,
    layout: _RowLayout,
    num_local_slots: int,
    experts: Callable[[torch.Tensor, Sequence[int]], torch.Tensor],
    counters: TrafficCounters | None,
) -> _LocalRoutes:
    """Run this rank's experts on its own tokens' routes to itself (no collective)."""
    mine_TK = dest_TK == me
    src_row_L = mine_TK.any(dim=1).nonzero(as_tuple=True)[0]
    view = layout.unpack(rows_TW.index_select(0, src_row_L))
    route_row_Q, route_weight_Q, slot_splits = _routes_by_slot(
        view, mine_TK[src_row_L], me=me, slot_stride=slot_stride, num_local_slots=num_local_slots,
        counters=counters, what="routes to its",
    )  # fmt: skip
    out_QD = experts(view.x.index_select(0, route_row_Q), slot_splits)
    return _LocalRoutes(src_row_L, route_row_Q, route_weight_Q, out_QD)


def _routes_by_slot(
    view: _Rows,
    routed_VK: torch.Tensor,
    *,
    me: int,
    slot_stride: int,
    num_local_slots: int,
    counters: TrafficCounters | None,
    what: str,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The routes routed_VK marks in `view`, ordered by local slot: (row of each route, its gate
    weight, routes per slot). A slot beyond this rank's means the ranks serve different plans."""
    row_Q, k_Q = routed_VK.nonzero(as_tuple=True)
    slot_Q = view.code[row_Q, k_Q].long() - me * slot_stride
    order_Q = torch.argsort(slot_Q, stable=True)
    slot_splits = torch.bincount(slot_Q, minlength=num_local_slots).tolist()
    if len(slot_splits) != num_local_slots:
        raise RuntimeError(
            f"EP rank {me} {what} slot {len(slot_splits) - 1} but hosts {num_local_slots} slots: the ranks "
            "do not serve the same plan"
        )
    if counters is not None:
        counters.record_expert_rows(slot_splits)
    return row_Q[order_Q], view.weight[row_Q, k_Q][order_Q], slot_splits


def _exchange_sizes(
    sizes_RC: torch.Tensor, *, groups: GraceGroups, counters: TrafficCounters | None
) -> torch.Tensor:
    """Send row counts sizes_RC[q] to every EP rank q; return what each rank sent here."""
    num_ranks = groups.topology.world_size
    if groups.ep_group is None:
        return sizes_RC
    received = _all_to_all(
        sizes_RC, send_splits=[1] * num_ranks, recv_splits=[1] * num_ranks, group=groups.ep_group
    )
    if counters is not None:
        counters.record_exchange(
            "sizes",
            send_rows=[1] * num_ranks,
            recv_rows=[1] * num_ranks,
            peer_ep_ranks=range(num_ranks),
            ep_index=groups.ep_index,
            topology=groups.topology,
            bytes_per_row=sizes_RC.shape[1] * _SIZES_BYTES_PER_COUNT,
        )
    return received


def _exchange_header(
    header_RC: torch.Tensor,
    rows_TW: torch.Tensor,
    dest_TK: torch.Tensor,
    *,
    ll_send: tuple[torch.Tensor, torch.Tensor] | None,
    ll: int,
    layout: _RowLayout,
    groups: GraceGroups,
    counters: TrafficCounters | None,
    while_in_flight: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round 1: every peer's header row; with ll > 0 inside a fixed buffer of ll rows per peer that
    also carries this rank's rows when it fits (ll_send = (peer_S, src_row_S), sorted by peer).
    Returns (received header_RC, the received low-latency rows [V, W] or None when ll is 0)."""
    if ll == 0:
        return _exchange_sizes(header_RC, groups=groups, counters=counters), None
    world, width = groups.topology.world_size, layout.width
    columns = int(header_RC.shape[1])
    head_rows = -(-columns * _SIZES_BYTES_PER_COUNT // width)
    block = head_rows + ll
    buf_RBW = torch.zeros(world, block, width, dtype=torch.uint8, device=rows_TW.device)
    head = buf_RBW[:, :head_rows].reshape(world, head_rows * width)
    head[:, : columns * _SIZES_BYTES_PER_COUNT] = header_RC.contiguous().view(torch.uint8)
    if ll_send is not None and ll_send[0].numel():
        peer_S, src_row_S = ll_send
        counts_R = torch.bincount(peer_S, minlength=world)
        starts_R = torch.cumsum(counts_R, 0) - counts_R
        position_S = torch.arange(peer_S.shape[0], device=peer_S.device) - starts_R[peer_S]
        sent_SW = rows_TW.index_select(0, src_row_S)
        layout.unpack(sent_SW).code.copy_(_codes_for(layout.unpack(sent_SW).code, dest_TK[src_row_S], peer_S))
        buf_RBW[peer_S, head_rows + position_S] = sent_SW
    if groups.ep_group is None:
        recv_RBW = buf_RBW
    else:
        recv_RBW = _all_to_all(
            buf_RBW.view(world * block, width), send_splits=[block] * world, recv_splits=[block] * world,
            group=groups.ep_group, while_in_flight=while_in_flight,
        ).view(world, block, width)  # fmt: skip
        if counters is not None:
            common = dict(peer_ep_ranks=range(world), ep_index=groups.ep_index, topology=groups.topology)
            counters.record_exchange("sizes", send_rows=[1] * world, recv_rows=[1] * world,
                                     bytes_per_row=head_rows * width, **common)  # fmt: skip
            counters.record_exchange("dispatch.ll", send_rows=[ll] * world, recv_rows=[ll] * world,
                                     bytes_per_row=width, **common)  # fmt: skip
    received_RC = (
        recv_RBW[:, :head_rows]
        .reshape(world, head_rows * width)[:, : columns * _SIZES_BYTES_PER_COUNT]
        .contiguous()
        .view(torch.int64)
    )
    counts = received_RC[:, 0].tolist()  # column 0 is the low-latency row count in this mode
    index = [q * block + head_rows + i for q in range(world) for i in range(int(counts[q]))]
    flat = recv_RBW.view(world * block, width)
    ll_rows = flat.index_select(0, torch.tensor(index, dtype=torch.long, device=flat.device))
    return received_RC, ll_rows


def _codes_for(code_SK: torch.Tensor, peer_SK: torch.Tensor, peer_S: torch.Tensor) -> torch.Tensor:
    """Each sent row keeps only the codes of its routes for its destination."""
    return torch.where(peer_SK == peer_S.unsqueeze(1), code_SK, -1)


def _send_rows(
    rows_VW: torch.Tensor,
    peer_VK: torch.Tensor,
    *,
    stage: str,
    group: Any,
    peer_ep_ranks: tuple[int, ...],
    recv_splits: list[int] | None,
    dedup: bool,
    layout: _RowLayout,
    groups: GraceGroups,
    counters: TrafficCounters | None,
    while_in_flight: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, Exchange]:
    """Send each packed row to the peers its routes name (peer_VK: index into peer_ep_ranks, or -1).

    With dedup a row goes once per peer carrying all its routes for that peer; without, once per
    route. A row's sent copy keeps only the codes of the routes for its destination. Without
    recv_splits, a row-count exchange precedes the payload. while_in_flight runs while the payload
    collective is in flight (it must not call collectives on this group).
    """
    num_peers = len(peer_ep_ranks)
    sent_SW: torch.Tensor
    if dedup:
        peer_S, src_row_S = _membership(peer_VK, num_peers).t().nonzero(as_tuple=True)
        sent_SW = rows_VW.index_select(0, src_row_S)
        code_SK = layout.unpack(sent_SW).code
        code_SK.copy_(_codes_for(code_SK, peer_VK[src_row_S], peer_S))
    else:
        row_R, k_R = (peer_VK >= 0).nonzero(as_tuple=True)
        order = torch.argsort(peer_VK[row_R, k_R], stable=True)
        src_row_S, k_S = row_R[order], k_R[order]
        peer_S = peer_VK[src_row_S, k_S]
        sent_SW = rows_VW.index_select(0, src_row_S)
        code_SK = layout.unpack(sent_SW).code
        keep_SK = torch.zeros_like(code_SK, dtype=torch.bool)
        keep_SK[torch.arange(src_row_S.shape[0], device=peer_VK.device), k_S] = True
        code_SK.copy_(torch.where(keep_SK, code_SK, -1))
    send_splits = torch.bincount(peer_S, minlength=num_peers).tolist()
    if group is None:
        received_VW = sent_SW
        recv_splits = send_splits
    else:
        if recv_splits is None:
            sizes_P1 = torch.tensor(send_splits, dtype=torch.int64, device=rows_VW.device).unsqueeze(1)
            recv_splits = _exchange_sizes(sizes_P1, groups=groups, counters=counters)[:, 0].tolist()
        received_VW = _all_to_all(
            sent_SW,
            send_splits=send_splits,
            recv_splits=recv_splits,
            group=group,
            while_in_flight=while_in_flight,
        )
        if counters is not None:
            counters.record_exchange(
                stage,
                send_rows=send_splits,
                recv_rows=recv_splits,
                peer_ep_ranks=peer_ep_ranks,
                ep_index=groups.ep_index,
                topology=groups.topology,
                bytes_per_row=layout.width,
            )
    exchange = Exchange(
        stage=stage,
        group=group,
        peer_ep_ranks=peer_ep_ranks,
        src_row_S=src_row_S,
        send_splits=tuple(int(s) for s in send_splits),
        recv_splits=tuple(int(s) for s in recv_splits),
        num_input_rows=int(rows_VW.shape[0]),
    )
    return received_VW, exchange
