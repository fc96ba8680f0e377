"""Adapters that let transformers and DeepSpeed MoE models hand their routing to routed-experts objects."""

from ds_grace.models.adapters import (
    ADAPTERS,
    SUPPORTED_FAMILIES,
    ModelAdapterError,
    MoEAdapter,
    adapter_for_block,
)
from ds_grace.models.checkpoints import CheckpointError, load_checkpoint, tiny_checkpoint, tiny_config
from ds_grace.models.convert import MakeRoutedExperts, convert_moe_blocks, local_routed_experts, model_family
from ds_grace.models.experts import (
    GatedExpertMLP,
    LocalRoutedExperts,
    TensorOutputExpert,
    check_routed_inputs,
)
from ds_grace.models.routed_block import RoutedMoEBlock, RoutingCallback, set_routing_callback

__all__ = [
    "ADAPTERS",
    "SUPPORTED_FAMILIES",
    "CheckpointError",
    "GatedExpertMLP",
    "LocalRoutedExperts",
    "MakeRoutedExperts",
    "ModelAdapterError",
    "MoEAdapter",
    "RoutedMoEBlock",
    "RoutingCallback",
    "TensorOutputExpert",
    "adapter_for_block",
    "check_routed_inputs",
    "convert_moe_blocks",
    "load_checkpoint",
    "local_routed_experts",
    "model_family",
    "set_routing_callback",
    "tiny_checkpoint",
    "tiny_config",
]
