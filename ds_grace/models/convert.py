"""Find the MoE blocks of a model and replace them, in place, by RoutedMoEBlocks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ds_grace.models.adapters import (
    ADAPTERS,
    HF_FAMILIES,
    SUPPORTED_FAMILIES,
    ModelAdapterError,
    MoEAdapter,
    adapter_for_block,
    looks_like_moe_block,
    supported_blocks_text,
)
from ds_grace.models.experts import LocalRoutedExperts
from ds_grace.models.routed_block import RoutedMoEBlock

# (layer_index, expert modules of that layer) -> object with forward_routed
MakeRoutedExperts = Callable[[int, list[nn.Module]], nn.Module]


def local_routed_experts(layer_index: int, experts: list[nn.Module]) -> nn.Module:
    """The default MakeRoutedExperts: every expert in this process."""
    return LocalRoutedExperts(experts)


@dataclass(frozen=True)
class FoundMoEBlock:
    """A supported MoE block of a model: ``getattr(parent, attribute)`` is ``block``."""

    parent: nn.Module
    attribute: str
    qualified_name: str
    block: nn.Module
    adapter: MoEAdapter


def find_moe_blocks(model: nn.Module) -> list[FoundMoEBlock]:
    """Supported MoE blocks in model order (module registration order), checking the rest."""
    found: list[FoundMoEBlock] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for attribute, child in parent.named_children():
            name = f"{prefix}.{attribute}" if prefix else attribute
            if isinstance(child, RoutedMoEBlock):
                raise ModelAdapterError(
                    f"module {name} is already a RoutedMoEBlock: the model was converted before"
                )
            adapter = adapter_for_block(child)
            if adapter is not None:
                adapter.check_supported(child)
                found.append(FoundMoEBlock(parent, attribute, name, child, adapter))
            elif looks_like_moe_block(child):
                raise ModelAdapterError(
                    f"module {name} is an MoE block of an unsupported class ({type(child).__module__}."
                    f"{type(child).__qualname__}); supported: {supported_blocks_text()}"
                )
            else:
                visit(child, name)

    visit(model, "")
    return found


def convert_moe_blocks(
    model: nn.Module, *, make_routed_experts: MakeRoutedExperts = local_routed_experts
) -> list[RoutedMoEBlock]:
    """Replace every supported MoE block of ``model`` by a RoutedMoEBlock, in place.

    MoE layers are numbered 0.. in model order (dense layers are not counted and stay untouched).
    For each, ``make_routed_experts(layer_index, expert_modules)`` builds the routed-experts object;
    the block's own expert parameters are dropped. Every block is found and checked before any is
    replaced, so an unsupported or already converted block leaves the model as it was.
    """
    found = find_moe_blocks(model)
    if not found:
        raise ModelAdapterError(
            f"no supported MoE block found in {type(model).__name__}; supported: {supported_blocks_text()}"
        )
    converted: list[RoutedMoEBlock] = []
    for layer_index, item in enumerate(found):
        experts = item.adapter.expert_modules(item.block)
        routed_block = RoutedMoEBlock(
            block=item.block,
            adapter=item.adapter,
            layer_index=layer_index,
            routed_experts=make_routed_experts(layer_index, experts),
            num_experts=item.adapter.num_experts(item.block),
            top_k=item.adapter.top_k(item.block),
            module_name=item.qualified_name,
        )
        item.adapter.detach_experts(item.block)
        routed_block.train(item.block.training)
        setattr(item.parent, item.attribute, routed_block)
        converted.append(routed_block)
    return converted


def model_family(model_or_config: Any) -> str:
    """The family name (one of SUPPORTED_FAMILIES) of a transformers model or config, or of a module
    holding DeepSpeed MoE layers."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is not None:
        if model_type in HF_FAMILIES:
            return model_type
        raise ModelAdapterError(
            f"model_type ({model_type!r}) is not a supported MoE family; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    if isinstance(model_or_config, nn.Module):
        deepspeed_adapter = ADAPTERS["deepspeed_moe"]
        for module in model_or_config.modules():
            if deepspeed_adapter.matches(module):
                return "deepspeed_moe"
            if isinstance(module, RoutedMoEBlock):
                return module.family
    raise ModelAdapterError(
        f"cannot tell the MoE family of {type(model_or_config).__name__}: it has no config.model_type and "
        f"holds no DeepSpeed MoE layer; supported: {', '.join(SUPPORTED_FAMILIES)}"
    )
