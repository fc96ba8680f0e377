"""DeepSpeed's own MoE checkpoints, read with only this rank's experts.

``engine.save_checkpoint(DIR, tag)`` of a DeepSpeed engine whose model holds deepspeed.moe.layer.MoE
layers writes ``DIR/latest`` (the tag), ``DIR/TAG/mp_rank_00_model_states.pt`` (its ``module`` entry: every
non-expert tensor; ``num_experts``: experts per MoE layer) and one file per expert,
``DIR/TAG/layer_{L}_expert_{e}_mp_rank_00_model_states.pt`` (keys
``{layer}.deepspeed_moe.experts.deepspeed_experts.{e}.{name}``, e the global expert id, L the MoE layer in
model order). :class:`DeepSpeedMoECheckpoint` opens the model states with torch's mmap (only the tensors
copied out are read), checks the model against them before any collective (expert counts, every expert
file present, the non-expert tensors' names and shapes, and the first expert file of each layer against
the model's expert), and reads an expert file only for an expert this rank holds: its slots under a GRACE
plan, or its contiguous experts in vanilla DeepSpeed-MoE. ``ds_grace.init_inference(model, config,
checkpoint=DIR)`` (DeepSpeed's own ``checkpoint`` key) serves such a model this way.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds_grace.models.checkpoints import CheckpointError
from ds_grace.models.sharded_load import LoadStats, _replace_tensor

MODEL_STATES = "mp_rank_00_model_states.pt"
_EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."


def is_deepspeed_moe_checkpoint(path: Any) -> bool:
    """Whether `path` is a folder DeepSpeed's save_checkpoint wrote (with ``latest``, or a tag folder)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    folder = Path(path)
    return (folder / "latest").is_file() or (folder / MODEL_STATES).is_file()


def _load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"DeepSpeed checkpoint file ({path}) cannot be read: {exc}") from None


