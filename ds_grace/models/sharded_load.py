"""Sharded loading: each rank reads from a checkpoint folder only the dense tensors and its own expert slots.

Shape legend: E experts, I expert intermediate size, D hidden.

``ShardedCheckpoint.open(folder, dtype=...)`` lists the folder's safetensors (``model.safetensors``, or the
shards named by ``model.safetensors.index.json``) from their headers only, builds the model skeleton on the
meta device (accelerate's init_empty_weights around transformers' from_config) and checks, before any
weight is read and before any collective: every shard file exists, every tensor the index names is in its
file, every dense tensor the model needs is present with the shape config.json gives, and every MoE layer's
experts are in a known key layout with the shapes config.json gives. Expert key layouts:

- ``fused``: ``{block}.experts.gate_up_proj`` [E, 2I, D] and ``{block}.experts.down_proj`` [E, D, I], the
  names transformers 5.x modules use (only the rows of this rank's experts are read, with the slice API);
- ``gate_up_down``: ``{block}.experts.{j}.gate_proj/up_proj/down_proj.weight`` (Qwen-MoE, OLMoE, DeepSeek);
- ``w1_w3_w2``: ``{block}.experts.{j}.w1/w3/w2.weight`` (Mixtral: w1 gate, w3 up, w2 down).

Mixtral checkpoints name the MoE block ``block_sparse_moe`` where the transformers module is ``mlp``.
Then ``load_dense`` materialises every non-expert tensor (before the MoE blocks are converted, while the
module names are still transformers'), and ``load_experts`` fills the meta expert modules of this rank's
slots once the blocks are converted. Every tensor lands in the skeleton's dtype (the served dtype, or what
transformers keeps in fp32) on the given device. ``stats`` counts the bytes read from the files (in the
file's dtype) and the bytes this rank holds; tensors of the checkpoint the model does not use are listed
in ``unused_keys`` and never read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ds_grace.models.checkpoints import CheckpointError, open_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ExpertLayout = Literal["fused", "gate_up_down", "w1_w3_w2"]
# per-expert layouts: (gate, up, down) weight names under experts.{j}
_PER_EXPERT_NAMES: dict[str, tuple[str, str, str]] = {
    "gate_up_down": ("gate_proj", "up_proj", "down_proj"),
    "w1_w3_w2": ("w1", "w3", "w2"),
}
# (module name fragment, checkpoint name fragment) a family's published checkpoints use instead
_CHECKPOINT_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {"mixtral": ((".mlp.", ".block_sparse_moe."),)}
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
# a reading handle is dropped after this many bytes: its file mapping (and the resident pages read
# through it) goes once no tensor read through it is left, e.g. after a dtype or device conversion
_REOPEN_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, from its file's header."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _DTYPE_BYTES[self.dtype]


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def list_tensors(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder by key, read from the safetensors headers only.

    Raises CheckpointError for a folder without safetensors, a truncated or damaged file, a shard file the
    index names but the folder lacks, and a tensor the index maps to a file that does not hold it."""
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint index ({index_path}) has no weight_map object: {exc}"
            ) from None
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"checkpoint folder ({folder}) has neither {SINGLE_FILE} nor {INDEX_FILE}")
    tensors: dict[str, TensorInfo] = {}
    in_file: dict[str, set[str]] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            keys = sorted(k for k, v in weight_map.items() if v == name) if weight_map else []
            raise CheckpointError(
                f"checkpoint shard file ({path}) is missing: {INDEX_FILE} maps {len(keys)} tensors to it "
                f"(first: {keys[0] if keys else '-'})"
            )
        with open_safetensors(path) as handle:
            in_file[name] = set(handle.keys())
            for key in handle.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    continue
                view = handle.get_slice(key)
                tensors[key] = TensorInfo(key, path, tuple(view.get_shape()), str(view.get_dtype()))
    if weight_map is not None:
        for key, name in sorted(weight_map.items()):
            if key not in in_file[name]:
                raise CheckpointError(
                    f"{index_path} maps tensor {key} to {folder / name}, which holds no tensor of that name"
                )
    return tensors


