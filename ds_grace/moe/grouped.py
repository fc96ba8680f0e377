"""Stacked slot weights: one grouped GEMM per matrix over all of a rank's expert slots.

Shape legend: S slots, Q rows grouped by slot, D hidden, O / I a matrix's output / input width.

When every slot module has the same known form (an ``nn.Linear``; an ``nn.Sequential`` of
``nn.Linear`` and parameter-free activations; a GatedExpertMLP, the transformers families' expert;
any of these inside a TensorOutputExpert), its weights are stacked into one [S, O, I] tensor per
matrix and the modules' parameters become views of it: no second copy, and loading, replication and
migration keep writing the modules' parameters in place. A forward over rows grouped by slot is then
one ``torch._grouped_mm`` per matrix with the group ends on the device: no host read, no loop over
slots, static shapes. Rows past the last group end come out undefined; callers mask them. Every
matrix width must be a multiple of 16 bytes (the kernel's stride rule).

It applies on CPU (fp32, bf16, fp16) and on CUDA in bf16 with compute capability 9.0 or above (the
kernel's requirement); elsewhere, with autograd recording, or for other expert forms the caller runs
the modules one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ds_grace.models.experts import GatedExpertMLP, TensorOutputExpert


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for `dtype` on `device`."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


# On CPU the grouped kernel is a loop of GEMMs without the fused bias of nn.Linear's addmm: measured
# (8 slots, 256 -> 512 -> 256 MLP, one thread) 7-11% faster than the modules up to 32 rows per slot,
# even at 64, 10-29% slower from 96 rows per slot on. Above this many rows per slot a CPU forward
# whose shapes may vary (the normal paths) runs the modules. A GPU saves launches: always grouped.
CPU_GROUPED_MAX_ROWS_PER_SLOT = 64


def grouped_pays_off(device: torch.device, *, rows: int, slots: int) -> bool:
    """Whether a forward of `rows` rows over `slots` slots should run grouped rather than slot by slot."""
    return device.type != "cpu" or rows <= CPU_GROUPED_MAX_ROWS_PER_SLOT * slots


@dataclass(frozen=True)
class _Matrix:
    """One stacked weight (weight_SOI) with its optional bias (bias_SO, a zero row S for masked rows)."""

    weight_SOI: torch.Tensor
    bias_SO: torch.Tensor | None


class StackedSlots:
    """The slots' weights stacked per matrix; call it on rows grouped by slot."""

    def __init__(
        self, steps: Sequence[_Matrix | nn.Module], *, gated: bool, params: Sequence[nn.Parameter]
    ) -> None:
        self.steps = tuple(steps)
        self.gated = gated  # steps: (gate_up, act, down) computed as down(act(gate) * up)
        self._params = tuple(params)
        self._data_ptrs = tuple(p.data_ptr() for p in params)
        self.has_bias = any(isinstance(s, _Matrix) and s.bias_SO is not None for s in self.steps)
        self.dtype = params[0].dtype
        self.device = params[0].device

    @classmethod
    def build(cls, modules: Sequence[nn.Module]) -> StackedSlots | None:
        """Stack `modules`' weights (their parameters become views); None if their form is not one."""
        chains = [_chain(m) for m in modules]
        if not chains or any(c is None for c in chains) or not _same_form(chains):  # type: ignore[arg-type]
            return None
        params: list[nn.Parameter] = []
        steps: list[_Matrix | nn.Module] = []
        for position, first in enumerate(chains[0]):  # type: ignore[index]
            column = [chain[position] for chain in chains]  # type: ignore[index]
            steps.append(_stack_column(column, params) if isinstance(first, _MatrixRef) else first)
        if len({(p.dtype, p.device) for p in params}) != 1 or not _aligned(steps):
            return None
        return cls(steps, gated=isinstance(_unwrap(modules[0]), GatedExpertMLP), params=params)

    def is_current(self) -> bool:
        """False once a parameter was rebound (``module.to``, a new ``.data``): then build again."""
        return all(p.data_ptr() == ptr for p, ptr in zip(self._params, self._data_ptrs))

    def requires_grad(self) -> bool:
        return any(p.requires_grad for p in self._params)

    def __call__(
        self, x_QD: torch.Tensor, ends_S: torch.Tensor, *, slot_Q: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each slot's expert on its rows: rows [ends_S[s-1], ends_S[s]) belong to slot s (int32 ends).

        slot_Q (optional) is each row's slot, S past the last end; derived from ends_S if not given."""
        if slot_Q is None and self.has_bias:
            rows_Q = torch.arange(x_QD.shape[0], device=x_QD.device, dtype=torch.int32)
            slot_Q = torch.searchsorted(ends_S, rows_Q, right=True)
        if self.gated:
            gate_up, act, down = self.steps
            gate_QI, up_QI = _apply(gate_up, x_QD, ends_S, slot_Q).chunk(2, dim=-1)
            return _apply(down, act(gate_QI) * up_QI, ends_S, slot_Q)
        h = x_QD
        for step in self.steps:
            h = _apply(step, h, ends_S, slot_Q) if isinstance(step, _Matrix) else step(h)
        return h


def _apply(
    step: _Matrix, x_QI: torch.Tensor, ends_S: torch.Tensor, slot_Q: torch.Tensor | None
) -> torch.Tensor:
    y_QO = torch._grouped_mm(x_QI, step.weight_SOI.transpose(1, 2), offs=ends_S)
    if step.bias_SO is not None:
        assert slot_Q is not None
        y_QO.add_(step.bias_SO[slot_Q])  # in place: y_QO is the kernel's fresh output
    return y_QO


def _aligned(steps: Sequence[_Matrix | nn.Module]) -> bool:
    """The kernel's rule: every row stride (each matrix's input and output width) a multiple of 16 bytes."""
    matrices = [s for s in steps if isinstance(s, _Matrix)]
    return all((w * m.weight_SOI.element_size()) % 16 == 0 for m in matrices for w in m.weight_SOI.shape[1:])


def _unwrap(module: nn.Module) -> nn.Module:
    return module.expert if isinstance(module, TensorOutputExpert) else module


@dataclass(frozen=True)
class _MatrixRef:
    """One slot module's matrix (and bias) as its parameters: what one step of its chain multiplies by."""

    weight: nn.Parameter
    bias: nn.Parameter | None = None


def _chain(module: nn.Module) -> list[_MatrixRef | nn.Module] | None:
    """The module as a sequence of steps (its matrices / parameter-free modules), or None."""
    module = _unwrap(module)
    if isinstance(module, GatedExpertMLP):
        return [_MatrixRef(module.gate_up_proj), module.act_fn, _MatrixRef(module.down_proj)]
    if isinstance(module, nn.Linear):
        return [_MatrixRef(module.weight, module.bias)]
    if isinstance(module, nn.Sequential):
        steps = [_MatrixRef(s.weight, s.bias) if isinstance(s, nn.Linear) else s for s in module]
        if any(isinstance(s, _MatrixRef) for s in steps) and not any(
            isinstance(s, nn.Module) and _has_params(s) for s in steps
        ):
            return steps
    return None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _same_form(chains: Sequence[list[_MatrixRef | nn.Module]]) -> bool:
    def signature(chain: list[_MatrixRef | nn.Module]) -> tuple:
        return tuple(
            (tuple(s.weight.shape), s.bias is None) if isinstance(s, _MatrixRef) else repr(s) for s in chain
        )

    first = signature(chains[0])
    return all(signature(chain) == first for chain in chains[1:])


def _stack_column(column: Sequence[_MatrixRef], params: list[nn.Parameter]) -> _Matrix:
    """Stack one matrix position of every slot; the slots' parameters become views of the stack."""
    weight_SOI = _stack_params([ref.weight for ref in column], params)
    bias_SO = None
    if column[0].bias is not None:
        bias_SO = _stack_params([ref.bias for ref in column], params, spare_row=True)  # type: ignore[misc]
    return _Matrix(weight_SOI, bias_SO)


def _stack_params(
    slot_params: Sequence[nn.Parameter], params: list[nn.Parameter], *, spare_row: bool = False
) -> torch.Tensor:
    """One tensor [S (+1 zero row), ...] holding every parameter; each parameter becomes a view of it."""
    rows = [p.detach() for p in slot_params]
    if spare_row:
        rows.append(torch.zeros_like(rows[0]))
    stacked = torch.stack(rows)
    for index, param in enumerate(slot_params):
        param.data = stacked[index]
        params.append(param)
    return stacked
