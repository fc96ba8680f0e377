"""What a model holds before it is served: its family and MoE layers (``describe_moe``), and the check of a
checkpoint folder before any weight is read (``check_checkpoint_folder``). Local: no communication."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass(frozen=True)
class MoEBlockInfo:
    """One MoE layer of a model before conversion, in model order."""

    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    ep_size: int = 1  # DeepSpeed MoE layers: ranks its experts are split over


@dataclass(frozen=True)
class ModelMoE:
    family: str
    blocks: tuple[MoEBlockInfo, ...]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_experts(self) -> int:
        counts = sorted({block.num_experts for block in self.blocks})
        if len(counts) != 1:
            from ds_grace.models import ModelAdapterError

            raise ModelAdapterError(f"MoE layers must share one expert count to be planned, found {counts}")
        return counts[0]


def describe_moe(model: nn.Module) -> ModelMoE:
    """The family and MoE layers of an unconverted model; raises ModelAdapterError for anything it cannot
    serve (unknown architecture, unsupported or already converted MoE blocks). Local: no communication."""
    from deepspeed.moe.layer import MoE

    from ds_grace.models import ModelAdapterError, model_family
    from ds_grace.models.adapters import supported_blocks_text
    from ds_grace.models.convert import find_moe_blocks

    family = model_family(model)
    blocks: list[MoEBlockInfo] = []
    if family == "deepspeed_moe":
        for name, layer in model.named_modules():
            if not isinstance(layer, MoE):
                continue
            if type(layer) is not MoE:
                raise ModelAdapterError(
                    f"MoE layer {name} ({type(layer).__qualname__}) must be deepspeed.moe.layer.MoE itself; "
                    "a subclass (such as GraceMoE) means the model was converted before"
                )
            gate = layer.deepspeed_moe.gate
            blocks.append(
                MoEBlockInfo(
                    name=name,
                    num_experts=int(layer.num_experts),
                    top_k=int(gate.k),
                    hidden_size=int(gate.wg.weight.shape[1]),
                    ep_size=int(layer.ep_size),
                )
            )
        return ModelMoE(family=family, blocks=tuple(blocks))

    hidden_size = int(model.config.hidden_size)
    for item in find_moe_blocks(model):
        blocks.append(
            MoEBlockInfo(
                name=item.qualified_name,
                num_experts=item.adapter.num_experts(item.block),
                top_k=item.adapter.top_k(item.block),
                hidden_size=hidden_size,
            )
        )
    if not blocks:
        raise ModelAdapterError(
            f"no supported MoE block found in {type(model).__name__} (model_type {family!r}); "
            f"supported: {supported_blocks_text()}"
        )
    return ModelMoE(family=family, blocks=tuple(blocks))


def check_checkpoint_folder(path: str | os.PathLike[str]) -> str:
    """The model_type of a local checkpoint folder, checked against the supported families before any
    weight is read. Raises CheckpointError or ModelAdapterError."""
    from ds_grace.models import SUPPORTED_FAMILIES, CheckpointError, ModelAdapterError
    from ds_grace.models.adapters import HF_FAMILIES

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder ({folder}) does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"checkpoint folder ({folder}) has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint config ({config_file}) is not a JSON object: {exc}") from None
    if model_type not in HF_FAMILIES:
        raise ModelAdapterError(
            f"checkpoint {folder}: model_type ({model_type!r}) is not a supported MoE family; "
            f"supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return str(model_type)
