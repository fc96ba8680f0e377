"""Locality-aware instance choice (TAR / WRR / primary) as tensor ops; no communication.

Shape legend: T tokens, K top-k, E experts, R ranks (expert-parallel), I instances per expert (padded).

The gate's top-k choice is never changed; only the instance that computes each (token, expert)
route is chosen here. The choice for a route of expert e on origin rank g is

    j = first candidate with cdf[g, e, j] > u,    u = frac(offset[g, e] + n * PHI_INV)

where n is the route's ordinal among the routes of this batch on rank g that chose e (token-major
order, plus an optional caller-supplied ``route_offset``) and PHI_INV the golden-ratio conjugate.
The sequence is low-discrepancy: over n consecutive routes the share each candidate gets differs
from its WRR weight by O(log n / n), and it uses no random state, so every rank computes the same
choice for the same batch, run after run. The per-(rank, expert) offset decorrelates the streams
so that ranks with one token each do not all pick the same instance.

Where an origin rank has a single candidate for every expert (a world of one, a plan without replicas,
the "primary" policy, or TAR where the rank or its node holds one copy of each expert), the choice is
one lookup per route (``fixed_rank_RE1``, ``fixed_slot_RE1``; ``fixed_code_RE1`` for the dispatch
codes) instead of the sequence above: the same instances.

The runtime takes each route's instance as one code, 1 + rank * slot_stride + slot (``choose_codes``,
``route_codes``; 0: no route), the form the dispatched rows carry (ds_grace.comm.all_to_all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ds_grace.planning.plan import LayerPlan, RoutingPolicy, route_table
from ds_grace.topology import Topology

PHI_INV = (math.sqrt(5.0) - 1.0) / 2.0
_OFFSET_STEP = math.sqrt(2.0) - 1.0


@dataclass(frozen=True)
class RouteTable:
    """One layer's routing data as tensors, identical on every rank.

    cand_rank_REI / cand_cdf_REI come from ``route_table`` (padding: rank -1, cdf 1.0);
    expert2slot_RE[r, e] is the local slot of expert e on rank r, or -1 if r does not host it.
    """

    cand_rank_REI: torch.Tensor
    cand_cdf_REI: torch.Tensor
    expert2slot_RE: torch.Tensor
    stream_offset_RE: torch.Tensor
    policy: str
    # per origin rank, whether every expert has one candidate (host-side, fixed with the plan), and then
    # its rank and slot: fixed_rank_RE1[g, e + 1] (column 0: -1 for routes not taken), and its code
    # (``route_codes``, int32; column 0: 0)
    single_candidate_R: tuple[bool, ...]
    fixed_rank_RE1: torch.Tensor
    fixed_slot_RE1: torch.Tensor
    fixed_code_RE1: torch.Tensor
    slot_stride: int

    @classmethod
    def build(cls, layer: LayerPlan, topology: Topology, policy: RoutingPolicy) -> RouteTable:
        if layer.num_ranks != topology.world_size:
            raise ValueError(
                f"layer_plan places experts on {layer.num_ranks} ranks but the topology ({topology}) "
                f"has {topology.world_size}"
            )
        cand_rank, cand_cdf = route_table(layer, topology, policy)
        num_ranks, num_experts = topology.world_size, layer.num_experts
        expert2slot = np.full((num_ranks, num_experts), -1, dtype=np.int64)
        for rank, experts in enumerate(layer.slots):
            for slot, expert in enumerate(experts):
                expert2slot[rank, expert] = slot
        stream = np.arange(num_ranks * num_experts, dtype=np.float64).reshape(num_ranks, num_experts)
        first_RE = cand_rank[:, :, 0]
        fixed_rank = np.concatenate([np.full((num_ranks, 1), -1), first_RE], axis=1)
        fixed_slot = np.concatenate(
            [np.full((num_ranks, 1), -1), np.take_along_axis(expert2slot, np.maximum(first_RE, 0), axis=0)],
            axis=1,
        )
        stride = slot_stride(layer)
        return cls(
            cand_rank_REI=torch.from_numpy(cand_rank),
            cand_cdf_REI=torch.from_numpy(cand_cdf),
            expert2slot_RE=torch.from_numpy(expert2slot),
            stream_offset_RE=torch.from_numpy(np.mod(stream * _OFFSET_STEP, 1.0)),
            policy=policy,
            single_candidate_R=tuple(bool(x) for x in (cand_rank[:, :, 1:] < 0).all(axis=(1, 2))),
            fixed_rank_RE1=torch.from_numpy(fixed_rank.astype(np.int64)),
            fixed_slot_RE1=torch.from_numpy(fixed_slot.astype(np.int64)),
            fixed_code_RE1=route_codes(torch.from_numpy(fixed_rank), torch.from_numpy(fixed_slot), stride),
            slot_stride=stride,
        )

    @property
    def num_ranks(self) -> int:
        return int(self.cand_rank_REI.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.cand_rank_REI.shape[1])

    @property
    def device(self) -> torch.device:
        return self.cand_rank_REI.device

    def to(self, device: torch.device | str) -> RouteTable:
        return RouteTable(
            cand_rank_REI=self.cand_rank_REI.to(device),
            cand_cdf_REI=self.cand_cdf_REI.to(device),
            expert2slot_RE=self.expert2slot_RE.to(device),
            stream_offset_RE=self.stream_offset_RE.to(device),
            policy=self.policy,
            single_candidate_R=self.single_candidate_R,
            fixed_rank_RE1=self.fixed_rank_RE1.to(device),
            fixed_slot_RE1=self.fixed_slot_RE1.to(device),
            fixed_code_RE1=self.fixed_code_RE1.to(device),
            slot_stride=self.slot_stride,
        )


def slot_stride(layer: LayerPlan) -> int:
    """The code stride of a layer's routes: the most slots any rank holds (at least 1)."""
    return max(1, max(len(slots) for slots in layer.slots))