class DeepSpeedMoECheckpoint:
    """A DeepSpeed MoE checkpoint opened against a model (see the module docstring)."""

    def __init__(self, folder: Path, *, model: nn.Module, layer_names: Sequence[str]) -> None:
        self.folder = folder
        self.model = model
        self.layer_names = tuple(layer_names)
        self.stats = LoadStats()
        self.expert_reads: list[tuple[int, int]] = []  # (MoE layer, expert) of every expert file read
        self._bytes_read = 0
        states = _load(folder / MODEL_STATES)
        if "module" not in states:
            raise CheckpointError(
                f"DeepSpeed checkpoint file ({folder / MODEL_STATES}) has no 'module' entry"
            )
        self._module_state: dict[str, torch.Tensor] = states["module"]
        counts = states.get("num_experts")
        if not isinstance(counts, list) or len(counts) != len(self.layer_names):
            raise CheckpointError(
                f"DeepSpeed checkpoint {folder / MODEL_STATES} records num_experts {counts!r} but the model has "
                f"{len(self.layer_names)} MoE layers"
            )
        self.num_experts = tuple(int(count) for count in counts)
        for layer, name in enumerate(self.layer_names):
            self.check_num_experts(
                int(model.get_submodule(name).num_experts), source="the model", layer=layer
            )
        self._check_dense()
        for layer in range(len(self.layer_names)):
            for expert in range(self.num_experts[layer]):
                if not self.expert_file(layer, expert).is_file():
                    raise CheckpointError(
                        f"DeepSpeed checkpoint expert file ({self.expert_file(layer, expert)}) is missing: "
                        f"{folder / MODEL_STATES} records {self.num_experts[layer]} experts in MoE layer {layer}"
                    )
            self._check_expert_shapes(layer)
        self.stats.checkpoint_bytes = sum(t.numel() * t.element_size() for t in self._module_state.values())

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, model: nn.Module) -> DeepSpeedMoECheckpoint:
        from deepspeed.moe.layer import MoE

        folder = Path(path)
        if (folder / "latest").is_file():
            folder = folder / (folder / "latest").read_text().strip()
        if not (folder / MODEL_STATES).is_file():
            raise CheckpointError(f"DeepSpeed checkpoint folder ({folder}) has no {MODEL_STATES}")
        names = []
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                if module.use_residual:
                    raise CheckpointError(f"MoE layer {name}: use_residual (True) is not supported")
                names.append(name)
        return cls(folder, model=model, layer_names=names)

    # ---- checks ----

    def _expert_template(self, layer: int) -> nn.Module:
        moe = self.model.get_submodule(self.layer_names[layer])
        return moe.deepspeed_moe.experts.deepspeed_experts[0]

    def _check_dense(self) -> None:
        model_state = {
            name: tensor
            for name, tensor in self.model.state_dict(keep_vars=True).items()
            if _EXPERTS not in f".{name}"
        }
        missing = sorted(set(model_state) - set(self._module_state))
        extra = sorted(set(self._module_state) - set(model_state))
        if missing or extra:
            raise CheckpointError(
                f"DeepSpeed checkpoint {self.folder / MODEL_STATES} does not match the model: tensors missing "
                f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unknown {extra[:3]}{' ...' if len(extra) > 3 else ''}"
            )
        for name, tensor in model_state.items():
            saved = self._module_state[name]
            if tuple(saved.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"DeepSpeed checkpoint tensor {name} in {self.folder / MODEL_STATES} has shape "
                    f"{list(saved.shape)} but the model's is {list(tensor.shape)}"
                )

    def _check_expert_shapes(self, layer: int) -> None:
        path = self.expert_file(layer, 0)
        saved = self._expert_state(layer, 0, _load(path))
        want = {name: tuple(t.shape) for name, t in self._expert_template(layer).state_dict().items()}
        got = {name: tuple(t.shape) for name, t in saved.items()}
        if got != want:
            raise CheckpointError(
                f"DeepSpeed checkpoint expert file {path} holds {got} but the model's expert has {want}"
            )

    def check_num_experts(self, num_experts: int, *, source: str, layer: int | None = None) -> None:
        """Every MoE layer (or just `layer`) of the checkpoint holds `num_experts` experts."""
        for index, count in enumerate(self.num_experts):
            if layer is not None and index != layer:
                continue
            if count != num_experts:
                raise CheckpointError(
                    f"DeepSpeed checkpoint {self.folder / MODEL_STATES}: MoE layer {index} "
                    f"({self.layer_names[index]}) holds {count} experts but {source} has {num_experts}"
                )

    # ---- reading ----

    def expert_file(self, layer: int, expert: int) -> Path:
        return self.folder / f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"

    def _expert_state(
        self, layer: int, expert: int, state: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        prefix = f"{self.layer_names[layer]}{_EXPERTS}{expert}."
        if not state or any(not key.startswith(prefix) for key in state):
            raise CheckpointError(
                f"DeepSpeed checkpoint expert file {self.expert_file(layer, expert)} holds keys "
                f"{sorted(state)[:2]}, expected {prefix}*"
            )
        return {key[len(prefix) :]: value for key, value in state.items()}

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    def _read(self, tensor: torch.Tensor, *, like: torch.Tensor, device: Any) -> torch.Tensor:
        self._bytes_read += tensor.numel() * tensor.element_size()
        return tensor.to(device=device, dtype=like.dtype, copy=True)

    def load_dense(self, *, device: Any) -> None:
        """Every non-expert tensor of the (unconverted) model from the model states."""
        state = self.model.state_dict(keep_vars=True)
        for name, saved in self._module_state.items():
            value = self._read(saved, like=state[name], device=device)
            _replace_tensor(self.model, name, value)
            self.stats.dense_bytes += value.numel() * value.element_size()
        self._module_state = {}

    def fill_expert(self, layer: int, expert: int, module: nn.Module, *, device: Any) -> int:
        """Read expert `expert` of MoE layer `layer` into `module` (its tensors replaced); bytes held."""
        saved = self._expert_state(layer, expert, _load(self.expert_file(layer, expert)))
        self.expert_reads.append((layer, expert))
        held = 0
        current = module.state_dict(keep_vars=True)
        for name, tensor in saved.items():
            value = self._read(tensor, like=current[name], device=device)
            _replace_tensor(module, name, value)
            held += value.numel() * value.element_size()
        return held

    def read_expert(self, layer: int, expert: int, *, like: nn.Module, device: Any = None) -> nn.Module:
        """A new module shaped like `like` holding expert `expert` of MoE layer `layer` (a replica moving
        in, or a GRACE slot), on `device` (default: like's); `like`'s tensors are not copied."""
        memo: dict[int, Any] = {}
        for tensor in like.state_dict(keep_vars=True).values():
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = (
                nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty
            )
        module = copy.deepcopy(like, memo)
        if device is None:
            device = next(iter(like.state_dict().values())).device
        self.fill_expert(layer, expert, module, device=device)
        return module

    def grace_layers(self, *, plan: Any, rank: int, options: Any, device: Any) -> list[nn.Module]:
        """Every MoE layer of the model replaced by a GraceMoE holding this rank's slots of `plan`, each
        read from its expert file (the dense tensors first, from the model states)."""
        from ds_grace.moe.gate import GraceGate
        from ds_grace.moe.layer import GraceMoE

        self.load_dense(device=device)
        layers = []
        for index, name in enumerate(self.layer_names):
            moe = self.model.get_submodule(name)
            like = self._expert_template(index)
            slots = plan.layers[index].slots[rank]
            slot_modules = []
            for expert in slots:
                module = self.read_expert(index, expert, like=like, device=device)
                self.stats.expert_bytes += sum(
                    t.numel() * t.element_size() for t in module.state_dict().values()
                )
                slot_modules.append(module)
            layer = GraceMoE(
                gate=GraceGate.from_deepspeed(moe.deepspeed_moe.gate),
                slot_modules=slot_modules,
                layer_plan=plan.layers[index],
                topology=plan.topology,
                ep_index=rank,
                options=options,
            )
            parent_name, _, attribute = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, attribute, layer)
            self.stats.expert_slots[index] = tuple(int(e) for e in slots)
            layers.append(layer)
        self.stats.bytes_read = self._bytes_read
        return layers

    def load_local_experts(self, *, ep_rank: int, device: Any) -> None:
        """The dense tensors, then each MoE layer's own (contiguous) experts into its DeepSpeed layout:
        ep rank q's local expert j is global expert q * num_local_experts + j."""
        self.load_dense(device=device)
        for index, name in enumerate(self.layer_names):
            experts = list(self.model.get_submodule(name).deepspeed_moe.experts.deepspeed_experts)
            ids = [ep_rank * len(experts) + j for j in range(len(experts))]
            for expert, module in zip(ids, experts):
                self.stats.expert_bytes += self.fill_expert(index, expert, module, device=device)
            self.stats.expert_slots[index] = tuple(ids)
        self.stats.bytes_read = self._bytes_read
