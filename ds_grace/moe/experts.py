"""GraceExperts: the expert instances (slots) one rank hosts under a plan.

Shape legend: Q expert input rows on this rank (routes), D hidden.

A subclass of DeepSpeed's Experts so that its discovery and parameter handling keep working:
``deepspeed_experts`` holds one module per local slot, ``num_local_experts`` their count, and every
parameter is tagged ``allreduce=False`` / ``group_name`` like DeepSpeed's expert parameters.
Replicas are real parameter tensors (copies of the primary's values), never shared storage.

The slots run as one grouped GEMM per matrix (ds_grace.moe.grouped) where their form and the device
allow it; otherwise each slot's module runs on its rows.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from deepspeed.moe.experts import Experts
from torch import nn

from ds_grace.moe.grouped import StackedSlots, grouped_mm_supported, grouped_pays_off


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
        self._stacked: StackedSlots | None = None
        self._stack_refused = False  # the slots' form has no stacked version
        self._slot_ids: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # arange(slots), per device

    def forward(  # type: ignore[override]
        self, x_QD: torch.Tensor, slot_splits: Sequence[int], *, slot_Q: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run each slot's expert once on its contiguous block of rows (rows grouped by slot).

        slot_Q (optional, on the device): each row's slot, ascending. The stacked form takes its group
        ends from it on the device; without it they are uploaded from slot_splits (on an accelerator a
        synchronous copy: the runtime always passes it)."""
        if len(slot_splits) != self.num_local_experts or sum(slot_splits) != x_QD.shape[0]:
            raise ValueError(
                f"slot_splits ({list(slot_splits)}) must have one entry per slot ({self.num_local_experts}) "
                f"summing to the row count ({x_QD.shape[0]})"
            )
        rows = int(x_QD.shape[0])
        stacked = self.stacked_slots(x_QD)
        if (
            stacked is not None
            and rows
            and grouped_pays_off(x_QD.device, rows=rows, slots=self.num_local_experts)
        ):
            return stacked(x_QD, self._group_ends(slot_splits, slot_Q, x_QD.device), slot_Q=slot_Q)
        out_QD = torch.empty_like(x_QD)
        start = 0
        for slot_rows, expert in zip(slot_splits, self.deepspeed_experts):
            if slot_rows:
                out_QD[start : start + slot_rows] = _tensor_output(expert(x_QD[start : start + slot_rows]))
            start += slot_rows
        return out_QD

    def _group_ends(
        self, slot_splits: Sequence[int], slot_Q: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """ends_S (int32, on `device`): the row after each slot's block."""
        if slot_Q is None:
            ends = list(itertools.accumulate(slot_splits))
            return torch.tensor(ends, dtype=torch.int32, device=device)
        key = (slot_Q.device, slot_Q.dtype)
        if key not in self._slot_ids:
            self._slot_ids[key] = torch.arange(
                self.num_local_experts, device=slot_Q.device, dtype=slot_Q.dtype
            )
        return torch.searchsorted(slot_Q, self._slot_ids[key], right=True, out_int32=True)

    def forward_routes(
        self, x_VD: torch.Tensor, slot_VK: torch.Tensor, weight_VK: torch.Tensor
    ) -> torch.Tensor:
        """partial_VD[v] = sum_k weight_VK[v, k] * slot slot_VK[v, k]'s expert on x_VD[v], in fp32.

        slot_VK holds local slot indices, num_local_experts where a route is not this rank's. Static
        shapes, no host read (the low-latency path): with stacked slots the routes are sorted by slot
        and every matrix is one grouped GEMM over V*K rows; otherwise every slot runs on every row.
        """
        slots, (rows, k) = self.num_local_experts, slot_VK.shape
        stacked = self.stacked_slots(x_VD)
        if stacked is None:
            weight_VS = weight_VK.new_zeros(rows, slots + 1).scatter_add_(1, slot_VK, weight_VK)[:, :slots]
            return torch.einsum("vs,svd->vd", weight_VS, self._every_slot(x_VD).float())
        sorted_slot_R, order_R = torch.sort(slot_VK.reshape(-1))  # slots ascending; `slots` (not here) last
        ends_S = torch.searchsorted(
            sorted_slot_R, torch.arange(slots, device=x_VD.device), right=True, out_int32=True
        )
        row_R = order_R // k
        y_RD = stacked(x_VD.index_select(0, row_R), ends_S, slot_Q=sorted_slot_R)
        weight_RD = torch.take(weight_VK, order_R).unsqueeze(1)
        # rows past the last group end are undefined (possibly NaN): select, never multiply them away
        weighted_RD = torch.where((sorted_slot_R < slots).unsqueeze(1), y_RD.float() * weight_RD, 0.0)
        return weighted_RD.new_zeros(rows, x_VD.shape[1]).index_add_(0, row_R, weighted_RD)

    def _every_slot(self, x_VD: torch.Tensor) -> torch.Tensor:
        """out_SVD[s] = slot s's expert on every row."""
        outputs = [_tensor_output(expert(x_VD)) for expert in self.deepspeed_experts]
        return torch.stack(outputs) if outputs else x_VD.new_zeros(0, *x_VD.shape)

    def stacked_slots(self, x: torch.Tensor) -> StackedSlots | None:
        """The slots' stacked weights for inputs like `x` (built on first use and after the parameters
        were rebound), or None where the grouped form does not apply (see ds_grace.moe.grouped)."""
        if not self.num_local_experts or not grouped_mm_supported(x.device, x.dtype):
            return None
        stacked = self._stacked
        if stacked is None or not stacked.is_current():
            if self._stack_refused:
                return None
            stacked = self._stacked = StackedSlots.build(list(self.deepspeed_experts))
            self._stack_refused = stacked is None
        if stacked is None or stacked.dtype != x.dtype or stacked.device != x.device:
            return None
        if torch.is_grad_enabled() and stacked.requires_grad():
            return None  # autograd runs through the modules' own parameters
        return stacked

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_stacked"], state["_stack_refused"] = None, False  # a copy stacks its own parameters
        state["_slot_ids"] = {}
        return state


def _tensor_output(y: torch.Tensor | tuple) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


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
