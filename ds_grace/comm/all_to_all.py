"""Sparse dispatch and combine of routed tokens, flat or hierarchical (GRACE's HSC).

Shape legend: T tokens on this rank, K top-k, D hidden, R expert-parallel (EP) ranks, N nodes,
G GPUs per node, P peers of one exchange, S rows one exchange sends, V rows it receives,
Q routes computed on this rank (expert input rows).

Every collective is ``all_to_all_single`` with explicit split sizes (gloo and NCCL), preceded by
one exchange of row counts. Only real rows travel: no capacity, no padding, no dropped route.

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
into one byte row, so each stage is a single payload collective.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ds_grace.comm.counters import TrafficCounters
from ds_grace.comm.groups import GraceGroups

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
class DispatchMeta:
    """What combine needs: the exchanges in dispatch order and the routes computed here.

    route_row_Q[q] is the received row that route q (expert input row q, ordered by local slot)
    came with; route_weight_Q its fp32 gate weight; slot_splits the expert input rows per slot.
    """

    exchanges: tuple[Exchange, ...]
    route_row_Q: torch.Tensor
    route_weight_Q: torch.Tensor
    slot_splits: tuple[int, ...]
    num_tokens: int
    num_received_rows: int
    out_dtype: torch.dtype


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
) -> tuple[torch.Tensor, DispatchMeta]:
    """Send every routed token to the ranks computing its routes.

    rank_TK / slot_TK: EP rank and local slot of each route's instance (-1: no route), identical
    to what ``ds_grace.routing.choose_instances`` returns; weight_TK: gate weights. slot_stride
    must exceed every rank's slot count. Returns (x_QD, meta): the expert input rows of this rank,
    grouped by local slot (``meta.slot_splits``), and the metadata ``combine`` consumes.
    Collective: every rank of the EP group must call it.
    """
    topology = groups.topology
    if hierarchical and not dedup:
        raise ValueError("dedup (false) must be true when hierarchical is true")
    if x_TD.dim() != 2 or rank_TK.shape != slot_TK.shape or rank_TK.shape != weight_TK.shape:
        raise ValueError(
            f"x ({tuple(x_TD.shape)}) must be [T, D] and rank/slot/weight ({tuple(rank_TK.shape)}, "
            f"{tuple(slot_TK.shape)}, {tuple(weight_TK.shape)}) [T, K] with the same T"
        )
    if rank_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"routes cover {rank_TK.shape[0]} tokens but x has {x_TD.shape[0]}")
    valid_TK = rank_TK >= 0
    code_TK = torch.where(valid_TK, rank_TK * slot_stride + slot_TK, -1).to(torch.int32)
    weight_TK = weight_TK.to(torch.float32)
    layout = _RowLayout(k=int(rank_TK.shape[1]), hidden=int(x_TD.shape[1]), dtype=x_TD.dtype)
    rows = _Rows(x=x_TD, code=code_TK, weight=weight_TK)
    exchanges: list[Exchange] = []
    me, gpus = groups.ep_index, topology.gpus_per_node
    if hierarchical:
        node_ranks = tuple(groups.intra_ep_indices)
        node_TK = torch.where(valid_TK, rank_TK // gpus, -1)
        relay_TK = torch.where(valid_TK, node_TK * gpus + groups.local_rank, -1)
        sizes_R2 = torch.zeros(topology.world_size, 2, dtype=torch.int64, device=x_TD.device)
        sizes_R2[:, 0] = _membership(relay_TK, topology.world_size).sum(0)
        sizes_R2[:, 1] = _membership(torch.where(valid_TK, rank_TK, -1), topology.world_size).sum(0)
        recv_sizes_R2 = _exchange_sizes(sizes_R2, groups=groups, counters=counters)
        if topology.num_nodes > 1:
            rows, exchange = _send_rows(
                rows,
                relay_TK,
                stage="dispatch.stage1",
                group=groups.ep_group,
                peer_ep_ranks=tuple(range(topology.world_size)),
                recv_splits=recv_sizes_R2[:, 0].tolist(),
                dedup=True,
                layout=layout,
                groups=groups,
                counters=counters,
            )
            exchanges.append(exchange)
        dest_VK = torch.where(rows.code >= 0, rows.code.long() // slot_stride, -1)
        intra_VK = torch.where(dest_VK >= 0, dest_VK - node_ranks[0], -1)
        arrivals_NG = recv_sizes_R2[:, 1].view(topology.num_nodes, gpus)
        rows, exchange = _send_rows(
            rows,
            intra_VK,
            stage="dispatch.stage2",
            group=groups.intra_group if gpus > 1 else None,
            peer_ep_ranks=node_ranks,
            recv_splits=arrivals_NG.sum(0).tolist(),
            dedup=True,
            layout=layout,
            groups=groups,
            counters=counters,
        )
        exchanges.append(exchange)
    else:
        dest_TK = torch.where(valid_TK, rank_TK, -1)
        rows, exchange = _send_rows(
            rows,
            dest_TK,
            stage="dispatch",
            group=groups.ep_group if topology.world_size > 1 else None,
            peer_ep_ranks=tuple(range(topology.world_size)),
            recv_splits=None,
            dedup=dedup,
            layout=layout,
            groups=groups,
            counters=counters,
        )
        exchanges.append(exchange)

    routed_VK = rows.code >= 0
    row_Q, k_Q = routed_VK.nonzero(as_tuple=True)
    slot_Q = rows.code[row_Q, k_Q].long() - me * slot_stride
    order_Q = torch.argsort(slot_Q, stable=True)
    slot_splits = torch.bincount(slot_Q, minlength=num_local_slots).tolist()
    if len(slot_splits) != num_local_slots:
        raise RuntimeError(
            f"EP rank {me} received routes for slot {len(slot_splits) - 1} but hosts {num_local_slots} "
            "slots: the ranks do not serve the same plan"
        )
    route_row_Q = row_Q[order_Q]
    route_weight_Q = rows.weight[row_Q, k_Q][order_Q]
    if counters is not None:
        counters.record_expert_rows(slot_splits)
    meta = DispatchMeta(
        exchanges=tuple(exchanges),
        route_row_Q=route_row_Q,
        route_weight_Q=route_weight_Q,
        slot_splits=tuple(slot_splits),
        num_tokens=int(x_TD.shape[0]),
        num_received_rows=int(rows.x.shape[0]),
        out_dtype=x_TD.dtype,
    )
    return rows.x.index_select(0, route_row_Q), meta


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
    for exchange in reversed(meta.exchanges):
        if exchange.is_local:
            returned = partial_VD
        else:
            returned = _all_to_all(
                partial_VD.to(meta.out_dtype),
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
        partial_VD = summed.index_add_(0, exchange.src_row_S, returned.float())
    if counters is not None:
        counters.forwards += 1
    return partial_VD.to(meta.out_dtype)


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
    send: torch.Tensor, *, send_splits: Sequence[int], recv_splits: Sequence[int], group: Any
) -> torch.Tensor:
    out = send.new_empty((int(sum(recv_splits)), *send.shape[1:]))
    dist.all_to_all_single(
        out,
        send.contiguous(),
        output_split_sizes=list(recv_splits),
        input_split_sizes=list(send_splits),
        group=group,
    )
    return out


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


def _send_rows(
    rows: _Rows,
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
) -> tuple[_Rows, Exchange]:
    """Send each row to the peers its routes name (peer_VK: index into peer_ep_ranks, or -1).

    With dedup a row goes once per peer carrying all its routes for that peer; without, once per
    route. A row's sent copy keeps only the codes of the routes for its destination.
    """
    num_peers = len(peer_ep_ranks)
    if dedup:
        peer_S, src_row_S = _membership(peer_VK, num_peers).t().nonzero(as_tuple=True)
        keep_SK = peer_VK[src_row_S] == peer_S.unsqueeze(1)
    else:
        row_R, k_R = (peer_VK >= 0).nonzero(as_tuple=True)
        order = torch.argsort(peer_VK[row_R, k_R], stable=True)
        src_row_S, k_S = row_R[order], k_R[order]
        peer_S = peer_VK[src_row_S, k_S]
        keep_SK = torch.zeros(src_row_S.shape[0], peer_VK.shape[1], dtype=torch.bool, device=peer_VK.device)
        keep_SK[torch.arange(src_row_S.shape[0], device=peer_VK.device), k_S] = True
    send_splits = torch.bincount(peer_S, minlength=num_peers).tolist()
    code_SK = torch.where(keep_SK, rows.code[src_row_S], -1)
    if group is None:
        sent = _Rows(x=rows.x.index_select(0, src_row_S), code=code_SK, weight=rows.weight[src_row_S])
        recv_splits = send_splits
    else:
        if recv_splits is None:
            sizes_P1 = torch.tensor(send_splits, dtype=torch.int64, device=rows.x.device).unsqueeze(1)
            recv_splits = _exchange_sizes(sizes_P1, groups=groups, counters=counters)[:, 0].tolist()
        packed = layout.pack(rows.x.index_select(0, src_row_S), code_SK, rows.weight[src_row_S])
        sent = layout.unpack(
            _all_to_all(packed, send_splits=send_splits, recv_splits=recv_splits, group=group)
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
        num_input_rows=int(rows.x.shape[0]),
    )
    return sent, exchange
