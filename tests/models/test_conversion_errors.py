"""Errors: unsupported architectures, missing checkpoints, double conversion, bad factories."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_grace.models import (
    SUPPORTED_FAMILIES,
    CheckpointError,
    ModelAdapterError,
    RoutedMoEBlock,
    convert_moe_blocks,
    load_checkpoint,
    model_family,
    tiny_checkpoint,
    tiny_config,
)

SUPPORTED_TEXT = (
    "supported: mixtral (MixtralSparseMoeBlock), qwen2_moe (Qwen2MoeSparseMoeBlock), qwen3_moe "
    "(Qwen3MoeSparseMoeBlock), olmoe (OlmoeSparseMoeBlock), deepseek_v2 (DeepseekV2Moe), deepseek_v3 "
    "(DeepseekV3MoE), deepspeed_moe (deepspeed.moe.layer.MoE)"
)


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def _tiny_granitemoe() -> nn.Module:
    from transformers import AutoModelForCausalLM, GraniteMoeConfig

    config = GraniteMoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return AutoModelForCausalLM.from_config(config)


def test_model_without_moe_block_is_an_error():
    with pytest.raises(ModelAdapterError) as error:
        convert_moe_blocks(_tiny_llama())
    assert str(error.value) == f"no supported MoE block found in LlamaForCausalLM; {SUPPORTED_TEXT}"
    with pytest.raises(ModelAdapterError, match=r"no supported MoE block found in Sequential"):
        convert_moe_blocks(nn.Sequential(nn.Linear(4, 4)))


def test_unsupported_moe_class_is_an_error_and_leaves_model_unchanged():
    model = _tiny_granitemoe()
    with pytest.raises(ModelAdapterError) as error:
        convert_moe_blocks(model)
    message = str(error.value)
    assert message.startswith(
        "module model.layers.0.block_sparse_moe is an MoE block of an unsupported class "
        "(transformers.models.granitemoe.modeling_granitemoe.GraniteMoeMoE)"
    )
    assert message.endswith(SUPPORTED_TEXT)

    # A supported block next to an unsupported one: nothing is converted.
    mixtral = _tiny_mixtral_block()
    mixed = nn.ModuleDict({"mixtral_mlp": mixtral, "granite": model})
    with pytest.raises(ModelAdapterError, match=r"unsupported class"):
        convert_moe_blocks(mixed)
    assert mixed["mixtral_mlp"] is mixtral and hasattr(mixtral, "experts")


def _tiny_mixtral_block() -> nn.Module:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(tiny_config("mixtral"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return block


def test_model_family_errors():
    assert model_family(tiny_config("olmoe")) == "olmoe"
    with pytest.raises(ModelAdapterError) as error:
        model_family(_tiny_llama())
    assert str(error.value) == (
        f"model_type ('llama') is not a supported MoE family; supported: {', '.join(SUPPORTED_FAMILIES)}"
    )
    with pytest.raises(ModelAdapterError, match=r"cannot tell the MoE family of Linear"):
        model_family(nn.Linear(2, 2))


def test_converting_twice_is_an_error():
    holder = nn.Sequential(_tiny_mixtral_block())
    (block,) = convert_moe_blocks(holder)
    with pytest.raises(ModelAdapterError, match=r"module 0 is already a RoutedMoEBlock"):
        convert_moe_blocks(holder)
    assert holder[0] is block


def test_make_routed_experts_factory_is_called_per_layer():
    calls = []

    class Recording(nn.Module):
        def __init__(self, layer_index, experts):
            super().__init__()
            calls.append((layer_index, len(experts)))
            self.experts = nn.ModuleList(experts)

        def forward_routed(self, x_TD, topk_ids_TK, topk_weights_TK):
            return torch.zeros_like(x_TD)

    holder = nn.Sequential(_tiny_mixtral_block(), nn.Linear(32, 32), _tiny_mixtral_block())
    blocks = convert_moe_blocks(holder, make_routed_experts=Recording)
    assert calls == [(0, 8), (1, 8)]
    assert all(isinstance(block, RoutedMoEBlock) for block in (holder[0], holder[2]))
    assert [block.module_name for block in blocks] == ["0", "2"]
    assert torch.equal(holder[0](torch.ones(1, 3, 32)), torch.zeros(1, 3, 32))

    with pytest.raises(TypeError, match=r"routed_experts \(Linear\) must have a forward_routed"):
        convert_moe_blocks(
            nn.Sequential(_tiny_mixtral_block()), make_routed_experts=lambda i, e: nn.Linear(1, 1)
        )


def test_checkpoint_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(missing)
    assert str(error.value) == f"checkpoint folder ({missing}) does not exist"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(empty)
    assert str(error.value) == f"checkpoint folder ({empty}) has no config.json"
    with pytest.raises(ModelAdapterError, match=r"family \('deepspeed_moe'\) has no transformers checkpoint"):
        tiny_checkpoint("deepspeed_moe", tmp_path / "ds")


def test_tiny_checkpoint_files_and_overrides(tmp_path):
    path = tiny_checkpoint("deepseek_v3", tmp_path / "v3", seed=1, num_hidden_layers=2)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    model = load_checkpoint(path)
    assert model.config.num_hidden_layers == 2 and model.config.n_group == 4
    assert not model.training
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().min() > 0  # saved and reloaded nonzero
    again = load_checkpoint(tiny_checkpoint("deepseek_v3", tmp_path / "v3b", seed=1, num_hidden_layers=2))
    for (name, tensor), (_, other) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(tensor, other), name
