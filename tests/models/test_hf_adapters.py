"""Converted tiny checkpoints of every transformers family against the unconverted model.

Tolerance: fp32 throughout, logits compared with atol=1e-5, rtol=1e-5 (transformers runs its experts
with grouped_mm, we run one expert at a time, so only the summation order differs); routing ids and
weights are compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from ds_grace.models import (
    ADAPTERS,
    LocalRoutedExperts,
    RoutedMoEBlock,
    convert_moe_blocks,
    load_checkpoint,
    model_family,
    set_routing_callback,
    tiny_checkpoint,
)
from ds_grace.models.adapters import HF_FAMILIES

NEW_TOKENS = 8
# MoE layers of each tiny checkpoint, as (decoder layer index) -> converted; DeepSeek layer 0 is dense.
MOE_DECODER_LAYERS = {family: [0, 1] for family in HF_FAMILIES} | {
    "deepseek_v2": [1, 2],
    "deepseek_v3": [1, 2],
}


@pytest.fixture(scope="module", params=HF_FAMILIES)
def models(request, tmp_path_factory):
    """(family, reference model, converted model, converted blocks) from one saved tiny checkpoint."""
    family = request.param
    path = tiny_checkpoint(family, tmp_path_factory.mktemp(family) / "ckpt", seed=3)
    reference = load_checkpoint(path)
    converted = load_checkpoint(path)
    blocks = convert_moe_blocks(converted)
    return family, reference, converted, blocks


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 7, 4 and 2, left-padded with token 0."""
    generator = torch.Generator().manual_seed(11)
    lengths = [7, 4, 2]
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, -length:] = torch.randint(3, 128, (length,), generator=generator)
        attention_mask[row, -length:] = 1
    return input_ids, attention_mask


def _moe_blocks(model) -> list[torch.nn.Module]:
    adapter_classes = tuple(adapter.block_class() for adapter in ADAPTERS.values())
    return [module for module in model.modules() if isinstance(module, adapter_classes)]


def test_conversion_replaces_moe_blocks_only(models):
    family, reference, converted, blocks = models
    assert model_family(reference) == family
    assert [block.layer_index for block in blocks] == [0, 1]
    assert [block.module_name for block in blocks] == [
        f"model.layers.{i}.mlp" for i in MOE_DECODER_LAYERS[family]
    ]
    for layer_index, (ref_layer, conv_layer) in enumerate(
        zip(reference.model.layers, converted.model.layers)
    ):
        if layer_index in MOE_DECODER_LAYERS[family]:
            assert isinstance(conv_layer.mlp, RoutedMoEBlock)
            assert isinstance(conv_layer.mlp.routed_experts, LocalRoutedExperts)
            assert conv_layer.mlp.routed_experts.num_experts == 8
            assert not hasattr(conv_layer.mlp.block, "experts")
        else:
            assert type(conv_layer.mlp) is type(ref_layer.mlp)
    # The original blocks, stripped of their experts, only live on inside the RoutedMoEBlocks.
    assert [id(module) for module in _moe_blocks(converted)] == [id(block.block) for block in blocks]
    assert model_family(converted) == family


