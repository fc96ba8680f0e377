"""Per-expert modules and the single-process routed-experts reference.

Shape legend: T tokens, D hidden, I expert intermediate size, K top-k, E experts,
M rows handed to one expert, A = K*T (token, expert) assignments.

Anything that computes ``forward_routed(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD`` can stand in
for LocalRoutedExperts inside a RoutedMoEBlock (the distributed GraceMoE does the same with its
experts spread over ranks).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GatedExpertMLP(nn.Module):
    """One expert of a fused transformers ``*Experts`` module: ``down(act(gate(x)) * up(x))``.

    Holds its own copies of that expert's slices: ``gate_up_proj`` [2I, D] (gate rows first, then up,
    as transformers concatenates them) and ``down_proj`` [D, I]. The computation is the transformers
    eager expert loop's, for one expert.
    """

    def __init__(self, *, gate_up_proj: Tensor, down_proj: Tensor, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            gate_up_proj.detach().clone(), requires_grad=gate_up_proj.requires_grad
        )
        self.down_proj = nn.Parameter(down_proj.detach().clone(), requires_grad=down_proj.requires_grad)
        self.act_fn = copy.deepcopy(act_fn)

    def forward(self, x_MD: Tensor) -> Tensor:
        gate_MI, up_MI = F.linear(x_MD, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate_MI) * up_MI, self.down_proj)

    def extra_repr(self) -> str:
        hidden, intermediate = self.down_proj.shape
        return f"hidden={hidden}, intermediate={intermediate}"


class TensorOutputExpert(nn.Module):
    """Wraps an expert whose forward may return a tuple (e.g. output and bias), keeping the first
    element as DeepSpeed's Experts does, so every expert maps x_MD -> y_MD."""

    def __init__(self, expert: nn.Module) -> None:
        super().__init__()
        self.expert = expert

    def forward(self, x_MD: Tensor) -> Tensor:
        y_MD = self.expert(x_MD)
        return y_MD[0] if isinstance(y_MD, tuple) else y_MD


def check_routed_inputs(
    x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor, *, num_experts: int
) -> None:
    """Shape, dtype and range checks shared by routed-experts implementations."""
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD must be 2-D [tokens, hidden], got shape {tuple(x_TD.shape)}")
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"topk_ids_TK shape {tuple(topk_ids_TK.shape)} must be [tokens={x_TD.shape[0]}, top_k]"
        )
    if topk_weights_TK.shape != topk_ids_TK.shape:
        raise ValueError(
            f"topk_weights_TK shape {tuple(topk_weights_TK.shape)} must equal topk_ids_TK shape "
            f"{tuple(topk_ids_TK.shape)}"
        )
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids_TK dtype ({topk_ids_TK.dtype}) must be int32 or int64")
    if topk_ids_TK.numel() and (int(topk_ids_TK.min()) < 0 or int(topk_ids_TK.max()) >= num_experts):
        raise ValueError(
            f"topk_ids_TK values must be in [0, {num_experts}), got min {int(topk_ids_TK.min())} "
            f"and max {int(topk_ids_TK.max())}"
        )


class LocalRoutedExperts(nn.Module):
    """All experts of one layer in this process: the reference forward_routed and the default before
    distribution.

    Rows are grouped by expert and each expert runs once on its rows; contributions are weighted in
    the weights' dtype, cast to the input dtype and summed in increasing expert order, as the
    transformers eager expert loop does.
    """

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(experts) == 0:
            raise ValueError("experts must hold at least one expert module, got an empty list")
        self.experts = nn.ModuleList(experts)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward_routed(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor) -> Tensor:
        check_routed_inputs(x_TD, topk_ids_TK, topk_weights_TK, num_experts=self.num_experts)
        num_tokens = x_TD.shape[0]
        y_TD = torch.zeros_like(x_TD)
        # Assignments in (k, token) order inside each expert, the row order transformers uses.
        expert_A = topk_ids_TK.t().reshape(-1).long()
        assignment_order_A = torch.argsort(expert_A, stable=True)
        token_A = assignment_order_A % num_tokens
        weight_A = topk_weights_TK.t().reshape(-1)[assignment_order_A]
        rows_per_expert = torch.bincount(expert_A, minlength=self.num_experts).tolist()
        start = 0
        for expert_id, num_rows in enumerate(rows_per_expert):
            if num_rows == 0:
                continue
            rows_M = token_A[start : start + num_rows]
            out_MD = self.experts[expert_id](x_TD[rows_M]) * weight_A[start : start + num_rows, None]
            y_TD.index_add_(0, rows_M, out_MD.to(y_TD.dtype))
            start += num_rows
        return y_TD

    def forward(self, x_TD: Tensor, topk_ids_TK: Tensor, topk_weights_TK: Tensor) -> Tensor:
        return self.forward_routed(x_TD, topk_ids_TK, topk_weights_TK)
