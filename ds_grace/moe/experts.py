"""GraceExperts: the expert instances (slots) one rank hosts under a plan.

Shape legend: Q expert input rows on this rank (routes), D hidden.

A subclass of DeepSpeed's Experts so that its discovery and parameter handling keep working:
``deepspeed_experts`` holds one module per local slot, ``num_local_experts`` their count, and every
parameter is tagged ``allreduce=False`` / ``group_name`` like DeepSpeed's expert parameters.
Replicas are real parameter tensors (copies of the primary's values), never shared storage.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from deepspeed.moe.experts import Experts
from torch import nn


class GraceExperts(Experts):
    def __init__(
        self, slot_modules: Sequence[nn.Module], *, slot2expert: Sequence[int], expert_group_name: str
    ) -> None:
        nn.Module.__init__(self)
        if len(slot_modules) != len(slot2expert):
            raise ValueError(
                f"slot_modules ({len(slot_modules)}) and slot2expert ({len(slot2expert)}) must have equal length"
            )
        self.deepspeed_experts = nn.ModuleList(slot_modules)
        self.num_local_experts = len(slot_modules)
        self.slot2expert = tuple(int(e) for e in slot2expert)
        tag_expert_parameters(self.deepspeed_experts, expert_group_name)

    def forward(self, x_QD: torch.Tensor, slot_splits: Sequence[int]) -> torch.Tensor:  # type: ignore[override]
        """Run each slot's expert once on its contiguous block of rows (rows grouped by slot)."""
        if len(slot_splits) != self.num_local_experts or sum(slot_splits) != x_QD.shape[0]:
            raise ValueError(
                f"slot_splits ({list(slot_splits)}) must have one entry per slot ({self.num_local_experts}) "
                f"summing to the row count ({x_QD.shape[0]})"
            )
        out_QD = torch.empty_like(x_QD)
        start = 0
        for rows, expert in zip(slot_splits, self.deepspeed_experts):
            if rows:
                y = expert(x_QD[start : start + rows])
                out_QD[start : start + rows] = y[0] if isinstance(y, tuple) else y
            start += rows
        return out_QD

    def forward_every_slot(self, x_VD: torch.Tensor) -> torch.Tensor:
        """out_SVD[s] = slot s's expert on every row (the low-latency path: static shapes, the gate
        weights pick the outputs)."""
        outputs = []
        for expert in self.deepspeed_experts:
            y = expert(x_VD)
            outputs.append(y[0] if isinstance(y, tuple) else y)
        if not outputs:
            return x_VD.new_zeros(0, *x_VD.shape)
        return torch.stack(outputs)


def tag_expert_parameters(module: nn.Module, expert_group_name: str) -> None:
    """Mark parameters as DeepSpeed expert parameters (excluded from data-parallel allreduce)."""
    for param in module.parameters():
        param.allreduce = False
        param.group_name = expert_group_name


def copy_slot_modules(experts: Sequence[nn.Module], slot2expert: Sequence[int]) -> list[nn.Module]:
    """One independent deep copy of experts[e] per slot (replicas get their own tensors)."""
    for e in slot2expert:
        if not 0 <= e < len(experts):
            raise ValueError(
                f"slot expert id ({e}) must be in [0, {len(experts)}) (the expert list's length)"
            )
    return [copy.deepcopy(experts[e]) for e in slot2expert]