class TensorReader:
    """Reads whole tensors or expert rows from safetensors files and counts the bytes it read.

    safetensors maps the files: a whole tensor read in its file's dtype onto the CPU stays a view of the
    file's (private, copy-on-write) mapping, as transformers' own loading leaves it, so only the pages of
    the tensors read become resident. A row of a fused [E, ...] tensor is copied out, so that a slot
    owns exactly its row, not a view over every expert's.
    """

    def __init__(self, *, reopen_bytes: int = _REOPEN_BYTES) -> None:
        self.bytes_read = 0
        self.reads: list[tuple[str, int | None]] = []  # (key, row or None for the whole tensor)
        self._reopen_bytes = reopen_bytes
        self._handles: dict[Path, Any] = {}
        self._since_open: dict[Path, int] = {}

    def _handle(self, path: Path) -> Any:

        if path not in self._handles:
            self._handles[path] = open_safetensors(path)
            self._since_open[path] = 0
        return self._handles[path]

    def _count(self, path: Path, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes_read += nbytes
        self._since_open[path] += nbytes
        if self._since_open[path] >= self._reopen_bytes:
            del self._handles[path]  # the next read opens the file again

    def read(
        self, info: TensorInfo, *, row: int | None = None, dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        """The tensor (or its row `row` along dim 0) in `dtype` on `device`."""
        handle = self._handle(info.file)
        if row is None:
            raw = handle.get_tensor(info.key)
        else:
            raw = handle.get_slice(info.key)[row : row + 1][0]
        self._count(info.file, raw)
        self.reads.append((info.key, row))
        return raw.to(device=device, dtype=dtype, copy=row is not None)

    def close(self) -> None:
        self._handles.clear()


@dataclass(frozen=True)
class ExpertTensors:
    """Where one MoE layer's experts are in the checkpoint."""

    layer_index: int
    module_name: str  # the transformers block, e.g. model.layers.1.mlp
    prefix: str  # the checkpoint's name for it, e.g. model.layers.1.block_sparse_moe
    layout: ExpertLayout
    num_experts: int  # in the checkpoint
    gate_up_shape: tuple[int, int]  # [2I, D] of one expert (config.json)
    down_shape: tuple[int, int]  # [D, I]

    def keys(self, expert: int) -> tuple[str, ...]:
        """The checkpoint keys expert `expert` is read from (fused: the [E, ...] tensors)."""
        if self.layout == "fused":
            return (f"{self.prefix}.experts.gate_up_proj", f"{self.prefix}.experts.down_proj")
        return tuple(f"{self.prefix}.experts.{expert}.{n}.weight" for n in _PER_EXPERT_NAMES[self.layout])


@dataclass
class LoadStats:
    """Bytes of one rank's load: what it read from the files, what it holds, and the checkpoint's totals."""

    bytes_read: int = 0
    dense_bytes: int = 0  # dense tensors held (served dtype)
    expert_bytes: int = 0  # expert slots held (served dtype)
    checkpoint_bytes: int = 0  # every tensor the model uses, in the files' dtypes
    expert_slots: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> expert ids held

    @property
    def own_share_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes_read": self.bytes_read,
            "dense_bytes": self.dense_bytes,
            "expert_bytes": self.expert_bytes,
            "own_share_bytes": self.own_share_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "expert_slots": {str(k): list(v) for k, v in self.expert_slots.items()},
        }


def held_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and persistent buffers a module holds (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.is_meta:
            raise CheckpointError(f"tensor {name} was never loaded (still on the meta device)")
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` where module's parameter or buffer `name` is, keeping a parameter's attributes."""
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attribute in owner._parameters:
        old = owner._parameters[attribute]
        new = nn.Parameter(value, requires_grad=False)
        new.__dict__.update(old.__dict__)  # DeepSpeed's expert tags (allreduce, group_name)
        owner._parameters[attribute] = new
    elif attribute in owner._buffers:
        owner._buffers[attribute] = value
    else:
        raise CheckpointError(f"model has no parameter or buffer {name} to load")


class ShardedCheckpoint:
    """A checkpoint folder, its meta-device skeleton and this rank's reads (see the module docstring)."""

    def __init__(self, folder: Path, *, config: Any, model: nn.Module, tensors: dict[str, TensorInfo]):
        from ds_grace.models.convert import find_moe_blocks, model_family

        self.folder = folder
        self.config = config
        self.model = model
        self.family = model_family(model)
        self.tensors = tensors
        self.reader = TensorReader()
        self.stats = LoadStats()
        self._renames = _CHECKPOINT_RENAMES.get(self.family, ())
        self._blocks = find_moe_blocks(model)
        self._dense = self._match_dense()
        self.experts = tuple(
            self._match_experts(i, b.qualified_name, b.block) for i, b in enumerate(self._blocks)
        )
        used = {info.key for info in self._dense.values()}
        for layer in self.experts:
            for expert in range(layer.num_experts):
                used.update(layer.keys(expert))
        self.unused_keys = tuple(sorted(set(tensors) - used))
        self.stats.checkpoint_bytes = sum(tensors[key].nbytes for key in used)

    @classmethod
    def open(cls, folder: str | Path, *, dtype: torch.dtype) -> ShardedCheckpoint:
        """The folder's tensor listing and meta skeleton, checked (nothing is read but headers)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        folder = Path(folder)
        tensors = list_tensors(folder)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls(folder, config=config, model=model.eval(), tensors=tensors)

    # ---- matching the model to the files ----

    def _checkpoint_key(self, name: str) -> str | None:
        if name in self.tensors:
            return name
        for module_part, file_part in self._renames:
            renamed = name.replace(module_part, file_part)
            if renamed in self.tensors:
                return renamed
        return None

    def _config_file(self) -> Path:
        return self.folder / "config.json"

    def _match_dense(self) -> dict[str, TensorInfo]:
        expert_prefixes = tuple(f"{b.qualified_name}.experts." for b in self._blocks)
        tied = self._tied_output_name()
        dense: dict[str, TensorInfo] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if name.startswith(expert_prefixes):
                continue
            key = self._checkpoint_key(name)
            if key is None:
                if name == tied:
                    continue
                raise CheckpointError(
                    f"checkpoint {self.folder} has no tensor {name} (shape {list(tensor.shape)}), which the "
                    f"model of {self._config_file()} needs"
                )
            info = self.tensors[key]
            if info.shape != tuple(tensor.shape):
                raise CheckpointError(
                    f"checkpoint tensor {key} in {info.file} has shape {list(info.shape)} but "
                    f"{self._config_file()} gives {name} the shape {list(tensor.shape)}"
                )
            dense[name] = info
        return dense

    def _tied_output_name(self) -> str | None:
        if not getattr(self.config, "tie_word_embeddings", False):
            return None
        output = self.model.get_output_embeddings()
        for name, module in self.model.named_modules():
            if module is output:
                return f"{name}.weight"
        return None

    def _match_experts(self, layer_index: int, module_name: str, block: nn.Module) -> ExpertTensors:
        fused_E2ID = block.experts.gate_up_proj
        down_EDI = block.experts.down_proj
        gate_up_shape = (int(fused_E2ID.shape[1]), int(fused_E2ID.shape[2]))
        down_shape = (int(down_EDI.shape[1]), int(down_EDI.shape[2]))
        candidates = [module_name] + [
            f"{module_name}.".replace(m, f, 1)[:-1] for m, f in self._renames if m in f"{module_name}."
        ]
        for prefix in candidates:
            found = [key for key in self.tensors if key.startswith(f"{prefix}.experts.")]
            if found:
                break
        else:
            raise CheckpointError(
                f"checkpoint {self.folder}: unknown expert key layout for MoE layer {layer_index} "
                f"({module_name}): no tensor named {' or '.join(f'{p}.experts.*' for p in candidates)}; "
                "expected experts.gate_up_proj/down_proj (fused), experts.{j}.gate_proj/up_proj/down_proj.weight "
                "or experts.{j}.w1/w2/w3.weight"
            )
        start = len(f"{prefix}.experts.")
        suffixes = {key[start:] for key in found}
        if suffixes == {"gate_up_proj", "down_proj"}:
            gate_up = self.tensors[f"{prefix}.experts.gate_up_proj"]
            down = self.tensors[f"{prefix}.experts.down_proj"]
            for info, want in ((gate_up, gate_up_shape), (down, down_shape)):
                if len(info.shape) != 3 or info.shape[1:] != want:
                    raise CheckpointError(
                        f"checkpoint tensor {info.key} in {info.file} has shape {list(info.shape)} but "
                        f"{self._config_file()} gives [num_experts, {want[0]}, {want[1]}]"
                    )
            if gate_up.shape[0] != down.shape[0]:
                raise CheckpointError(
                    f"checkpoint tensors {gate_up.key} ({list(gate_up.shape)}) and {down.key} "
                    f"({list(down.shape)}) in {gate_up.file} hold different expert counts"
                )
            return ExpertTensors(
                layer_index, module_name, prefix, "fused", int(gate_up.shape[0]), gate_up_shape, down_shape
            )
        pattern = re.compile(r"(\d+)\.(\w+)\.weight")
        by_expert: dict[int, set[str]] = {}
        for suffix in sorted(suffixes):
            match = pattern.fullmatch(suffix)
            if match is None:
                raise CheckpointError(
                    f"checkpoint {self.folder}: unknown expert key layout: tensor {prefix}.experts.{suffix} "
                    f"in {self.tensors[f'{prefix}.experts.{suffix}'].file} is neither fused "
                    "(experts.gate_up_proj/down_proj) nor per-expert (experts.{j}.NAME.weight)"
                )
            by_expert.setdefault(int(match.group(1)), set()).add(match.group(2))
        names = by_expert[min(by_expert)]
        layouts = [lay for lay, triple in _PER_EXPERT_NAMES.items() if set(triple) == names]
        if not layouts:
            raise CheckpointError(
                f"checkpoint {self.folder}: unknown expert key layout for {prefix}.experts.{min(by_expert)}: "
                f"weights {sorted(names)}; expected {{gate_proj, up_proj, down_proj}} or {{w1, w2, w3}}"
            )
        layout: ExpertLayout = layouts[0]  # type: ignore[assignment]
        num_experts = max(by_expert) + 1
        for expert in range(num_experts):
            if by_expert.get(expert) != names:
                raise CheckpointError(
                    f"checkpoint {self.folder}: expert {expert} of {prefix}.experts has weights "
                    f"{sorted(by_expert.get(expert, ()))}, expected {sorted(names)} like expert {min(by_expert)}"
                )
        layer = ExpertTensors(
            layer_index, module_name, prefix, layout, num_experts, gate_up_shape, down_shape
        )
        half = (gate_up_shape[0] // 2, gate_up_shape[1])
        for expert in range(num_experts):
            for key, want in zip(layer.keys(expert), (half, half, down_shape)):
                info = self.tensors[key]
                if info.shape != want:
                    raise CheckpointError(
                        f"checkpoint tensor {key} in {info.file} has shape {list(info.shape)} but "
                        f"{self._config_file()} gives {list(want)}"
                    )
        return layer

    # ---- checks against what is served ----

    def check_num_experts(self, num_experts: int, *, source: str) -> None:
        """Every MoE layer of the checkpoint holds `num_experts` experts (the plan's or the model's)."""
        for layer in self.experts:
            if layer.num_experts != num_experts:
                first = layer.keys(0)[0]
                raise CheckpointError(
                    f"checkpoint {self.folder}: MoE layer {layer.layer_index} ({layer.prefix}.experts, "
                    f"{layer.layout} layout, e.g. {first} in {self.tensors[first].file}) holds "
                    f"{layer.num_experts} experts but {source} has {num_experts}"
                )

    # ---- reading ----

    def load_dense(self, *, device: torch.device | str) -> None:
        """Materialise every dense tensor of the (unconverted) skeleton from the files."""
        state = self.model.state_dict(keep_vars=True)
        for name, info in self._dense.items():
            value = self.reader.read(info, dtype=state[name].dtype, device=device)
            _replace_tensor(self.model, name, value)
            self.stats.dense_bytes += value.numel() * value.element_size()
        tied = self._tied_output_name()
        if tied is not None and tied not in self._dense:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    def load_experts(
        self,
        layer_index: int,
        expert_ids: Sequence[int],
        modules: Sequence[nn.Module],
        *,
        device: torch.device | str,
    ) -> None:
        """Fill `modules` (meta GatedExpertMLPs, one per slot) with experts `expert_ids` of MoE layer
        `layer_index`, reading only those experts' tensors (or rows)."""
        if len(expert_ids) != len(modules):
            raise ValueError(f"expert_ids ({len(expert_ids)}) and modules ({len(modules)}) differ in length")
        for expert, module in zip(expert_ids, modules):
            self.stats.expert_bytes += self._fill_expert(layer_index, expert, module, device=device)
        held = self.stats.expert_slots.get(layer_index, ())
        self.stats.expert_slots[layer_index] = held + tuple(int(e) for e in expert_ids)

    def _fill_expert(self, layer_index: int, expert: int, module: nn.Module, *, device: Any) -> int:
        """Read expert `expert` of MoE layer `layer_index` into `module`; the bytes it now holds."""
        layer = self.experts[layer_index]
        if not 0 <= expert < layer.num_experts:
            raise CheckpointError(
                f"expert {expert} of MoE layer {layer_index} is not in the checkpoint "
                f"({layer.prefix}.experts holds {layer.num_experts})"
            )
        dtype = module.gate_up_proj.dtype
        if layer.layout == "fused":
            gate_up_key, down_key = layer.keys(expert)
            gate_up = self.reader.read(self.tensors[gate_up_key], row=expert, dtype=dtype, device=device)
            down = self.reader.read(self.tensors[down_key], row=expert, dtype=dtype, device=device)
        else:
            gate_key, up_key, down_key = layer.keys(expert)
            gate = self.reader.read(self.tensors[gate_key], dtype=dtype, device=device)
            up = self.reader.read(self.tensors[up_key], dtype=dtype, device=device)
            gate_up = torch.cat([gate, up], dim=0)  # transformers' order: gate rows, then up rows
            del gate, up
            down = self.reader.read(self.tensors[down_key], dtype=dtype, device=device)
        _replace_tensor(module, "gate_up_proj", gate_up)
        _replace_tensor(module, "down_proj", down)
        return sum(t.numel() * t.element_size() for t in (gate_up, down))

    def read_expert(self, layer_index: int, expert: int, *, like: nn.Module) -> nn.Module:
        """A new expert module of expert `expert` of MoE layer `layer_index`, read from the files, with
        the dtype, device and activation of `like` (a live GatedExpertMLP): a replica moving in."""
        from ds_grace.models.experts import GatedExpertMLP

        layer = self.experts[layer_index]
        dtype = like.gate_up_proj.dtype
        module = GatedExpertMLP(
            gate_up_proj=torch.empty(layer.gate_up_shape, dtype=dtype, device="meta"),
            down_proj=torch.empty(layer.down_shape, dtype=dtype, device="meta"),
            act_fn=like.act_fn,
        )
        self._fill_expert(layer_index, expert, module, device=like.gate_up_proj.device)
        return module

    @property
    def bytes_read(self) -> int:
        """Bytes read from the files so far (the load and any replica read afterwards)."""
        return self.reader.bytes_read

    def finish(self, served: nn.Module) -> LoadStats:
        """Close the files; check nothing of `served` is left on the meta device; the rank's stats."""
        self.reader.close()
        self.stats.bytes_read = self.reader.bytes_read
        held_bytes(served)  # raises for a tensor never loaded
        return self.stats

    def expert_nbytes(self, layer_index: int, *, dtype: torch.dtype) -> int:
        """Bytes one expert of MoE layer `layer_index` takes in `dtype`."""
        layer = self.experts[layer_index]
        numel = _numel(layer.gate_up_shape) + _numel(layer.down_shape)
        return numel * torch.empty((), dtype=dtype).element_size()


def tie_gate_to_router(grace_moe: nn.Module, router: nn.Module) -> None:
    """Let a GraceMoE's gate share the model's router weight [E, D] instead of holding its own copy
    (the converted block routes with the model's router; the GraceMoE gate is kept for DeepSpeed)."""
    gate_linear = grace_moe.deepspeed_moe.gate.wg
    if tuple(gate_linear.weight.shape) != tuple(router.weight.shape):
        raise ValueError(
            f"router weight shape {list(router.weight.shape)} differs from the GraceMoE gate's "
            f"{list(gate_linear.weight.shape)}"
        )
    gate_linear.weight = router.weight


def expert_slot_modules(routed_experts: nn.Module) -> list[nn.Module]:
    """This rank's expert modules of a converted layer: GraceMoE or DeepSpeedRoutedExperts."""
    holder = getattr(routed_experts, "moe", routed_experts)  # DeepSpeedRoutedExperts wraps a MoE
    return list(holder.deepspeed_moe.experts.deepspeed_experts)


def contiguous_experts(num_experts: int, *, ep_rank: int, ep_size: int) -> Iterable[int]:
    """DeepSpeed's placement: ep rank q holds experts q*E/ep_size .. (q+1)*E/ep_size - 1."""
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def load_converted(
    checkpoint: ShardedCheckpoint,
    *,
    make_routed_experts: Callable[[int, list[nn.Module]], nn.Module],
    slots_of_layer: Callable[[int], Iterable[int]],
    device: torch.device | str,
    progress: bool = False,
) -> tuple[list[nn.Module], LoadStats]:
    """Materialise the dense tensors, convert the MoE blocks (their experts still on the meta device) with
    `make_routed_experts`, then read each layer's slots ``slots_of_layer(layer_index)`` (expert ids, in
    slot order) into the converted layers. Returns (RoutedMoEBlocks, this rank's LoadStats). With
    `progress`, a tqdm bar on stderr counts the MoE layers read (shown on a terminal only)."""
    from tqdm import tqdm

    from ds_grace.models.convert import convert_moe_blocks
    from ds_grace.moe.layer import GraceMoE

    checkpoint.load_dense(device=device)
    blocks = convert_moe_blocks(checkpoint.model, make_routed_experts=make_routed_experts)
    layers = tqdm(blocks, desc="reading checkpoint", unit="MoE layer", disable=None if progress else True)
    for index, block in enumerate(layers):
        routed = block.routed_experts
        if isinstance(routed, GraceMoE):
            tie_gate_to_router(routed, block.block.gate)
        checkpoint.load_experts(
            index, list(slots_of_layer(index)), expert_slot_modules(routed), device=device
        )
    return blocks, checkpoint.finish(checkpoint.model)
