"""Routing profiles: record every MoE layer's top-k choice on calibration text into a RoutingTrace.

Shape legend: B sequences in a batch, L sequence length, T tokens (B*L), K top-k, D hidden.

``profile_routing(model, batches, tokens=N)`` runs the model on batches until N real (unpadded) tokens
are recorded and returns the RoutingTrace that ``ds-grace plan --trace`` reads. It observes:
- RoutedMoEBlocks (converted transformers models, including engines from ds_grace.init_inference)
  through their ``routing_callback``;
- GraceMoE layers of converted DeepSpeed MoE models through their gate's output;
- unconverted blocks of every supported family (transformers and deepspeed.moe.layer.MoE) through a
  forward pre-hook that runs the family's router (ds_grace.models adapters) on the block's input.
The model is left as it was found. Under a launcher each rank profiles its own batches in lockstep with
the others (the forward may be collective), and the traces are gathered to rank 0.

Tokenisation for ``ds-grace profile`` and launch/generate.py: a checkpoint folder holding tokenizer
files is read with transformers' AutoTokenizer. A folder without them (the tiny test checkpoints) gets
the byte-level fallback :class:`ByteTokenizer`: UTF-8 bytes mapped to ids above the model's special ids,
``id = reserved + byte % (vocab_size - reserved)``; it decodes back to text only when the vocabulary
holds all 256 bytes, otherwise generated text is shown as token ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ds_grace.comm.collectives import all_ranks_true, gather_objects_to_rank0, sum_over_ranks, world
from ds_grace.trace import RoutingTrace, TraceError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
Batch = torch.Tensor | Mapping[str, Any]


# ---- observing the routers ----


@dataclass(frozen=True)
class RoutingSource:
    """One MoE layer of a model and how its routing is observed."""

    layer_index: int
    name: str
    num_experts: int
    kind: str  # "callback" (RoutedMoEBlock), "grace_gate" (GraceMoE), "pre_hook" (unconverted block)
    module: nn.Module


def routing_sources(model: nn.Module) -> list[RoutingSource]:
    """The MoE layers of `model` (an nn.Module or a DeepSpeed InferenceEngine), numbered in model order."""
    from deepspeed.moe.layer import MoE

    from ds_grace.models import RoutedMoEBlock, adapter_for_block
    from ds_grace.moe.layer import GraceMoE

    sources: list[RoutingSource] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for attribute, child in parent.named_children():
            name = f"{prefix}.{attribute}" if prefix else attribute
            if isinstance(child, RoutedMoEBlock):
                sources.append(RoutingSource(len(sources), name, child.num_experts, "callback", child))
            elif isinstance(child, GraceMoE):
                sources.append(RoutingSource(len(sources), name, child.num_experts, "grace_gate", child))
            elif (adapter := adapter_for_block(child)) is not None:
                sources.append(
                    RoutingSource(len(sources), name, adapter.num_experts(child), "pre_hook", child)
                )
            elif isinstance(child, MoE):
                raise TraceError(
                    f"cannot observe the routing of MoE layer {name} ({type(child).__qualname__})"
                )
            else:
                visit(child, name)

    visit(model, "")
    if not sources:
        raise TraceError(f"{type(model).__name__} holds no MoE layer whose routing can be recorded")
    return sources


class _Recorder:
    """Collects (topk_ids, weights) per layer for the real tokens of the current forward."""

    def __init__(self, sources: Sequence[RoutingSource]) -> None:
        self.sources = list(sources)
        self.ids: list[list[np.ndarray]] = [[] for _ in sources]
        self.weights: list[list[np.ndarray]] = [[] for _ in sources]
        self.real_T: torch.Tensor | None = None
        self.calls = [0] * len(sources)

    def record(self, layer_index: int, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> None:
        self.calls[layer_index] += 1
        ids_TK = topk_ids_TK.detach().reshape(-1, topk_ids_TK.shape[-1])
        weights_TK = topk_weights_TK.detach().reshape(ids_TK.shape)
        if self.real_T is not None:
            if self.real_T.numel() != ids_TK.shape[0]:
                raise TraceError(
                    f"MoE layer {layer_index} routed {ids_TK.shape[0]} tokens but the batch has "
                    f"{self.real_T.numel()} positions; profile without a KV cache (use_cache=False)"
                )
            ids_TK, weights_TK = ids_TK[self.real_T], weights_TK[self.real_T]
        self.ids[layer_index].append(ids_TK.cpu().numpy().astype(np.int32))
        self.weights[layer_index].append(weights_TK.float().cpu().numpy())

    def begin(self, real_T: torch.Tensor | None) -> None:
        self.real_T = real_T
        self.calls = [0] * len(self.sources)

    def end(self) -> None:
        wrong = [(s.name, n) for s, n in zip(self.sources, self.calls) if n != 1]
        if wrong:
            raise TraceError(f"every MoE layer must route once per forward; calls per layer: {wrong}")

    def arrays(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        ids = [np.concatenate(chunks) if chunks else np.zeros((0, 1), np.int32) for chunks in self.ids]
        weights = [
            np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32) for chunks in self.weights
        ]
        return ids, weights


def _install(sources: Sequence[RoutingSource], recorder: _Recorder) -> Callable[[], None]:
    """Attach the observers; returns the function that removes them."""
    from ds_grace.models import adapter_for_block

    undo: list[Callable[[], None]] = []
    for source in sources:
        index, module = source.layer_index, source.module
        if source.kind == "callback":
            previous = module.routing_callback

            def callback(
                _layer: int, ids: torch.Tensor, weights: torch.Tensor, *, i=index, prev=previous
            ) -> None:
                recorder.record(i, ids, weights)
                if prev is not None:
                    prev(_layer, ids, weights)

            module.routing_callback = callback
            undo.append(lambda m=module, p=previous: setattr(m, "routing_callback", p))
        elif source.kind == "grace_gate":

            def gate_hook(_gate: nn.Module, _args: Any, output: Any, *, i=index) -> None:
                recorder.record(i, output.topk_ids_TK, output.topk_weights_TK)

            undo.append(module.deepspeed_moe.gate.register_forward_hook(gate_hook).remove)
        else:
            adapter = adapter_for_block(module)

            def pre_hook(block: nn.Module, args: tuple[Any, ...], *, i=index, a=adapter) -> None:
                x = args[0]
                recorder.record(i, *a.route(block, x.reshape(-1, x.shape[-1])))

            undo.append(module.register_forward_pre_hook(pre_hook).remove)

    def remove() -> None:
        for fn in reversed(undo):
            fn()

    return remove


# ---- running the batches ----


def _forward(model: Any, batch: Batch, recorder: _Recorder) -> int:
    """One forward with the recorder; returns the real tokens it recorded."""
    if isinstance(batch, torch.Tensor):
        recorder.begin(None)
        model(batch)
    elif isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        recorder.begin(None if mask is None else mask.reshape(-1).bool())
        model(**batch)
    else:
        raise TypeError(f"a batch ({type(batch).__name__}) must be a tensor or a mapping of model inputs")
    recorder.end()
    return int(recorder.ids[0][-1].shape[0])


def profile_routing(
    model: Any,
    batches: Iterable[Batch],
    *,
    tokens: int,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> RoutingTrace | None:
    """Record the top-k routing of every MoE layer until `tokens` real tokens are recorded (over all ranks).

    `batches` yields input_ids tensors or mappings of model inputs (input_ids, attention_mask, ...); for
    transformers models pass use_cache=False. Positions with attention_mask 0 are not recorded. Each
    token's rows share one token id across layers. Under torch.distributed with more than one rank every
    rank runs its own batches in lockstep (one small all-reduce per batch; all stop when one runs out or
    the total is reached) and rank 0 returns the gathered trace (rank order, cut to `tokens`) while the
    others return None.
    """
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens ({tokens!r}) must be an integer >= 1")
    from tqdm import tqdm

    world_size, rank = world()
    sources = routing_sources(model)
    num_experts = sorted({source.num_experts for source in sources})
    if len(num_experts) != 1:
        raise TraceError(f"MoE layers must share one expert count to share a trace, found {num_experts}")
    recorder = _Recorder(sources)
    remove = _install(sources, recorder)
    recorded = total = 0
    bar = tqdm(total=tokens, unit="tok", desc="profiling routing", disable=not progress or rank != 0)
    try:
        iterator = iter(batches)
        with torch.no_grad():
            while total < tokens:
                batch = next(iterator, None)
                if world_size > 1 and not all_ranks_true(batch is not None):
                    break
                if batch is None:
                    break
                recorded += _forward(model, batch, recorder)
                new_total = sum_over_ranks([recorded])[0] if world_size > 1 else recorded
                bar.update(min(new_total, tokens) - min(total, tokens))
                total = new_total
    finally:
        bar.close()
        remove()
    ids, weights = recorder.arrays()
    if world_size > 1:
        gathered = gather_objects_to_rank0((ids, weights))
        if rank != 0:
            return None
        ids = [np.concatenate([part[0][layer] for part in gathered]) for layer in range(len(sources))]
        weights = [np.concatenate([part[1][layer] for part in gathered]) for layer in range(len(sources))]
    count = min(tokens, int(ids[0].shape[0]))
    if count == 0:
        raise TraceError("no token was recorded: the batches hold no real (unmasked) token")
    token_ids = np.arange(count, dtype=np.int64)
    info = {"source": "ds_grace.profiling", "tokens": count, "ranks": world_size, **dict(metadata or {})}
    return RoutingTrace(
        topk_ids=tuple(layer_ids[:count] for layer_ids in ids),
        num_experts=num_experts[0],
        gate_weights=tuple(layer_weights[:count] for layer_weights in weights),
        token_ids=tuple(token_ids for _ in sources),
        metadata=info,
    )


# ---- text to token batches ----


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str | None: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """Byte-level fallback for checkpoints without tokenizer files (see the module docstring)."""

    vocab_size: int
    reserved: int

    def __post_init__(self) -> None:
        if not 0 <= self.reserved < self.vocab_size:
            raise ValueError(
                f"ByteTokenizer reserved ids ({self.reserved}) must be in [0, vocab_size={self.vocab_size})"
            )

    @property
    def lossless(self) -> bool:
        return self.vocab_size - self.reserved >= 256

    def encode(self, text: str) -> list[int]:
        span = self.vocab_size - self.reserved
        return [self.reserved + byte % span for byte in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str | None:
        if not self.lossless:
            return None
        data = bytes(i - self.reserved for i in ids if self.reserved <= i < self.reserved + 256)
        return data.decode("utf-8", errors="replace")


class _HFTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str | None:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def special_token_ids(config: Any) -> list[int]:
    """pad/bos/eos ids (ints, flattened) of a transformers config or of its config.json dict."""
    ids: list[int] = []
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        ids.extend(int(v) for v in values if isinstance(v, int))
    return ids


def load_text_tokenizer(model_dir: str | Path) -> TextTokenizer:
    """The folder's tokenizer when it holds tokenizer files, else the ByteTokenizer fallback sized from
    config.json (vocab_size; ids up to the largest pad/bos/eos id are reserved)."""
    folder = Path(model_dir)
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return _HFTokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"checkpoint folder ({folder}) has no config.json to size the byte tokenizer")
    config = json.loads(config_file.read_text())
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"{config_file}: vocab_size ({vocab_size!r}) must be an integer >= 2")
    special = special_token_ids(config)
    reserved = max(special) + 1 if special and max(special) < vocab_size - 1 else 0
    return ByteTokenizer(vocab_size=vocab_size, reserved=reserved)


def token_batches(
    token_ids: Sequence[int], *, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Cut a token stream into sequences of seq_len (the last may be shorter, and is then left-padded with 0
    and masked), deal sequence i to rank i % world_size, and yield this rank's batches of batch_size as
    {"input_ids", "attention_mask", "use_cache": False}."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")
    sequences = [list(token_ids[start : start + seq_len]) for start in range(0, len(token_ids), seq_len)]
    mine = sequences[rank::world_size]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        width = max(len(seq) for seq in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
        yield {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
