"""Each family's route() against the transformers router module, over the config variants that change
its semantics, in fp32 and bf16; and properties showing the tiny configs exercise those semantics."""

from __future__ import annotations

import pytest
import torch

from ds_grace.models import ADAPTERS, LocalRoutedExperts, tiny_config

VARIANTS = [
    ("mixtral", {}),
    ("qwen2_moe", {"norm_topk_prob": False}),
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": True}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("olmoe", {"norm_topk_prob": False}),
    ("olmoe", {"norm_topk_prob": True}),
    ("deepseek_v2", {"topk_method": "group_limited_greedy"}),
    ("deepseek_v2", {"topk_method": "greedy", "routed_scaling_factor": 1.0}),
    ("deepseek_v3", {"norm_topk_prob": True}),
    ("deepseek_v3", {"norm_topk_prob": False, "n_group": 2, "topk_group": 1}),
]


def _block(family: str, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A standalone MoE block of the tiny config with random router weights and bias."""
    config = tiny_config(family, **overrides)
    generator = torch.Generator().manual_seed(5)
    block = ADAPTERS[family].block_class()(config)
    with torch.no_grad():
        for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
            scale = 0.05 if name.endswith("e_score_correction_bias") else 0.3
            tensor.copy_(scale * torch.randn(tensor.shape, generator=generator))
    return block.to(dtype).eval()


def _tokens(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(64, 32, generator=torch.Generator().manual_seed(7)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("family", "overrides"), VARIANTS, ids=[f"{f}-{o}" for f, o in VARIANTS])
def test_route_equals_router_module(family, overrides, dtype):
    block = _block(family, dtype, **overrides)
    x_TD = _tokens(dtype)
    adapter = ADAPTERS[family]
    with torch.no_grad():
        _, gate_weights_TK, gate_ids_TK = block.gate(x_TD)
        ids_TK, weights_TK = adapter.route(block, x_TD)
    assert ids_TK.dtype == torch.int64 and ids_TK.shape == (64, adapter.top_k(block))
    assert weights_TK.dtype == gate_weights_TK.dtype
    assert torch.equal(ids_TK, gate_ids_TK)
    assert torch.equal(weights_TK, gate_weights_TK)


@pytest.mark.parametrize(
    "family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
)
def test_block_output_matches_in_bf16(family):
    """route + expert modules + shared part reproduce the whole block in bf16 within bf16 rounding."""
    block = _block(family, torch.bfloat16)
    adapter = ADAPTERS[family]
    x_BSD = _tokens(torch.bfloat16).reshape(4, 16, 32)
    x_TD = x_BSD.reshape(-1, 32)
    with torch.no_grad():
        expected = block(x_BSD).reshape(-1, 32)
        ids_TK, weights_TK = adapter.route(block, x_TD)
        y_TD = LocalRoutedExperts(adapter.expert_modules(block)).forward_routed(x_TD, ids_TK, weights_TK)
        shared_TD = adapter.shared_output(block, x_TD)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
    assert y_TD.dtype == torch.bfloat16
    torch.testing.assert_close(y_TD, expected, atol=2e-2, rtol=2e-2)


def test_tiny_configs_exercise_the_semantics():
    x_TD = _tokens(torch.float32)
    with torch.no_grad():
        _, mixtral_weights = ADAPTERS["mixtral"].route(_block("mixtral"), x_TD)
        _, qwen2_weights = ADAPTERS["qwen2_moe"].route(_block("qwen2_moe"), x_TD)
        _, qwen3_weights = ADAPTERS["qwen3_moe"].route(_block("qwen3_moe"), x_TD)
        v2_block = _block("deepseek_v2")
        v2_ids, v2_weights = ADAPTERS["deepseek_v2"].route(v2_block, x_TD)
        v3_block = _block("deepseek_v3")
        v3_ids, v3_weights = ADAPTERS["deepseek_v3"].route(v3_block, x_TD)
    torch.testing.assert_close(mixtral_weights.sum(-1), torch.ones(64))
    # norm_topk_prob False: raw top-4 of 8 probabilities, which sum to less than 1.
    assert (qwen2_weights.sum(-1) < 0.999).all() and qwen2_weights.sum(-1).min() < 0.9
    torch.testing.assert_close(qwen3_weights.sum(-1), torch.ones(64))
    torch.testing.assert_close(v3_weights.sum(-1), torch.full((64,), 2.5))  # normalised, then x 2.5
    experts_per_group = 8 // 4
    for ids_TK in (v2_ids, v3_ids):
        groups_used = torch.tensor([len(set((row // experts_per_group).tolist())) for row in ids_TK])
        assert (groups_used <= 2).all()  # topk_group = 2 of n_group = 4
    # V2: softmax probability times routed_scaling_factor 1.5.
    probs_TE = torch.softmax(x_TD @ v2_block.gate.weight.t(), dim=-1)
    torch.testing.assert_close(v2_weights, 1.5 * probs_TE.gather(1, v2_ids))
    # V3: the correction bias moves the choice of some tokens.
    with torch.no_grad():
        v3_block.gate.e_score_correction_bias.zero_()
        unbiased_ids, _ = ADAPTERS["deepseek_v3"].route(v3_block, x_TD)
    assert not torch.equal(unbiased_ids.sort(-1).values, v3_ids.sort(-1).values)


def test_unknown_deepseek_v2_topk_method_is_an_error():
    block = _block("deepseek_v2")
    block.gate.topk_method = "noaux_tc"
    with pytest.raises(
        ValueError, match=r"topk_method \('noaux_tc'\) must be 'greedy' or 'group_limited_greedy'"
    ):
        ADAPTERS["deepseek_v2"].route(block, _tokens(torch.float32))
