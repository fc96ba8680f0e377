"""Sparse dispatch and combine of routed tokens: one executor for every path (ds_grace.comm.schedule).

Shape legend: T tokens on this rank, K top-k, D hidden, R expert-parallel (EP) ranks, N nodes,
G GPUs per node, V rows a rank holds, S rows a hop sends, Q routes computed here (expert input
rows), C header columns, W bytes of one packed row.

Every dispatched row carries its routes: code = 1 + ep_rank * slot_stride + slot (0: not for this
destination) and the fp32 gate weight, packed with the hidden vector into one byte row, so each
hop is one payload collective (``ds_grace.comm.transport``).

Normal paths (flat, hierarchical): round 1, the header, is one fixed-size all-to-all over the EP
group: every rank sends every peer, as counts, what the whole forward will bring it: the rows of
the flat hop and of the hierarchical first hop, the rows a relay forwards to each GPU of its node,
the routes for each of the peer's slots, and the path policy's columns. One read of the sent and
received headers then gives every split of every hop (both paths) and the experts' rows per slot:
one host read per forward. The index work of each hop runs on the device (``schedule.membership``,
``schedule.rows_by_peer``); combine replays the hops in reverse, adding up a token's weighted
outputs on each rank before they travel (index_add), so a token crosses each node boundary at
most once per direction.

Low-latency path: static shapes, no host read. Every rank sends every peer a buffer of
``rows_per_peer`` rows (token t at row t, rows past the tokens zero: code 0, no route); each rank
computes the received routes whose codes are its own, grouped by slot, and adds them up per row with
their gate weights (``GraceExperts.forward_routes``); combine returns each row to the same place,
where the origin adds its peers' blocks. Every
rank must take it on the same forward with the same ``rows_per_peer`` (the caller's promise; a rank
with more tokens raises before any collective, ``GraceMOELayer.forward_routed``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ds_grace.comm.counters import TrafficCounters
from ds_grace.comm.groups import GraceGroups
from ds_grace.comm.schedule import (
    Hop,
    PathName,
    code_peer_lookup,
    membership,
    path_hops,
    rows_by_peer,
    value_counts,
)
from ds_grace.comm.transport import SparseTransport, Transport

_COUNT_BYTES = 8


def dispatch_row_bytes(k: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one dispatched row: K int32 codes, K fp32 weights, the hidden vector; 8-aligned."""
    raw = 8 * k + hidden * _itemsize(dtype)
    return (raw + 7) // 8 * 8


ID_RANGE_COLUMNS = 2  # the sender's lowest and highest expert id this forward


def header_columns(*, gpus_per_node: int, slot_stride: int, extra: int, hierarchical: bool = True) -> int:
    """Columns of one header row: flat rows, (hierarchical) relay rows and rows per GPU via the relay,
    routes per slot, the sender's expert id range, then `extra` columns of the path policy."""
    return 1 + (1 + gpus_per_node if hierarchical else 0) + slot_stride + ID_RANGE_COLUMNS + extra


def header_row_bytes(*, gpus_per_node: int, slot_stride: int, extra: int, hierarchical: bool = True) -> int:
    """Bytes of one header row (``header_columns`` int64 counts): what every rank sends every peer in
    the header round."""
    columns = header_columns(
        gpus_per_node=gpus_per_node, slot_stride=slot_stride, extra=extra, hierarchical=hierarchical
    )
    return _COUNT_BYTES * columns


@dataclass(frozen=True)
class Header:
    """The header round as host integers: sent_RC[p] went to peer p, received_RC[p] came from it."""

    sent_RC: np.ndarray
    received_RC: np.ndarray
    gpus_per_node: int  # 0 when the header carries no hierarchical columns
    slot_stride: int
    member_TR: torch.Tensor  # token t has a route on EP rank r (the flat hop's rows)
    reached_TN: torch.Tensor  # token t has a route on node n (the hierarchical first hop's rows)

    def column(self, name: str) -> slice:
        return _header_slices(self.gpus_per_node, self.slot_stride)[name]

    def extra(self) -> np.ndarray:
        """The path policy's columns of every rank (received_RC[r]: rank r's)."""
        return self.received_RC[:, self.column("extra")]

    def id_ranges(self) -> np.ndarray:
        """range_R2: every rank's lowest and highest expert id this forward (received_RC[r]: rank r's)."""
        return self.received_RC[:, self.column("ids")]