def route_codes(rank_TK: torch.Tensor, slot_TK: torch.Tensor, slot_stride: int) -> torch.Tensor:
    """code_TK = 1 + rank * slot_stride + slot of every route (int32), 0 where no route (rank and slot -1):
    code 0 is the spare first entry of every table indexed by code."""
    return (slot_TK + 1).add_(rank_TK, alpha=slot_stride).clamp_(min=0).to(torch.int32)


def screen_topk_ids(
    topk_ids_TK: torch.Tensor, num_experts: int, *, name: str = "topk_ids"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal paths' id check, without a host read: (ids_TK, id_range_2).

    id_range_2 is the lowest and highest id on the device; it travels in the header round to every rank
    (``ds_grace.comm.all_to_all``), and each checks every rank's range after the round's one read
    (``id_range_error``), so that all raise together and none waits for a rank that stopped. ids_TK
    is topk_ids_TK clamped into [-1, num_experts) so that the steps before the header stay in bounds;
    nothing is dispatched from a forward whose range is bad. The form (2-D, integers) is checked here.
    """
    _check_id_form(topk_ids_TK, name)
    if not topk_ids_TK.numel():
        return topk_ids_TK, torch.full((2,), -1, dtype=torch.int64, device=topk_ids_TK.device)
    id_range_2 = torch.stack(torch.aminmax(topk_ids_TK))
    return topk_ids_TK.clamp(-1, num_experts - 1), id_range_2


def id_range_error(range_R2: np.ndarray, num_experts: int, *, name: str = "topk_ids") -> ValueError | None:
    """The error for the first rank whose id range (row r of range_R2: lowest, highest) leaves
    [-1, num_experts), or None when every rank's ids are valid (-1 marks a route that is not taken)."""
    for rank, (low, high) in enumerate(range_R2.tolist()):  # a few ranks: faster than numpy's reductions
        if low < -1 or high >= num_experts:
            return ValueError(
                f"{name} holds expert id {low if low < -1 else high} on EP rank {rank}; ids must be in "
                f"[0, {num_experts}) or -1 (no route)"
            )
    return None


def _check_id_form(topk_ids_TK: torch.Tensor, name: str) -> None:
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"{name} (shape {tuple(topk_ids_TK.shape)}) must be 2-D [tokens, k]")
    if topk_ids_TK.dtype.is_floating_point or topk_ids_TK.dtype == torch.bool:
        raise ValueError(f"{name} (dtype {topk_ids_TK.dtype}) must be an integer tensor")


