"""Adapters from the MoE blocks of supported model families to (router, experts, shared part).

Shape legend: T tokens, D hidden, K top-k, E experts.

Tested with transformers 5.24 (the 5.x layout: experts fused into ``gate_up_proj`` [E, 2I, D] and
``down_proj`` [E, D, I] tensors, a ``*TopKRouter``/``*TopkRouter`` module as ``block.gate``, and a
block forward returning one tensor) and deepspeed 0.19.8. Earlier transformers (4.x, experts as a
ModuleList, routing inside the block) are refused with an error naming the layout found.

An adapter is a stateless object; its methods take the block (the transformers or DeepSpeed module):
- ``route(block, x_TD) -> (topk_ids_TK int64, topk_weights_TK)``: the family's router, exactly
  (``route_with_logits`` also returns the router logits);
- ``expert_modules(block) -> list[nn.Module]``: one module per logical expert (x_MD -> y_MD) with its
  own copy of the parameters;
- ``shared_output(block, x_TD) -> y_TD | None``: shared experts and their gates (every rank computes it);
- ``pack_output(y, routing, num_experts)``: the block's return convention;
- ``router_module(block)``: the module whose forward hooks observe (logits, weights, ids), or None.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ds_grace.comm.schedule import value_counts
from ds_grace.models.experts import GatedExpertMLP, TensorOutputExpert
from ds_grace.models.routers import (
    RouterOutput,
    deepseek_v2_route,
    deepseek_v3_route,
    deepspeed_l_aux,
    deepspeed_topk_route,
    mixtral_route,
    softmax_topk_route,
)

RouteFn = Callable[[nn.Module, Tensor], RouterOutput]


class ModelAdapterError(ValueError):
    """A model, MoE block or checkpoint cannot be adapted."""


@cache
def _import_class(module_name: str, class_name: str) -> type[nn.Module] | None:
    try:
        return getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        return None


class MoEAdapter:
    """Base of the family adapters: one MoE block class, its router and its experts."""

    family: str = ""
    block_class_name: str = ""
    experts_attribute: str = "experts"

    def block_class(self) -> type[nn.Module] | None:
        raise NotImplementedError

    def matches(self, module: nn.Module) -> bool:
        block_class = self.block_class()
        return block_class is not None and type(module) is block_class

    def check_supported(self, block: nn.Module) -> None:
        """Raise ModelAdapterError for a configuration of the block this adapter cannot keep exact."""

    def num_experts(self, block: nn.Module) -> int:
        raise NotImplementedError

    def top_k(self, block: nn.Module) -> int:
        raise NotImplementedError

    def route_with_logits(self, block: nn.Module, x_TD: Tensor) -> RouterOutput:
        raise NotImplementedError

    def route(self, block: nn.Module, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        routing = self.route_with_logits(block, x_TD)
        return routing.topk_ids_TK, routing.topk_weights_TK

    def router_module(self, block: nn.Module) -> nn.Module | None:
        return None

    def expert_modules(self, block: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def shared_output(self, block: nn.Module, x_TD: Tensor) -> Tensor | None:
        return None

    def detach_experts(self, block: nn.Module) -> None:
        """Drop the block's own expert parameters once they live in the routed-experts object."""
        delattr(block, self.experts_attribute)

    def pack_output(self, y: Tensor, routing: RouterOutput, num_experts: int) -> Any:
        return y


class FusedExpertsAdapter(MoEAdapter):
    """A transformers 5.x sparse-MoE block: ``block.gate`` router, ``block.experts`` fused experts."""

    def __init__(
        self,
        *,
        family: str,
        modeling_module: str,
        block_class_name: str,
        router: RouteFn,
        shared: Callable[[nn.Module, Tensor], Tensor] | None = None,
    ) -> None:
        self.family = family
        self.modeling_module = modeling_module
        self.block_class_name = block_class_name
        self._router = router
        self._shared = shared

    def block_class(self) -> type[nn.Module] | None:
        return _import_class(self.modeling_module, self.block_class_name)

    def check_supported(self, block: nn.Module) -> None:
        experts = getattr(block, "experts", None)
        if not isinstance(getattr(experts, "gate_up_proj", None), Tensor):
            raise ModelAdapterError(
                f"{self.family}: {type(block).__name__}.experts ({type(experts).__name__}) is not the fused "
                "layout (gate_up_proj [E, 2I, D], down_proj [E, D, I]) this adapter supports; "
                "use transformers 5.x"
            )
        for flag, expected in (("is_transposed", False), ("has_bias", False), ("is_concatenated", True)):
            value = getattr(experts, flag, expected)
            if value != expected:
                raise ModelAdapterError(
                    f"{self.family}: {type(experts).__name__}.{flag} ({value}) must be {expected} for this adapter"
                )
        if block.training and getattr(block, "jitter_noise", 0.0) > 0:
            raise ModelAdapterError(
                f"{self.family}: router_jitter_noise ({block.jitter_noise}) is applied in training mode; "
                "convert a model in eval mode"
            )

    def num_experts(self, block: nn.Module) -> int:
        return int(block.gate.num_experts)

    def top_k(self, block: nn.Module) -> int:
        return int(block.gate.top_k)

    def route_with_logits(self, block: nn.Module, x_TD: Tensor) -> RouterOutput:
        return self._router(block.gate, x_TD)

    def router_module(self, block: nn.Module) -> nn.Module | None:
        return block.gate

    def expert_modules(self, block: nn.Module) -> list[nn.Module]:
        self.check_supported(block)
        experts = block.experts
        return [
            GatedExpertMLP(
                gate_up_proj=experts.gate_up_proj[expert_id],
                down_proj=experts.down_proj[expert_id],
                act_fn=experts.act_fn,
            )
            for expert_id in range(experts.gate_up_proj.shape[0])
        ]

    def shared_output(self, block: nn.Module, x_TD: Tensor) -> Tensor | None:
        return None if self._shared is None else self._shared(block, x_TD)