@functools.lru_cache(maxsize=64)
def _header_slices(gpus_per_node: int, slot_stride: int) -> dict[str, slice]:
    """The header's columns by name (``header_columns``); gpus_per_node 0: no hierarchical columns."""
    hier = 1 + gpus_per_node if gpus_per_node else 0
    ids = 1 + hier + slot_stride
    return {"flat": slice(0, 1), "relay": slice(1, 2), "via": slice(2, 1 + hier),
            "slots": slice(1 + hier, ids), "ids": slice(ids, ids + ID_RANGE_COLUMNS),
            "extra": slice(ids + ID_RANGE_COLUMNS, None)}  # fmt: skip


@dataclass(frozen=True)
class Stage:
    """One executed hop, kept so that combine can run it in reverse."""

    name: str
    group: Any
    peer_ep_ranks: tuple[int, ...]
    src_row_S: torch.Tensor
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    num_input_rows: int


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs. Normal paths: route_row_Q[q] is the received row route q (expert input
    row q, ordered by local slot) came with, route_weight_Q its gate weight, slot_splits the rows
    per slot, route_slot_Q the local slot of each (ascending). Low-latency: slot_VK[v, k] the local
    slot of received row v's route k (the slot count
    where the route is another rank's), weight_VK its gate weight."""

    path: str
    stages: tuple[Stage, ...]
    num_tokens: int
    num_received_rows: int
    out_dtype: torch.dtype
    route_row_Q: torch.Tensor | None = None
    route_weight_Q: torch.Tensor | None = None
    route_slot_Q: torch.Tensor | None = None
    slot_splits: tuple[int, ...] = ()
    slot_VK: torch.Tensor | None = None
    weight_VK: torch.Tensor | None = None
    rows_per_peer: int = 0


