"""Count what one MoE layer forward costs the host: host reads, non-view aten ops, collectives.

A host read is anything that makes the host wait for the device on an accelerator: ``.tolist()``,
scalar reads (``.item()``, ``int(t)``: aten ``_local_scalar_dense``), ops whose output shape depends
on the data (``nonzero``, ``unique``, ``masked_select``), ``bincount`` (on CUDA it reads the input's
min and max back to size its output, even with ``minlength``), boolean mask indexing (``x[mask]``: a
``nonzero`` inside the op), and uploads: a tensor made from host data (``torch.tensor``: aten
``lift_fresh``, counted on any device, since on an accelerator it is a copy the host waits for) or a
copy to an accelerator from memory that is not pinned or not non-blocking. Aten ops are counted below
every Python call by a TorchDispatchMode; view ops (no kernel launch) are left out, and so are the
experts' own ops (their GEMMs and activations): a forward hook on each expert module marks its span,
and so does every call of the slots' stacked form (ds_grace.moe.grouped.StackedSlots). Collectives
are the torch.distributed calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ds_grace.moe.grouped import StackedSlots

_DATA_DEPENDENT = {"nonzero", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "masked_select", "nonzero_static_no"}  # fmt: skip
_COLLECTIVES = ("all_to_all_single", "all_to_all", "all_reduce", "all_gather", "all_gather_into_tensor",
                "broadcast", "reduce_scatter_tensor", "barrier")  # fmt: skip


@dataclass
class HotPathCounts:
    """What one span of work cost: host reads (by kind), non-view aten ops (by name), collectives."""

    host_reads: Counter[str] = field(default_factory=Counter)
    aten_ops: Counter[str] = field(default_factory=Counter)
    collectives: Counter[str] = field(default_factory=Counter)

    @property
    def num_host_reads(self) -> int:
        return sum(self.host_reads.values())

    @property
    def num_aten_ops(self) -> int:
        return sum(self.aten_ops.values())

    @property
    def num_collectives(self) -> int:
        return sum(self.collectives.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "host_reads": self.num_host_reads,
            "aten_ops": self.num_aten_ops,
            "collectives": self.num_collectives,
            "host_reads_by_kind": dict(self.host_reads),
            "collectives_by_name": dict(self.collectives),
            "aten_ops_by_name": dict(self.aten_ops),
        }


class _OpCounter(TorchDispatchMode):
    def __init__(self, counts: HotPathCounts) -> None:
        super().__init__()
        self.counts = counts
        self.expert_depth = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.counts.host_reads["scalar read"] += 1
        elif name in _DATA_DEPENDENT:
            self.counts.host_reads[name] += 1
        elif name == "bincount":  # CUDA's reads the input's min and max back, minlength or not
            self.counts.host_reads["bincount"] += 1
        elif name in ("index", "index_put_", "index_put") and _bool_index(args):
            self.counts.host_reads["boolean mask index"] += 1  # a nonzero inside the op
        elif name in ("_to_copy", "copy_") and _to_host(name, args, kwargs):
            self.counts.host_reads["copy to host"] += 1
        elif name == "lift_fresh" or (
            name in ("_to_copy", "copy_") and _synchronous_upload(name, args, kwargs)
        ):
            self.counts.host_reads["upload"] += 1
        if not func.is_view and self.expert_depth == 0:
            self.counts.aten_ops[name] += 1
        return func(*args, **kwargs)


def _bool_index(args: tuple) -> bool:
    """Whether aten index / index_put is indexed by a boolean mask (converted with nonzero inside)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _copy_ends(name: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.device, bool] | None:
    """(source, target device, non_blocking) of ``_to_copy(src, device=..., non_blocking=...)`` or
    ``copy_(dst, src, non_blocking)``; None for a copy that stays on its device."""
    if name == "copy_":
        if len(args) < 2:
            return None
        source, target = args[1], args[0].device
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking"))
    else:
        source, device = (args[0] if args else None), kwargs.get("device")
        target = torch.device(device) if device is not None else None
        non_blocking = bool(kwargs.get("non_blocking"))
    if not isinstance(source, torch.Tensor) or target is None:
        return None
    return source, target, non_blocking


def _to_host(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy from an accelerator to host memory."""
    ends = _copy_ends(name, args, kwargs)
    return ends is not None and ends[0].device.type not in ("cpu", "meta") and ends[1].type == "cpu"


def _synchronous_upload(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy from host memory to an accelerator that the host waits for (not pinned and non-blocking)."""
    ends = _copy_ends(name, args, kwargs)
    if ends is None:
        return False
    source, target, non_blocking = ends
    return (
        source.device.type == "cpu"
        and target.type not in ("cpu", "meta")
        and not (source.is_pinned() and non_blocking)
    )


@contextmanager
def count_hot_path(experts: Iterable[nn.Module] = ()) -> Iterator[HotPathCounts]:
    """Count host reads, non-view aten ops (outside `experts`' forwards) and collectives."""
    counts = HotPathCounts()
    mode = _OpCounter(counts)
    handles = []
    for module in experts:
        handles.append(module.register_forward_pre_hook(lambda *_: _enter(mode)))
        handles.append(module.register_forward_hook(lambda *_: _leave(mode)))
    original_tolist = torch.Tensor.tolist
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def tolist(self: torch.Tensor) -> Any:
        counts.host_reads["tolist"] += 1
        return original_tolist(self)

    def wrap(name: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts.collectives[name] += 1
            return originals[name](*args, **kwargs)

        return counted

    stacked_call = StackedSlots.__call__

    def counted_stacked(self: StackedSlots, *args: Any, **kwargs: Any) -> torch.Tensor:
        _enter(mode)
        try:
            return stacked_call(self, *args, **kwargs)
        finally:
            _leave(mode)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    StackedSlots.__call__ = counted_stacked  # type: ignore[method-assign]
    for name in originals:
        setattr(dist, name, wrap(name))
    try:
        with mode:
            yield counts
    finally:
        torch.Tensor.tolist = original_tolist  # type: ignore[method-assign]
        StackedSlots.__call__ = stacked_call  # type: ignore[method-assign]
        for name, original in originals.items():
            setattr(dist, name, original)
        for handle in handles:
            handle.remove()


def _enter(mode: _OpCounter) -> None:
    mode.expert_depth += 1


def _leave(mode: _OpCounter) -> None:
    mode.expert_depth -= 1
