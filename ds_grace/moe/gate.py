"""GraceGate: DeepSpeed TopKGate's deterministic eval routing for any k, without capacity.

Shape legend: T tokens, D hidden, K top-k, E experts.

The choice and weights equal DeepSpeed 0.19's TopKGate in eval with no noise, no random token
selection and no dropping, operation for operation (so GRACE is vanilla-lossless):
- k = 1: argmax of softmax(logits); weight = that softmax probability (not renormalised);
- k = 2: first = argmax of softmax, second = argmax of the logits without the first;
  weights = g1 / (g1 + g2), g2 / (g1 + g2) with the sum clamped at fp32 eps;
- k > 2: torch.topk of softmax; weights = top gates / their sum (clamped at eps).
Logits are computed in fp32 from the fp32-cast input and gate weight, as DeepSpeed does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate


@dataclass(frozen=True)
class GateOutput:
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    l_aux: torch.Tensor
    exp_counts_E: torch.Tensor


class GraceGate(TopKGate):
    """A TopKGate (same ``wg`` parameter) whose forward returns a GateOutput for any k."""

    def __init__(self, model_dim: int, num_experts: int, k: int) -> None:
        if not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k ({k!r}) must be an integer in [1, num_experts={num_experts}]")
        super().__init__(
            model_dim,
            num_experts,
            k,
            min_capacity=0,
            drop_tokens=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        self.num_experts = num_experts

    @classmethod
    def from_deepspeed(cls, gate: TopKGate) -> GraceGate:
        """Same weights and k as `gate`; its noise, capacity and RTS settings are dropped."""
        weight = gate.wg.weight
        new = cls(int(weight.shape[1]), int(weight.shape[0]), int(gate.k))
        new.wg.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.wg.weight.copy_(weight)
        return new

    def forward(  # type: ignore[override]
        self, x_TD: torch.Tensor, used_token_T: torch.Tensor | None = None
    ) -> GateOutput:
        logits_TE = F.linear(x_TD.float(), weight=self.wg.weight.float(), bias=None)
        return topk_routing(logits_TE, self.k, used_token_T=used_token_T)


def one_hot(ids_T: torch.Tensor, num_classes: int) -> torch.Tensor:
    """F.one_hot(ids_T, num_classes) (int64) without its range check, which reads the ids' min and max
    back to the host on CPU (CUDA's relies on a device assert): the ids here come from argmax."""
    mask_TE = torch.zeros(ids_T.shape[0], num_classes, dtype=torch.int64, device=ids_T.device)
    return mask_TE.scatter_(1, ids_T.unsqueeze(1), 1)


def topk_routing(logits_TE: torch.Tensor, k: int, *, used_token_T: torch.Tensor | None = None) -> GateOutput:
    """DeepSpeed's eval routing of fp32 logits (see module docstring).

    used_token_T (k = 1 only, as in DeepSpeed) masks tokens out: their route id becomes -1.
    """
    num_tokens, num_experts = logits_TE.shape
    gates_TE = F.softmax(logits_TE, dim=1)
    if k == 1:
        ids_T = torch.argmax(gates_TE, dim=1)
        mask_TE = one_hot(ids_T, num_experts)
        if used_token_T is not None:
            mask_TE = torch.einsum("s,se->se", used_token_T, mask_TE)
            ids_T = torch.where(mask_TE.sum(dim=1) > 0, ids_T, -1)
        exp_counts = mask_TE.sum(dim=0)
        l_aux = torch.sum(gates_TE.mean(dim=0) * mask_TE.float().mean(dim=0)) * num_experts
        weights_T = (gates_TE * mask_TE).sum(dim=1)
        ids_TK, weights_TK = ids_T.unsqueeze(1), weights_T.unsqueeze(1)
    elif k == 2:
        first_T = torch.argmax(gates_TE, dim=1)
        mask1_TE = one_hot(first_T, num_experts)
        second_T = torch.argmax(logits_TE.masked_fill(mask1_TE.bool(), float("-inf")), dim=1)
        mask2_TE = one_hot(second_T, num_experts)
        exp_counts = (mask1_TE + mask2_TE).sum(dim=0)
        l_aux = torch.mean(gates_TE.mean(dim=0) * mask1_TE.float().mean(dim=0)) * num_experts * num_experts
        gate1_T = torch.einsum("se,se->s", gates_TE, mask1_TE.float())
        gate2_T = torch.einsum("se,se->s", gates_TE, mask2_TE.float())
        denom_T = torch.clamp(gate1_T + gate2_T, min=torch.finfo(gate1_T.dtype).eps)
        ids_TK = torch.stack([first_T, second_T], dim=1)
        weights_TK = torch.stack([gate1_T / denom_T, gate2_T / denom_T], dim=1)
    else:
        _, ids_TK = torch.topk(gates_TE, k=k, dim=1)
        mask_TE = torch.zeros_like(gates_TE, dtype=torch.bool).scatter_(1, ids_TK, True)
        exp_counts = mask_TE.sum(dim=0)
        l_aux = torch.mean(gates_TE.mean(dim=0) * mask_TE.float().mean(dim=0)) * num_experts * num_experts / k
        masked_TE = gates_TE * mask_TE
        denom_T1 = torch.clamp(masked_TE.sum(dim=-1, keepdim=True), min=torch.finfo(masked_TE.dtype).eps)
        weights_TK = (masked_TE / denom_T1).gather(1, ids_TK)
    if num_tokens == 0:
        l_aux = logits_TE.new_zeros(())
    return GateOutput(
        topk_ids_TK=ids_TK, topk_weights_TK=weights_TK, l_aux=l_aux, exp_counts_E=exp_counts.detach()
    )