class DispatchExecutor:
    """Runs one layer's dispatch and combine over `groups` (one per layer; device tables cached)."""

    def __init__(
        self,
        *,
        groups: GraceGroups,
        slot_stride: int,
        num_local_slots: int,
        counters: TrafficCounters | None = None,
        transport: Transport | None = None,
    ) -> None:
        if slot_stride < max(1, num_local_slots):
            raise ValueError(f"slot_stride ({slot_stride}) must be >= the slot count ({num_local_slots})")
        self.groups = groups
        self.topology = groups.topology
        self.me = groups.ep_index
        self.slot_stride = slot_stride
        self.num_local_slots = num_local_slots
        self.counters = counters
        self.transport: Transport = transport if transport is not None else SparseTransport()
        self._lookups: dict[tuple[Any, ...], torch.Tensor] = {}  # device tables of this rank's plan

    def _group(self, hop: Hop) -> Any:
        group = self.groups.ep_group if hop.group == "ep" else self.groups.intra_group
        return group if hop.num_peers > 1 else None

    def exchange_header(
        self,
        code_TK: torch.Tensor,
        id_range_2: torch.Tensor,
        extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
        hierarchical: bool = True,
    ) -> Header:
        """Round 1 (one fixed-size all-to-all over the EP group) and its one host read.

        id_range_2 (this rank's lowest and highest expert id, on the device) goes to every peer, so that
        every rank can check every rank's ids after the read (``Header.id_ranges``) instead of reading
        its own before the round. extra(member_TR) gives the columns this rank sends every peer alike
        (the path policy's); without `hierarchical` the header carries the flat path's columns only."""
        topology, world = self.topology, self.topology.world_size
        nodes, gpus, stride = topology.num_nodes, topology.gpus_per_node, self.slot_stride
        tokens = code_TK.shape[0]
        everyone = path_hops("flat", topology, self.me)[0]
        member_TR = membership(code_TK, self._code_lookup(everyone, code_TK.device), world)
        if hierarchical:
            member_TNG = member_TR.view(tokens, nodes, gpus)
            reached_TN = member_TNG.any(2)
            per_gpu_NG = member_TNG.sum(0)
            is_local_G1 = self._local_mask(code_TK.device)
            relay_NG1 = (reached_TN.sum(0).view(nodes, 1, 1) * is_local_G1).view(nodes, gpus, 1)
            via_NGG = per_gpu_NG.view(nodes, 1, gpus) * is_local_G1
            counts_RC = torch.cat([per_gpu_NG.view(nodes, gpus, 1), relay_NG1, via_NGG], dim=2).view(
                world, 2 + gpus
            )
        else:
            reached_TN, counts_RC = member_TR[:, :0], member_TR.sum(0, keepdim=True).t()
        # bucket 0 holds the routes not taken (code 0)
        slots_RS = value_counts(code_TK, world * stride + 1)[1:].view(world, stride)
        parts = [counts_RC, slots_RS, id_range_2.to(torch.int64).expand(world, ID_RANGE_COLUMNS)]
        if extra is not None:
            parts.append(extra(member_TR).to(torch.int64).expand(world, -1))
        sent_RC = torch.cat(parts, dim=1)
        received_RC = sent_RC
        if self.groups.ep_group is not None:
            received_RC = self.transport.exchange_fixed(sent_RC, self.groups.ep_group)
            self._record(
                "sizes", [1] * world, [1] * world, tuple(range(world)), sent_RC.shape[1] * _COUNT_BYTES
            )
        both = np.asarray(torch.cat([sent_RC, received_RC]).tolist(), dtype=np.int64)
        return Header(both[:world], both[world:], gpus if hierarchical else 0, stride, member_TR, reached_TN)

    def hop_counts(self, path: PathName, header: Header) -> list[tuple[list[int], list[int]]]:
        """(send counts, receive counts) of every hop of `path`, from the header."""
        sent, received = header.sent_RC, header.received_RC
        flat, relay, via = header.column("flat"), header.column("relay"), header.column("via")
        if path == "flat" or self.topology.num_nodes == 1:
            return [(sent[:, flat].ravel().tolist(), received[:, flat].ravel().tolist())]
        gpus = self.topology.gpus_per_node
        forward = received[:, via].sum(0)  # rows this relay forwards to each GPU of its node
        arriving = received[:, flat].reshape(-1, gpus).sum(0)  # from relay j: origins with local rank j
        return [
            (sent[:, relay].ravel().tolist(), received[:, relay].ravel().tolist()),
            (forward.tolist(), arriving.tolist()),
        ]

    def slot_splits(self, header: Header) -> list[int]:
        """The expert input rows per local slot this forward brings (from the header)."""
        per_slot = header.received_RC[:, header.column("slots")].sum(0)
        if per_slot[self.num_local_slots :].any():
            raise RuntimeError(
                f"EP rank {self.me} received routes for slot {int(np.flatnonzero(per_slot)[-1])} but hosts "
                f"{self.num_local_slots} slots: the ranks do not serve the same plan"
            )
        return per_slot[: self.num_local_slots].tolist()

    def dispatch(
        self,
        rows_TW: torch.Tensor,
        *,
        path: PathName,
        header: Header,
        layout: RowLayout,
        first_stages: tuple[Stage, ...] = (),
    ) -> tuple[torch.Tensor, DispatchMeta]:
        """Send every packed row through the hops of `path`; returns (x_QD grouped by slot, meta)."""
        hops = path_hops(path, self.topology, self.me)
        stages: list[Stage] = list(first_stages)
        current_VW, member_VP = rows_TW, self._first_hop_rows(hops[0], header)
        for index, (hop, counts) in enumerate(zip(hops, self.hop_counts(path, header))):
            if index:  # a relay: the peers of the rows it holds, from their codes
                code_VK = layout.unpack(current_VW).code
                member_VP = membership(code_VK, self._code_lookup(hop, code_VK.device), hop.num_peers)
            name = "dispatch" if len(hops) == 1 else f"dispatch.stage{index + 1}"
            current_VW, stage = self._hop(
                current_VW, member_VP, hop=hop, counts=counts, name=name, layout=layout
            )
            stages.append(stage)
        splits = self.slot_splits(header)
        if self.counters is not None:
            self.counters.record_expert_rows(splits)
        view = layout.unpack(current_VW)
        slot_VK = self._slot_lookup(current_VW.device)[view.code]
        sorted_slot_V, order_V = torch.sort(slot_VK.reshape(-1), stable=True)
        order_Q, route_slot_Q = order_V[: sum(splits)], sorted_slot_V[: sum(splits)]
        route_row_Q = order_Q.floor_divide(layout.k)
        meta = DispatchMeta(
            path=path, stages=tuple(stages), num_tokens=stages[0].num_input_rows,
            num_received_rows=int(current_VW.shape[0]), out_dtype=layout.dtype, route_row_Q=route_row_Q,
            route_weight_Q=torch.take(view.weight, order_Q), route_slot_Q=route_slot_Q, slot_splits=tuple(splits),
        )  # fmt: skip
        return view.x.index_select(0, route_row_Q), meta

    def _first_hop_rows(self, hop: Hop, header: Header) -> torch.Tensor:
        """member_VP of the first hop, from the header's tables (no second lookup)."""
        if (
            hop.num_peers == self.topology.world_size
            and hop.group == "ep"
            and hop.peer_of_dest == hop.peer_ep_ranks
        ):
            return header.member_TR
        nodes, gpus = self.topology.num_nodes, self.topology.gpus_per_node
        member_TNG = header.reached_TN.new_zeros(header.reached_TN.shape[0], nodes, gpus)
        member_TNG[:, :, self.topology.local_rank_of(self.me)] = header.reached_TN
        return member_TNG.view(-1, nodes * gpus)

    def _local_mask(self, device: torch.device) -> torch.Tensor:
        """is_local_G1[g] = 1 for this rank's local rank (the relay columns of the header)."""
        key = ("local", device)
        if key not in self._lookups:
            mask = torch.zeros(self.topology.gpus_per_node, 1, dtype=torch.int64, device=device)
            mask[self.topology.local_rank_of(self.me)] = 1
            self._lookups[key] = mask
        return self._lookups[key]

    def _code_lookup(self, hop: Hop, device: torch.device) -> torch.Tensor:
        """lookup[code]: the peer of `hop` a route code travels to (num_peers: none, and for code 0)."""
        key = ("code", hop, device)
        if key not in self._lookups:
            self._lookups[key] = code_peer_lookup(hop, self.slot_stride, device)
        return self._lookups[key]

    def _slot_lookup(self, device: torch.device) -> torch.Tensor:
        """lookup[code]: the local slot of a route code for this rank, num_local_slots otherwise."""
        key = ("slots", device)
        if key not in self._lookups:
            lookup = torch.full(
                (self.topology.world_size * self.slot_stride + 1,), self.num_local_slots, device=device
            )
            first = self.me * self.slot_stride + 1
            lookup[first : first + self.num_local_slots] = torch.arange(self.num_local_slots, device=device)
            self._lookups[key] = lookup
        return self._lookups[key]

    def _hop(
        self,
        rows_VW: torch.Tensor,
        member_VP: torch.Tensor,
        *,
        hop: Hop,
        counts: tuple[list[int], list[int]],
        name: str,
        layout: RowLayout,
    ) -> tuple[torch.Tensor, Stage]:
        """One hop: each row once per peer its routes pass through (member_VP). Rows keep every code:
        each receiver takes only the routes that are its own (``_slot_lookup``, ``membership``)."""
        send, recv = counts
        src_row_S = rows_by_peer(member_VP, sum(send))
        sent_SW = rows_VW.index_select(0, src_row_S)
        group = self._group(hop)
        received_VW = sent_SW
        if group is not None:
            received_VW = self.transport.exchange(sent_SW, send, recv, group)
            self._record(name, send, recv, hop.peer_ep_ranks, layout.width)
        stage = Stage(
            name, group, hop.peer_ep_ranks, src_row_S, tuple(send), tuple(recv), int(rows_VW.shape[0])
        )
        return received_VW, stage

    def split_routes(
        self, rows_TW: torch.Tensor, *, layout: RowLayout
    ) -> tuple[torch.Tensor, torch.Tensor, Stage]:
        """Without dedup: one row per route (rows_VW, code_VK with V = T * K), so that every
        hop sends a token once per route; the returned local stage (``dispatch``'s first_stages) lets
        combine add the routes back into their tokens."""
        k = layout.k
        rows_VW = rows_TW.repeat_interleave(k, dim=0)
        code_VK = layout.unpack(rows_VW).code
        own_VK = torch.eye(k, dtype=torch.bool, device=rows_TW.device).repeat(rows_TW.shape[0], 1)
        code_VK.copy_(torch.where(own_VK, code_VK, 0))
        token_V = torch.arange(rows_TW.shape[0], device=rows_TW.device).repeat_interleave(k)
        stage = Stage("routes", None, (self.me,), token_V, (), (), int(rows_TW.shape[0]))
        return rows_VW, code_VK, stage

    def combine(self, expert_out_QD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """Weight the expert outputs, add them up per row and replay the hops in reverse: y_TD.

        Sums are kept in fp32 on each rank and travel in the input dtype."""
        assert meta.route_row_Q is not None and meta.route_weight_Q is not None  # a normal path's meta
        if expert_out_QD.shape[0] != meta.route_row_Q.shape[0]:
            raise ValueError(
                f"expert_out has {expert_out_QD.shape[0]} rows but dispatch produced {meta.route_row_Q.shape[0]}"
            )
        hidden = int(expert_out_QD.shape[1])
        partial_VD = expert_out_QD.new_zeros(meta.num_received_rows, hidden, dtype=torch.float32)
        partial_VD.index_add_(0, meta.route_row_Q, expert_out_QD.float() * meta.route_weight_Q.unsqueeze(1))
        for stage in reversed(meta.stages):
            returned_SD = partial_VD
            if stage.group is not None:
                returned_SD = self.transport.exchange(
                    partial_VD.to(meta.out_dtype), stage.recv_counts, stage.send_counts, stage.group
                )
                bytes_per_row = hidden * _itemsize(meta.out_dtype)
                name = stage.name.replace("dispatch", "combine")
                self._record(name, stage.recv_counts, stage.send_counts, stage.peer_ep_ranks, bytes_per_row)
            partial_VD = returned_SD.new_zeros(stage.num_input_rows, hidden, dtype=torch.float32)
            partial_VD.index_add_(0, stage.src_row_S, returned_SD.float())
        if self.counters is not None:
            self.counters.forwards += 1
        return partial_VD.to(meta.out_dtype)

    def dispatch_low_latency(
        self, rows_TW: torch.Tensor, *, rows_per_peer: int, layout: RowLayout
    ) -> tuple[torch.Tensor, DispatchMeta]:
        """The static path: returns (x_VD, every received row, and meta with each row's local routes)."""
        world, tokens = self.topology.world_size, int(rows_TW.shape[0])
        if tokens > rows_per_peer:
            raise ValueError(
                f"tokens ({tokens}) must be <= rows_per_peer ({rows_per_peer}) on the low-latency path"
            )
        buf_RLW = rows_TW.new_zeros(world, rows_per_peer, layout.width)
        buf_RLW[:, :tokens] = rows_TW  # every peer gets every token: each takes its own routes
        # rows past the tokens stay zero: code 0 on every route, so no rank computes them
        received_VW = buf_RLW.view(world * rows_per_peer, layout.width)
        if self.groups.ep_group is not None:
            received_VW = self.transport.exchange_fixed(received_VW, self.groups.ep_group)
            self._record("dispatch.ll", [rows_per_peer] * world, [rows_per_peer] * world, tuple(range(world)),
                         layout.width)  # fmt: skip
        view = layout.unpack(received_VW)
        slots = self.num_local_slots
        slot_VK = self._slot_lookup(received_VW.device)[view.code]
        if self.counters is not None:
            self.counters.record_expert_rows(value_counts(slot_VK, slots + 1)[:slots])
        meta = DispatchMeta(
            path="low-latency", stages=(), num_tokens=tokens, num_received_rows=int(received_VW.shape[0]),
            out_dtype=layout.dtype, slot_VK=slot_VK, weight_VK=view.weight, rows_per_peer=rows_per_peer,
        )  # fmt: skip
        return view.x, meta

    def combine_low_latency(self, partial_VD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """partial_VD[v] is the weighted sum of this rank's experts on received row v: return, add up: y_TD."""
        partial_VD = partial_VD.to(meta.out_dtype)
        world, rows = self.topology.world_size, meta.rows_per_peer
        if self.groups.ep_group is not None:
            partial_VD = self.transport.exchange_fixed(partial_VD, self.groups.ep_group)
            bytes_per_row = int(partial_VD.shape[1]) * _itemsize(meta.out_dtype)
            self._record("combine.ll", [rows] * world, [rows] * world, tuple(range(world)), bytes_per_row)
        if self.counters is not None:
            self.counters.forwards += 1
        y_TD = partial_VD.view(world, rows, -1)[:, : meta.num_tokens].sum(0, dtype=torch.float32)
        return y_TD.to(meta.out_dtype)

    def _record(
        self, stage: str, send: Sequence[int], recv: Sequence[int], peers: Sequence[int], bytes_per_row: int
    ) -> None:
        if self.counters is not None:
            self.counters.record_exchange(
                stage, send_rows=send, recv_rows=recv, peer_ep_ranks=peers, ep_index=self.me,
                topology=self.topology, bytes_per_row=bytes_per_row,
            )  # fmt: skip


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
        recv_buf = SparseTransport().exchange(send_buf, send_splits, recv_splits, groups.ep_group)
    flat_order = [e for experts in recv for e in experts]
    return {e: recv_buf[i * numel : (i + 1) * numel] for i, e in enumerate(flat_order)}


@dataclass(frozen=True)
class RowLayout:
    """One packed row: K int32 codes, K fp32 weights, the hidden vector (dtype), 8-aligned."""

    k: int
    hidden: int
    dtype: torch.dtype

    @property
    def width(self) -> int:
        return dispatch_row_bytes(self.k, self.hidden, self.dtype)

    def pack(self, x_SD: torch.Tensor, code_SK: torch.Tensor, weight_SK: torch.Tensor) -> torch.Tensor:
        """The rows as bytes, one concatenation of the three fields (and the alignment padding)."""
        fields = [
            _bytes(code_SK.to(torch.int32)),
            _bytes(weight_SK.to(torch.float32)),
            _bytes(x_SD.to(self.dtype)),
        ]
        padding = self.width - 8 * self.k - self.hidden * _itemsize(self.dtype)
        if padding:
            fields.append(torch.zeros(x_SD.shape[0], padding, dtype=torch.uint8, device=x_SD.device))
        return torch.cat(fields, dim=1)

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
    return dtype.itemsize


def _bytes(values_SC: torch.Tensor) -> torch.Tensor:
    """values_SC's rows as bytes (a view where its rows are contiguous)."""
    return values_SC.contiguous().view(torch.uint8)
