"""Router semantics of every supported MoE family, as pure functions of the router module and tokens.

Shape legend: T tokens, D hidden, E experts, K top-k, G expert groups (DeepSeek ``n_group``).

Each function reproduces, operation for operation, the router of the library it names, in eval mode:
same dtype casts, same top-k calls, same normalisation and scaling, so the ids are identical and the
weights bitwise equal to the original router's. Each returns a RouterOutput whose ``topk_ids_TK`` is
int64 and whose ``logits_TE`` are the router logits the original exposes (for transformers'
output_router_logits and DeepSpeed's l_aux).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RouterOutput(NamedTuple):
    logits_TE: Tensor
    topk_ids_TK: Tensor
    topk_weights_TK: Tensor


def softmax_topk_route(gate: nn.Module, x_TD: Tensor) -> RouterOutput:
    """Qwen2-MoE, Qwen3-MoE and OLMoE (transformers 5.x ``*TopKRouter``).

    Logits in the input dtype, softmax in fp32, top-k, renormalised when ``gate.norm_topk_prob``,
    weights cast back to the logits' dtype.
    """
    logits_TE = F.linear(x_TD, gate.weight)
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float)
    weights_TK, topk_ids_TK = torch.topk(probs_TE, gate.top_k, dim=-1)
    if gate.norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return RouterOutput(logits_TE, topk_ids_TK, weights_TK.to(logits_TE.dtype))


def mixtral_route(gate: nn.Module, x_TD: Tensor) -> RouterOutput:
    """Mixtral (transformers 5.x ``MixtralTopKRouter``): softmax of the fp32 logits, top-k, always
    renormalised; the weights stay fp32."""
    logits_TE = F.linear(x_TD, gate.weight)
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, topk_ids_TK = torch.topk(probs_TE, gate.top_k, dim=-1)
    return RouterOutput(logits_TE, topk_ids_TK, weights_TK / weights_TK.sum(dim=-1, keepdim=True))


def _group_mask_TE(group_scores_TG: Tensor, *, topk_group: int, num_experts: int) -> Tensor:
    """True for the experts of each token's ``topk_group`` best groups."""
    num_groups = group_scores_TG.shape[-1]
    group_idx = torch.topk(group_scores_TG, k=topk_group, dim=-1, sorted=False)[1]
    group_mask_TG = torch.zeros_like(group_scores_TG)
    group_mask_TG.scatter_(1, group_idx, 1)
    return (
        group_mask_TG.unsqueeze(-1)
        .expand(-1, num_groups, num_experts // num_groups)
        .reshape(-1, num_experts)
        .bool()
    )


def deepseek_v2_route(gate: nn.Module, x_TD: Tensor) -> RouterOutput:
    """DeepSeek-V2 (transformers 5.x ``DeepseekV2TopkRouter``).

    fp32 logits and softmax; ``topk_method`` "greedy" (plain top-k) or "group_limited_greedy" (top-k
    among the ``topk_group`` groups with the highest max score); weights times
    ``routed_scaling_factor``. This transformers version applies no ``norm_topk_prob`` for V2.
    """
    logits_TE = F.linear(x_TD.type(torch.float32), gate.weight.type(torch.float32))
    scores_TE = logits_TE.softmax(dim=-1, dtype=torch.float32)
    if gate.topk_method == "group_limited_greedy":
        num_experts = gate.num_experts
        group_scores_TG = scores_TE.view(-1, gate.num_group, num_experts // gate.num_group).max(dim=-1).values
        expert_mask_TE = _group_mask_TE(group_scores_TG, topk_group=gate.topk_group, num_experts=num_experts)
        scores_TE = scores_TE.masked_fill(~expert_mask_TE, 0.0)
    elif gate.topk_method != "greedy":
        raise ValueError(
            f"DeepSeek-V2 router topk_method ({gate.topk_method!r}) must be 'greedy' or 'group_limited_greedy'"
        )
    weights_TK, topk_ids_TK = torch.topk(scores_TE, k=gate.top_k, dim=-1, sorted=False)
    return RouterOutput(logits_TE, topk_ids_TK, weights_TK * gate.routed_scaling_factor)


def deepseek_v3_route(gate: nn.Module, x_TD: Tensor) -> RouterOutput:
    """DeepSeek-V3 (transformers 5.x ``DeepseekV3TopkRouter``).

    fp32 logits, sigmoid scores; the choice uses scores + ``e_score_correction_bias``, limited to the
    ``topk_group`` groups with the highest sum of their two best biased scores; the weights are the
    unbiased scores of the chosen experts, renormalised when ``norm_topk_prob`` (denominator + 1e-20),
    then times ``routed_scaling_factor``.
    """
    num_experts = gate.num_experts
    logits_TE = F.linear(x_TD.type(torch.float32), gate.weight.type(torch.float32))
    scores_TE = logits_TE.sigmoid()
    choice_TE = scores_TE + gate.e_score_correction_bias
    group_scores_TG = (
        choice_TE.view(-1, gate.num_group, num_experts // gate.num_group).topk(2, dim=-1)[0].sum(dim=-1)
    )
    expert_mask_TE = _group_mask_TE(group_scores_TG, topk_group=gate.topk_group, num_experts=num_experts)
    choice_TE = choice_TE.masked_fill(~expert_mask_TE, float("-inf"))
    topk_ids_TK = torch.topk(choice_TE, k=gate.top_k, dim=-1, sorted=False)[1]
    weights_TK = scores_TE.gather(1, topk_ids_TK)
    if gate.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return RouterOutput(logits_TE, topk_ids_TK, weights_TK * gate.routed_scaling_factor)


def deepspeed_topk_route(gate: nn.Module, x_TD: Tensor) -> RouterOutput:
    """DeepSpeed-MoE ``TopKGate`` in eval mode, without noise and without capacity dropping.

    fp32 logits and softmax. k=1: the argmax and its (unnormalised) probability. k=2: the argmax, then
    the argmax of the logits without it (no Gumbel sampling), both renormalised by their sum (clamped
    to fp32 eps). k>2: top-k of the probabilities, renormalised the same way.
    """
    logits_TE = F.linear(x_TD.float(), weight=gate.wg.weight.float(), bias=None)
    gates_TE = F.softmax(logits_TE, dim=1)
    if gate.k == 1:
        topk_ids_TK = torch.argmax(gates_TE, dim=1, keepdim=True)
        return RouterOutput(logits_TE, topk_ids_TK, gates_TE.gather(1, topk_ids_TK))
    if gate.k == 2:
        first_T1 = torch.argmax(gates_TE, dim=1, keepdim=True)
        first_mask_TE = torch.zeros_like(gates_TE, dtype=torch.bool).scatter_(1, first_T1, True)
        second_T1 = torch.argmax(logits_TE.masked_fill(first_mask_TE, float("-inf")), dim=1, keepdim=True)
        topk_ids_TK = torch.cat([first_T1, second_T1], dim=1)
        weights_TK = gates_TE.gather(1, topk_ids_TK)
        denom_T1 = weights_TK.sum(dim=1, keepdim=True)
    else:
        weights_TK, topk_ids_TK = torch.topk(gates_TE, k=gate.k, dim=1)
        # DeepSpeed sums the masked probabilities in expert order, not in top-k order.
        mask_TE = torch.zeros_like(gates_TE, dtype=torch.bool).scatter_(1, topk_ids_TK, True)
        denom_T1 = (gates_TE * mask_TE).sum(dim=-1, keepdim=True)
    denom_T1 = torch.clamp(denom_T1, min=torch.finfo(weights_TK.dtype).eps)
    return RouterOutput(logits_TE, topk_ids_TK, weights_TK / denom_T1)


def deepspeed_l_aux(logits_TE: Tensor, topk_ids_TK: Tensor) -> Tensor:
    """DeepSpeed TopKGate's load-balancing loss for this routing (no used_token mask)."""
    num_experts = logits_TE.shape[1]
    top_k = topk_ids_TK.shape[1]
    me_E = torch.mean(F.softmax(logits_TE, dim=1), dim=0)
    # k=1 and k=2 count only the first choice; k>2 counts all k.
    counted_TK = topk_ids_TK if top_k > 2 else topk_ids_TK[:, :1]
    mask_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter_(1, counted_TK, True)
    ce_E = torch.mean(mask_TE.float(), dim=0)
    if top_k == 1:
        return torch.sum(me_E * ce_E) * num_experts
    if top_k == 2:
        return torch.mean(me_E * ce_E) * num_experts * num_experts
    return torch.mean(me_E * ce_E) * num_experts * num_experts / top_k
