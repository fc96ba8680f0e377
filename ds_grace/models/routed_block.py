"""RoutedMoEBlock: stands in for a model's MoE block and hands the routing to a routed-experts object.

Shape legend: T tokens, D hidden, K top-k.

The block keeps the original module without its experts (``self.block``: router, shared experts,
shared gate), computes the family's exact routing on the flattened tokens, and calls
``self.routed_experts.forward_routed(x_TD, topk_ids_TK, topk_weights_TK)``. Its forward has the
signature and return convention of the block it replaces: a tensor for transformers 5.x blocks,
(output, l_aux, exp_counts) for DeepSpeed's MoE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ds_grace.models.adapters import MoEAdapter
from ds_grace.models.routers import RouterOutput

# (layer_index, topk_ids_TK, topk_weights_TK) -> None; called on every forward when set.
RoutingCallback = Callable[[int, Tensor, Tensor], None]


class RoutedMoEBlock(nn.Module):
    """One MoE layer of a converted model.

    Attributes others use: ``layer_index`` (MoE layers numbered 0.. in model order), ``module_name``
    (where it sits in the model), ``family``, ``num_experts``, ``top_k``, ``routed_experts`` (the
    object computing forward_routed; replace it to distribute the experts), ``routing_callback``
    (None, or a RoutingCallback a profiler sets to record each forward's routing).
    """

    def __init__(
        self,
        *,
        block: nn.Module,
        adapter: MoEAdapter,
        layer_index: int,
        routed_experts: nn.Module,
        num_experts: int,
        top_k: int,
        module_name: str = "",
    ) -> None:
        super().__init__()
        if not callable(getattr(routed_experts, "forward_routed", None)):
            raise TypeError(
                f"routed_experts ({type(routed_experts).__name__}) must have a forward_routed(x_TD, "
                "topk_ids_TK, topk_weights_TK) method"
            )
        self.block = block
        self.routed_experts = routed_experts
        self.adapter = adapter
        self.family = adapter.family
        self.layer_index = layer_index
        self.module_name = module_name
        self.num_experts = num_experts
        self.top_k = top_k
        self.routing_callback: RoutingCallback | None = None

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """(topk_ids_TK, topk_weights_TK) of the original router for tokens x_TD."""
        return self.adapter.route(self.block, x_TD)

    def forward(self, hidden_states: Tensor, used_token: Tensor | None = None) -> Any:
        if used_token is not None:
            # DeepSpeed's MoE.forward takes a top-1 token mask; no transformers block does.
            raise ValueError(
                f"RoutedMoEBlock ({self.family}): used_token must be None; masked routing is not supported"
            )
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        routing = self.adapter.route_with_logits(self.block, x_TD)
        self._notify_router_hooks(x_TD, routing)
        if self.routing_callback is not None:
            self.routing_callback(self.layer_index, routing.topk_ids_TK, routing.topk_weights_TK)
        y_TD = self.routed_experts.forward_routed(x_TD, routing.topk_ids_TK, routing.topk_weights_TK)
        shared_TD = self.adapter.shared_output(self.block, x_TD)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        return self.adapter.pack_output(y_TD.reshape(hidden_states.shape), routing, self.num_experts)

    def _notify_router_hooks(self, x_TD: Tensor, routing: RouterOutput) -> None:
        """Run the forward hooks of the original router module, which is no longer called, with the
        output it would have returned, (logits, weights, ids): transformers records router logits
        (output_router_logits) through such hooks."""
        router = self.adapter.router_module(self.block)
        if router is None or not router._forward_hooks:
            return
        output = (routing.logits_TE, routing.topk_weights_TK, routing.topk_ids_TK)
        for hook_id, hook in list(router._forward_hooks.items()):
            if hook_id in router._forward_hooks_with_kwargs:
                hook(router, (x_TD,), {}, output)
            else:
                hook(router, (x_TD,), output)

    def extra_repr(self) -> str:
        return (
            f"family={self.family}, layer_index={self.layer_index}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}"
        )


def set_routing_callback(blocks: list[RoutedMoEBlock], callback: RoutingCallback | None) -> None:
    """Install (or with None, remove) one routing callback on every block."""
    for block in blocks:
        block.routing_callback = callback
