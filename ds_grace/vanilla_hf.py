"""Vanilla DeepSpeed-MoE for transformers families: the model's own router, DeepSpeed's MOELayer.

Shape legend: S tokens a gate sees, D hidden, K top-k, E experts, C expert capacity.

A transformers MoE block keeps its router (in a RoutedMoEBlock) and hands the routing to a
:class:`DeepSpeedRoutedExperts`: a real deepspeed.moe.layer.MoE holding this rank's contiguous experts, whose
gate is a :class:`RoutingGate` applying DeepSpeed's capacity rule (:func:`deepspeed_capacity_routes`) to
that routing. DeepSpeed's MOELayer then runs its capacity-padded dense all-to-all as it would for its own
gate. deepspeed and torch.distributed are imported on use, as in ds_grace.inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ds_grace.config import VanillaConfig


def deepspeed_capacity_routes(
    topk_ids_SK: torch.Tensor,
    topk_weights_SK: torch.Tensor,
    *,
    num_experts: int,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool,
    ep_group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSpeed's capacity rule applied to a given routing, in its sparse-route form.

    Returns (capacity, indices_KS int32 with -1 for dropped routes, locations_KS int32, gates_KS fp32,
    exp_counts_E). Capacity is max(ceil(S / E * capacity_factor * K), min_capacity) with drop_tokens, else
    the largest expert count over the expert-parallel group (nothing dropped). Which routes overflow a full
    expert follows DeepSpeed's gates: for K <= 2, position order with every first choice ahead of every
    second choice (top1gating without RTS, top2gating); for K > 2, the highest routing weights
    (topkgating's "probs" policy). Kept routes keep the model's weights (no renormalisation over the
    surviving experts, which would change the model's output even when nothing is dropped).
    """
    import torch.distributed as dist
    from deepspeed.moe.sharded_moe import _capacity

    from ds_grace.comm.collectives import max_over_group

    num_tokens, top_k = topk_ids_SK.shape
    ids_SK = topk_ids_SK.long()
    mask_SE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=ids_SK.device)
    mask_SE.scatter_(1, ids_SK, True)
    exp_counts_E = mask_SE.sum(dim=0)
    slot_major = top_k <= 2
    if slot_major:
        # every token's choice 0, then every token's choice 1: the order top1/top2gating number routes in
        onehot_KSE = torch.nn.functional.one_hot(ids_SK.t(), num_experts)
        position_KSE = onehot_KSE.reshape(-1, num_experts).cumsum(dim=0).reshape(onehot_KSE.shape) - 1
        position_SK = position_KSE.gather(2, ids_SK.t().unsqueeze(2)).squeeze(2).t()
    if drop_tokens:
        capacity = int(
            _capacity(mask_SE, torch.tensor(capacity_factor * top_k), torch.tensor(min_capacity)).item()
        )
        if slot_major:
            kept_SK = position_SK < capacity
        else:
            weights_SE = torch.zeros(num_tokens, num_experts, device=ids_SK.device)
            weights_SE.scatter_(1, ids_SK, topk_weights_SK.float())
            _, rows_CE = torch.topk(weights_SE, k=min(capacity, num_tokens), dim=0, sorted=False)
            within_SE = torch.zeros_like(mask_SE).scatter_(0, rows_CE, True)
            kept_SK = (mask_SE & within_SE).gather(1, ids_SK)
    else:
        capacity = int(exp_counts_E.max()) if num_tokens else 0
        if ep_group is not None and dist.get_world_size(group=ep_group) > 1:
            capacity = max_over_group(capacity, group=ep_group)
        kept_SK = torch.ones_like(ids_SK, dtype=torch.bool)
    if slot_major:
        locations_SK = position_SK * kept_SK
    else:  # topkgating numbers the kept routes of each expert in token order
        kept_SE = torch.zeros_like(mask_SE).scatter_(1, ids_SK, kept_SK)
        locations_SK = (kept_SE.long().cumsum(dim=0) - 1).gather(1, ids_SK) * kept_SK
    indices_SK = torch.where(kept_SK, ids_SK, torch.full_like(ids_SK, -1))
    gates_SK = torch.where(
        kept_SK, topk_weights_SK.float(), torch.zeros_like(topk_weights_SK, dtype=torch.float)
    )
    return (
        torch.tensor(capacity, dtype=torch.int64),
        indices_SK.t().contiguous().to(torch.int32),
        locations_SK.t().contiguous().to(torch.int32),
        gates_SK.t().contiguous(),
        exp_counts_E.detach(),
    )