def check_topk_ids_async(topk_ids_TK: torch.Tensor, num_experts: int, *, name: str = "topk_ids") -> None:
    """The low-latency path's id check: the range is asserted on the device (an error on the CPU at
    once, a device-side assert on an accelerator); no header round there carries it (static shapes)."""
    _check_id_form(topk_ids_TK, name)
    in_range = ((topk_ids_TK >= -1) & (topk_ids_TK < num_experts)).all()
    torch._assert_async(in_range, f"{name} holds an expert id outside [0, {num_experts}) and -1 (no route)")


def choose_instances(
    table: RouteTable,
    topk_ids_TK: torch.Tensor,
    *,
    origin_rank: int,
    route_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the instance of every route: returns (rank_TK, slot_TK); -1 for routes with id -1.

    rank_TK is the expert-parallel rank hosting the chosen instance, slot_TK its local slot there.
    """
    _check_origin(table, origin_rank)
    if table.single_candidate_R[origin_rank]:  # one candidate per expert: a lookup, the same choice
        column_TK = topk_ids_TK.long() + 1
        return table.fixed_rank_RE1[origin_rank][column_TK], table.fixed_slot_RE1[origin_rank][column_TK]
    return sampled_instances(table, topk_ids_TK, origin_rank=origin_rank, route_offset=route_offset)


def choose_codes(
    table: RouteTable, topk_ids_TK: torch.Tensor, *, origin_rank: int, route_offset: int = 0
) -> torch.Tensor:
    """choose_instances as the routes' codes (``route_codes``): code_TK, int32, 0 for routes with id -1.

    With one candidate per expert (``single_candidate_R``) this is one lookup: two ops in all."""
    _check_origin(table, origin_rank)
    if table.single_candidate_R[origin_rank]:
        return table.fixed_code_RE1[origin_rank][topk_ids_TK.long() + 1]
    rank_TK, slot_TK = sampled_instances(
        table, topk_ids_TK, origin_rank=origin_rank, route_offset=route_offset
    )
    return route_codes(rank_TK, slot_TK, table.slot_stride)


def _check_origin(table: RouteTable, origin_rank: int) -> None:
    if not 0 <= origin_rank < table.num_ranks:
        raise ValueError(f"origin_rank ({origin_rank}) must be in [0, {table.num_ranks})")


def sampled_instances(
    table: RouteTable, topk_ids_TK: torch.Tensor, *, origin_rank: int, route_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """choose_instances by the low-discrepancy sequence of the module doc, whatever the candidates."""
    ids_TK = topk_ids_TK.long()
    valid_TK = ids_TK >= 0
    experts_Q1 = ids_TK.clamp(min=0).reshape(-1, 1)
    # the ordinal of each route among this batch's routes to its expert (token-major): its place in the
    # stable sort by expert minus where its expert's run starts (O(routes) memory, no host read)
    sorted_Q, order_Q = torch.sort(ids_TK.reshape(-1), stable=True)
    ordinal_Q = torch.arange(sorted_Q.shape[0], device=ids_TK.device) - torch.searchsorted(sorted_Q, sorted_Q)
    ordinal_Q1 = torch.empty_like(ordinal_Q).scatter_(0, order_Q, ordinal_Q).view(-1, 1).add_(route_offset)
    experts_TK = experts_Q1.view(ids_TK.shape)
    offset_TK = table.stream_offset_RE[origin_rank][experts_TK]
    u_TK = torch.frac(offset_TK.add(ordinal_Q1.view(ids_TK.shape), alpha=PHI_INV))
    cdf_TKI = table.cand_cdf_REI[origin_rank][experts_TK]
    pick_TK = torch.searchsorted(cdf_TKI, u_TK.unsqueeze(-1), right=True).clamp_(max=cdf_TKI.shape[-1] - 1)
    rank_TK = torch.gather(table.cand_rank_REI[origin_rank][experts_TK], -1, pick_TK).squeeze(-1)
    slot_TK = table.expert2slot_RE[rank_TK.clamp(min=0), experts_TK]
    missing_TK = ~valid_TK
    return rank_TK.masked_fill_(missing_TK, -1), slot_TK.masked_fill_(missing_TK, -1)
