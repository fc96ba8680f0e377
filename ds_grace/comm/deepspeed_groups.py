"""Hand DeepSpeed's expert-parallel process groups to the MoE layers that need them.

``deepspeed.init_inference`` creates one expert-parallel group per ``moe.ep_size`` (stored on the
engine as ``engine.ep_group[ep_size]``) but never gives it to the MoE layers. A layer without its group
runs its all-to-all over WORLD, which is wrong whenever ep_size < world size, and with
``drop_tokens=False`` it skips the capacity all-reduce, so ranks pad to different capacities and the
all-to-all fails with a size mismatch (DeepSpeed issue #6809). :func:`wire_expert_parallel_groups`
gives every layer the engine's group after checking that the group holds the ranks the layout says.

Layout (as ``InferenceEngine._create_ep_parallel_group`` builds it): expert-parallel groups are
contiguous blocks of ep_size ranks; a rank's position in its block is its ep rank, and ep rank q holds
global experts q * E / ep_size .. (q + 1) * E / ep_size - 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn


class ExpertGroupError(RuntimeError):
    """The expert-parallel groups do not fit the model or the world."""


@dataclass(frozen=True)
class WiredLayer:
    name: str
    ep_size: int
    ep_rank: int
    group_ranks: tuple[int, ...]


def expert_parallel_layout(world_size: int, ep_size: int) -> list[list[int]]:
    """Ranks of every expert-parallel group, in the order deepspeed.init_inference creates them."""
    check_ep_size(world_size=world_size, ep_size=ep_size)
    return [list(range(start, start + ep_size)) for start in range(0, world_size, ep_size)]


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """Position of `rank` inside its expert-parallel group (which experts it holds)."""
    if ep_size < 1:
        raise ValueError(f"ep_size ({ep_size}) must be >= 1")
    return rank % ep_size


def expert_parallel_group_ranks(rank: int, ep_size: int) -> list[int]:
    """The ranks sharing `rank`'s expert-parallel group."""
    start = rank - expert_parallel_rank(rank, ep_size)
    return list(range(start, start + ep_size))


def check_ep_size(*, world_size: int, ep_size: int) -> None:
    if ep_size < 1 or world_size % ep_size != 0:
        raise ExpertGroupError(
            f"moe.ep_size ({ep_size}) must be >= 1 and divide the world size ({world_size})"
        )


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every DeepSpeed MoE layer of `model` with its qualified name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def wire_expert_parallel_groups(model: nn.Module, ep_groups: Mapping[int, Any] | None) -> list[WiredLayer]:
    """Give each MoE layer of `model` the expert-parallel group for its ep_size.

    `ep_groups` maps ep_size -> process group, as ``InferenceEngine.ep_group`` holds them (None on a
    world of one rank, where no layer needs a group). Re-wiring a layer to the same group is a no-op;
    a layer already bound to another group is an error.
    """
    layers = moe_layers(model)
    if not layers:
        raise ExpertGroupError("model has no deepspeed.moe.layer.MoE layers to wire")
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    wired: list[WiredLayer] = []
    for name, layer in layers:
        check_ep_size(world_size=world_size, ep_size=layer.ep_size)
        expected_ranks = tuple(expert_parallel_group_ranks(rank, layer.ep_size))
        if world_size == 1:
            wired.append(WiredLayer(name=name, ep_size=1, ep_rank=0, group_ranks=(0,)))
            continue
        group = (ep_groups or {}).get(layer.ep_size)
        if group is None:
            available = sorted((ep_groups or {}).keys())
            raise ExpertGroupError(
                f"no expert-parallel group of size {layer.ep_size} for MoE layer '{name}' "
                f"(groups exist for ep_size {available}); moe.ep_size in the DeepSpeed config must "
                f"equal the layers' ep_size"
            )
        group_ranks = tuple(dist.get_process_group_ranks(group))
        if group_ranks != expected_ranks:
            raise ExpertGroupError(
                f"expert-parallel group of rank {rank} holds ranks {list(group_ranks)}, but the "
                f"contiguous layout for ep_size {layer.ep_size} gives {list(expected_ranks)}"
            )
        current = layer.deepspeed_moe.ep_group
        if current is None:
            layer.deepspeed_moe._set_ep_group(group)
        elif current is not group:
            raise ExpertGroupError(
                f"MoE layer '{name}' is already bound to another expert-parallel group "
                f"(ranks {dist.get_process_group_ranks(current)})"
            )
        wired.append(
            WiredLayer(
                name=name,
                ep_size=layer.ep_size,
                ep_rank=expert_parallel_rank(rank, layer.ep_size),
                group_ranks=group_ranks,
            )
        )
    return wired
