"""Tiny random checkpoints of every supported transformers family, and local checkpoint loading.

The tiny configs are small (hidden 32, 8 experts, vocab 128) but keep the routing semantics that
matter: Mixtral top-2 renormalised; Qwen2-MoE top-4 unnormalised with its gated shared expert;
Qwen3-MoE top-4 renormalised; OLMoE top-4 unnormalised; DeepSeek-V2 group-limited greedy top-2 with
shared experts and routed_scaling_factor 1.5; DeepSeek-V3 sigmoid scores with a nonzero
e_score_correction_bias, 4 groups of which 2 are kept, renormalised, routed_scaling_factor 2.5.
MoE families have 2 MoE layers; the DeepSeek ones have a third, dense, first layer
(first_k_dense_replace=1). Nothing is fetched from the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_grace.models.adapters import HF_FAMILIES, ModelAdapterError

VOCAB_SIZE = 128
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}

_DEEPSEEK_COMMON: dict[str, Any] = {
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "n_group": 4,
    "topk_group": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "head_dim": 8,
}

_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 24, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 48,
        "num_experts": 8,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "num_experts": 8,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "head_dim": 8,
    },
    "olmoe": {"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 4, "norm_topk_prob": False},
    "deepseek_v2": {
        **_DEEPSEEK_COMMON,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 1.5,
    },
    "deepseek_v3": {
        **_DEEPSEEK_COMMON,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
    },
}


class CheckpointError(ModelAdapterError):
    """A checkpoint folder is missing or unusable."""


def open_safetensors(path: str | Path) -> Any:
    """safetensors' handle on `path` (use it as a context manager, or keep it open); a file that is not a
    whole safetensors file (truncated, empty, another format) is a CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        size = Path(path).stat().st_size
        raise CheckpointError(
            f"checkpoint file ({path}, {size} bytes) is not a whole safetensors file ({exc}): it is truncated "
            "or damaged; copy it again"
        ) from None


def check_safetensors_files(folder: str | Path) -> None:
    """Open every *.safetensors file of `folder` (headers only): a damaged one is named before loading."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open_safetensors(path):
            pass


def _check_family(family: str) -> None:
    if family not in HF_FAMILIES:
        raise ModelAdapterError(
            f"family ({family!r}) has no transformers checkpoint; must be one of {', '.join(HF_FAMILIES)}"
        )


def tiny_config(family: str, **overrides: Any) -> Any:
    """The tiny transformers config of ``family`` (see the module docstring), with ``overrides``."""
    from transformers import AutoConfig

    _check_family(family)
    values = {**_COMMON, **_TINY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(family, **values)


def _randomise_correction_bias(model: nn.Module, generator: torch.Generator) -> None:
    """DeepSeek-V3 initialises e_score_correction_bias to zeros; a zero bias would leave its role in
    the expert choice untested."""
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            with torch.no_grad():
                buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))


def tiny_checkpoint(family: str, path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny random ``family`` model (fp32), save it to ``path``, return the path.

    transformers 5.x always saves safetensors (``model.safetensors``), so there is no
    safe_serialization switch to pass."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_correction_bias(model, torch.Generator().manual_seed(seed + 1))
    path = Path(path)
    model.save_pretrained(path)
    return path


def load_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a causal-LM checkpoint from a local folder (no hub access), in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder ({path}) does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint folder ({path}) has no config.json")
    check_safetensors_files(path)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or "auto")
    return model.eval()