class RoutingGate(nn.Module):
    """Stands in for DeepSpeed's TopKGate inside its MOELayer: returns the routing the model's router
    computed (handed over by :class:`DeepSpeedRoutedExperts` right before the call, because MOELayer
    passes its gate only the tokens), after DeepSpeed's capacity rule.

    Keeps TopKGate's attributes (k, drop_tokens, eval_capacity_factor, min_capacity, ep_group, ...) so that
    ds_grace.vanilla configures it and counts its dropped routes like any DeepSpeed gate. l_aux is 0: the
    model's own router has its own auxiliary loss, which inference does not use.
    """

    def __init__(
        self, *, num_experts: int, k: int, drop_tokens: bool, eval_capacity_factor: float, min_capacity: int
    ):
        super().__init__()
        self.num_experts = num_experts
        self.k = k
        self.drop_tokens = drop_tokens
        self.capacity_factor = eval_capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.use_rts = False
        self.top2_2nd_expert_sampling = False
        self.noisy_gate_policy = None
        self.ep_group: Any = None
        self.wall_clock_breakdown = False
        self._handed_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def _set_ep_group(self, ep_group: Any) -> None:
        if self.ep_group is not None:
            raise RuntimeError("RoutingGate already has an expert-parallel group")
        self.ep_group = ep_group

    def hand_routing(self, routing: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self._handed_routing = routing

    def forward(
        self,
        x_SD: torch.Tensor,
        used_token: torch.Tensor | None = None,
        sparse_routes: bool = True,
        use_tutel: bool = False,
    ) -> tuple[Any, ...]:
        if self._handed_routing is None:
            raise RuntimeError("RoutingGate has no routing: call DeepSpeedRoutedExperts.forward_routed")
        if used_token is not None or not sparse_routes or use_tutel:
            raise ValueError("RoutingGate supports only sparse routes, without used_token and without Tutel")
        ids_SK, weights_SK = self._handed_routing
        if ids_SK.shape[0] != x_SD.shape[0]:
            raise ValueError(f"routing has {ids_SK.shape[0]} tokens but the gate sees {x_SD.shape[0]}")
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity, indices_KS, locations_KS, gates_KS, exp_counts_E = deepspeed_capacity_routes(
            ids_SK,
            weights_SK,
            num_experts=self.num_experts,
            capacity_factor=factor,
            min_capacity=self.min_capacity,
            drop_tokens=self.drop_tokens,
            ep_group=self.ep_group,
        )
        l_aux = x_SD.new_zeros((), dtype=torch.float32)
        return l_aux, capacity, self.num_experts, indices_KS, locations_KS, gates_KS, exp_counts_E


class DeepSpeedRoutedExperts(nn.Module):
    """One MoE layer of a transformers model served as vanilla DeepSpeed-MoE: ``self.moe`` is a
    deepspeed.moe.layer.MoE built by DeepSpeed, holding this rank's contiguous experts (ep rank q holds
    experts q*E/ep_size ..), with a :class:`RoutingGate`. ``forward_routed`` runs DeepSpeed's MOELayer."""

    def __init__(
        self,
        local_experts: Sequence[nn.Module],
        *,
        num_experts: int,
        ep_size: int,
        hidden_size: int,
        k: int,
        drop_tokens: bool,
        eval_capacity_factor: float,
        min_capacity: int,
    ) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        from ds_grace.moe.experts import tag_expert_parameters

        if num_experts % ep_size != 0 or len(local_experts) != num_experts // ep_size:
            raise ValueError(
                f"local_experts ({len(local_experts)}) must be num_experts ({num_experts}) / ep_size ({ep_size})"
            )
        self.moe = MoE(
            hidden_size,
            nn.Identity(),
            num_experts=num_experts,
            ep_size=ep_size,
            k=k,
            drop_tokens=drop_tokens,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        layer = self.moe.deepspeed_moe
        layer.experts.deepspeed_experts = nn.ModuleList(local_experts)
        tag_expert_parameters(layer.experts.deepspeed_experts, self.moe.expert_group_name)
        layer.gate = RoutingGate(
            num_experts=num_experts,
            k=k,
            drop_tokens=drop_tokens,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
        )

    @classmethod
    def contiguous(
        cls,
        experts: Sequence[nn.Module],
        *,
        ep_rank: int,
        ep_size: int,
        hidden_size: int,
        k: int,
        vanilla: VanillaConfig,
    ) -> DeepSpeedRoutedExperts:
        """The layer of EP rank `ep_rank` from all of a layer's `experts`, placed as DeepSpeed places them:
        ep rank q holds experts q*E/ep_size .. (q+1)*E/ep_size - 1."""
        per_rank = len(experts) // ep_size
        return cls(
            experts[ep_rank * per_rank : (ep_rank + 1) * per_rank],
            num_experts=len(experts),
            ep_size=ep_size,
            hidden_size=hidden_size,
            k=k,
            drop_tokens=vanilla.drop_tokens,
            eval_capacity_factor=vanilla.eval_capacity_factor,
            min_capacity=vanilla.min_capacity,
        )

    @property
    def gate(self) -> RoutingGate:
        return self.moe.deepspeed_moe.gate

    def forward_routed(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> torch.Tensor:
        gate = self.gate
        gate.hand_routing((topk_ids_TK, topk_weights_TK))
        try:
            return self.moe.deepspeed_moe(x_TD, None)
        finally:
            gate.hand_routing(None)

    def forward(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> torch.Tensor:
        return self.forward_routed(x_TD, topk_ids_TK, topk_weights_TK)