def test_logits_match_unconverted(models):
    _, reference, converted, _ = models
    input_ids, attention_mask = _padded_batch()
    with torch.no_grad():
        ref_logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        conv_logits = converted(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert torch.isfinite(ref_logits[real]).all()
    torch.testing.assert_close(conv_logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_token_for_token(models):
    _, reference, converted, _ = models
    input_ids, attention_mask = _padded_batch()
    kwargs = {
        "attention_mask": attention_mask,
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": 0,
    }
    with torch.no_grad():
        ref_tokens = reference.generate(input_ids, **kwargs)
        conv_tokens = converted.generate(input_ids, **kwargs)
    assert ref_tokens.shape == (3, input_ids.shape[1] + NEW_TOKENS)
    assert torch.equal(conv_tokens, ref_tokens)


def test_routing_equals_transformers_router(models):
    """adapter.route on each original block equals its gate's own (ids, weights), bit for bit, and the
    converted model's profiler callback sees the same routing."""
    family, reference, converted, blocks = models
    adapter = ADAPTERS[family]
    gate_calls: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(block):
        def hook(_gate, args, output):
            _, weights_TK, ids_TK = output
            gate_calls.append((block, args[0].reshape(-1, args[0].shape[-1]), ids_TK, weights_TK))

        return hook

    handles = [block.gate.register_forward_hook(record(block)) for block in _moe_blocks(reference)]
    recorded: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    set_routing_callback(blocks, lambda layer, ids, weights: recorded.append((layer, ids, weights)))
    input_ids, attention_mask = _padded_batch()
    try:
        with torch.no_grad():
            reference(input_ids=input_ids, attention_mask=attention_mask)
            converted(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
        set_routing_callback(blocks, None)

    assert len(gate_calls) == 2 and [layer for layer, _, _ in recorded] == [0, 1]
    for (block, x_TD, gate_ids_TK, gate_weights_TK), (_, ids_TK, weights_TK) in zip(gate_calls, recorded):
        assert gate_ids_TK.shape == (input_ids.numel(), adapter.top_k(block))
        with torch.no_grad():
            route_ids_TK, route_weights_TK = adapter.route(block, x_TD)
        assert route_ids_TK.dtype == torch.int64
        assert torch.equal(route_ids_TK, gate_ids_TK)
        assert torch.equal(route_weights_TK, gate_weights_TK)
        assert torch.equal(ids_TK, gate_ids_TK)
        torch.testing.assert_close(weights_TK, gate_weights_TK, atol=1e-6, rtol=1e-5)


def test_output_router_logits_still_recorded(models):
    """transformers records router logits through hooks on the router module; the converted blocks
    feed those hooks, so router_logits and the auxiliary loss come out as before."""
    _, reference, converted, _ = models
    input_ids, attention_mask = _padded_batch()
    with torch.no_grad():
        ref = reference(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        conv = converted(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    assert len(conv.router_logits) == len(ref.router_logits) == 2
    for conv_logits, ref_logits in zip(conv.router_logits, ref.router_logits):
        torch.testing.assert_close(conv_logits, ref_logits, atol=1e-5, rtol=1e-5)
    if ref.aux_loss is not None:
        torch.testing.assert_close(conv.aux_loss, ref.aux_loss, atol=1e-5, rtol=1e-5)


def test_expert_modules_are_independent_copies(tmp_path):
    model = load_checkpoint(tiny_checkpoint("qwen3_moe", tmp_path / "ckpt"))
    block = model.model.layers[0].mlp
    experts = ADAPTERS["qwen3_moe"].expert_modules(block)
    assert len(experts) == 8
    fused = block.experts
    for expert_id, expert in enumerate(experts):
        assert torch.equal(expert.gate_up_proj, fused.gate_up_proj[expert_id])
        assert torch.equal(expert.down_proj, fused.down_proj[expert_id])
        assert expert.gate_up_proj.data_ptr() != fused.gate_up_proj[expert_id].data_ptr()
    with torch.no_grad():
        experts[2].down_proj.zero_()
    assert fused.down_proj[2].abs().sum() > 0


class _NoExperts(torch.nn.Module):
    def forward_routed(self, x_TD, topk_ids_TK, topk_weights_TK):
        return torch.zeros_like(x_TD)


def test_router_shared_experts_and_outputs_read_nothing_back(models):
    """Around the routed experts (GraceMoE's own count is tests/runtime/test_runtime_paths_multirank.py), a
    block's forward reads nothing back from the device: router, shared experts, packed outputs."""
    from benchmarks.counting import count_hot_path

    _, _, converted, blocks = models
    block = blocks[0]
    experts, block.routed_experts = block.routed_experts, _NoExperts()
    try:
        x = torch.randn(1, 5, converted.config.hidden_size)
        with torch.no_grad(), count_hot_path() as counts:
            block(x)
    finally:
        block.routed_experts = experts
    assert counts.num_host_reads == 0, counts.host_reads