def _qwen2_moe_shared(block: nn.Module, x_TD: Tensor) -> Tensor:
    return F.sigmoid(block.shared_expert_gate(x_TD)) * block.shared_expert(x_TD)


def _deepseek_shared(block: nn.Module, x_TD: Tensor) -> Tensor:
    return block.shared_experts(x_TD)


class DeepSpeedMoEAdapter(MoEAdapter):
    """``deepspeed.moe.layer.MoE`` (exactly that class) with its TopKGate in eval semantics.

    The converted block never drops tokens and adds no gating noise: it is the drop_tokens=False,
    use_rts=False, top2_2nd_expert_sampling=False eval forward of the original. It returns
    (output, l_aux, exp_counts) like MoE.forward, l_aux by TopKGate's formula.
    """

    family = "deepspeed_moe"
    block_class_name = "deepspeed.moe.layer.MoE"

    def block_class(self) -> type[nn.Module] | None:
        return _import_class("deepspeed.moe.layer", "MoE")

    def check_supported(self, block: nn.Module) -> None:
        if block.ep_size != 1:
            raise ModelAdapterError(
                f"deepspeed_moe: MoE ep_size ({block.ep_size}) must be 1: an expert-parallel layer holds only "
                "its local experts; convert the model before sharding it"
            )
        if block.use_residual:
            raise ModelAdapterError(
                "deepspeed_moe: MoE use_residual (True) is not supported (Residual-MoE mixing)"
            )

    def num_experts(self, block: nn.Module) -> int:
        return int(block.num_experts)

    def top_k(self, block: nn.Module) -> int:
        return int(block.deepspeed_moe.gate.k)

    def route_with_logits(self, block: nn.Module, x_TD: Tensor) -> RouterOutput:
        return deepspeed_topk_route(block.deepspeed_moe.gate, x_TD)

    def expert_modules(self, block: nn.Module) -> list[nn.Module]:
        self.check_supported(block)
        return [TensorOutputExpert(expert) for expert in block.deepspeed_moe.experts.deepspeed_experts]

    def detach_experts(self, block: nn.Module) -> None:
        del block.deepspeed_moe.experts

    def pack_output(self, y: Tensor, routing: RouterOutput, num_experts: int) -> Any:
        exp_counts_E = value_counts(routing.topk_ids_TK, num_experts)  # no host read (bincount reads)
        return y, deepspeed_l_aux(routing.logits_TE, routing.topk_ids_TK), exp_counts_E


def _hf(family: str, block_class_name: str, router: RouteFn, shared=None) -> FusedExpertsAdapter:
    return FusedExpertsAdapter(
        family=family,
        modeling_module=f"transformers.models.{family}.modeling_{family}",
        block_class_name=block_class_name,
        router=router,
        shared=shared,
    )


ADAPTERS: dict[str, MoEAdapter] = {
    "mixtral": _hf("mixtral", "MixtralSparseMoeBlock", mixtral_route),
    "qwen2_moe": _hf("qwen2_moe", "Qwen2MoeSparseMoeBlock", softmax_topk_route, _qwen2_moe_shared),
    "qwen3_moe": _hf("qwen3_moe", "Qwen3MoeSparseMoeBlock", softmax_topk_route),
    "olmoe": _hf("olmoe", "OlmoeSparseMoeBlock", softmax_topk_route),
    "deepseek_v2": _hf("deepseek_v2", "DeepseekV2Moe", deepseek_v2_route, _deepseek_shared),
    "deepseek_v3": _hf("deepseek_v3", "DeepseekV3MoE", deepseek_v3_route, _deepseek_shared),
    "deepspeed_moe": DeepSpeedMoEAdapter(),
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(ADAPTERS)
HF_FAMILIES: tuple[str, ...] = tuple(family for family in ADAPTERS if family != "deepspeed_moe")


def supported_blocks_text() -> str:
    """'mixtral (MixtralSparseMoeBlock), ...' for error messages."""
    return ", ".join(f"{family} ({adapter.block_class_name})" for family, adapter in ADAPTERS.items())


def adapter_for_block(module: nn.Module) -> MoEAdapter | None:
    """The adapter whose block class is exactly ``type(module)``, else None."""
    for adapter in ADAPTERS.values():
        if adapter.matches(module):
            return adapter
    return None


def looks_like_moe_block(module: nn.Module) -> bool:
    """A module no adapter matches that is nonetheless an MoE block: a subclass of DeepSpeed's MoE, or
    any module holding an ``experts`` child next to a ``gate`` or ``router`` child."""
    deepspeed_moe_class = _import_class("deepspeed.moe.layer", "MoE")
    if deepspeed_moe_class is not None and isinstance(module, deepspeed_moe_class):
        return True
    children = dict(module.named_children())
    return "experts" in children and ("gate" in children or "router" in children)
