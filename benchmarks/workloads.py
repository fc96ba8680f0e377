"""Benchmark workloads: replayed routing from real traces, scaled down from the paper's batches.

Shape legend: I iterations (forwards), T tokens of one forward (all ranks), K top-k, E experts, L layers.

Four models, each in two phases:
- "qwen15": Qwen1.5-MoE-A2.7B per-token routing recorded in vLLM (60 experts, top-4), MoE layers
  0, 8, 12, 18, 23 (ds_grace.trace.load_route_logs, warm-up pass dropped). The first half of its
  tokens plans, the second half is replayed.
- "olmoe-real": OLMoE-1B-7B per-token routing recorded in vLLM (64 experts, top-8), MoE layer 0,
  real co-activation; half plans, half is replayed.
- "mixtral": Mixtral-8x7B per-token routing (8 experts, top-2), MoE layers 0, 8, 16, 24 of 32. The
  plan is built from the first half of each of its two traces (GSM8K, HumanEval), the second halves
  are replayed.
- "olmoe": OLMoE-1B-7B (64 experts, top-8), synthetic co-activation. The real data holds expert
  loads only, so a per-token trace is derived whose loads equal the real (Wikipedia) counts; its
  co-activation structure is synthetic. The first half of its tokens plans, the second half is replayed.
Phases (paper: batch 256 x prefill 128, decode 16 steps): "prefill" forwards batch x prefill tokens
at once, "decode" forwards one token per sequence per step. Every forward replays one MoE layer of
the trace (cycling over the workload's layers) on a fresh window of its tokens; the gate weights are
the trace's where it has them, else drawn once per token from a seeded Dirichlet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ds_grace.trace import (
    RoutingTrace,
    derive_trace_from_loads,
    load_mixtral_jsonl,
    load_olmoe_counts,
    load_route_logs,
    packaged_traces_dir,
    split_trace,
)

PAPER_BATCH, PAPER_PREFILL, PAPER_DECODE = 256, 128, 16
DECODE_STEPS = 4 * PAPER_DECODE  # four passes of the paper's 16 steps: decode forwards are short and noisy
# prefill forwards vary by +-30 % on a shared 2-core machine: 20 measured forwards per system
PREFILL_STEPS = 20


@dataclass(frozen=True)
class ModelShape:
    """The MoE layer the benchmark runs: routing of `name`, MLP experts hidden -> ffn -> hidden."""

    name: str
    num_experts: int
    top_k: int
    hidden: int
    ffn: int
    layers: tuple[int, ...]  # trace layers replayed (each gets its own plan layer)
    # the real model's expert shape and dtype bytes, for the compute:link arithmetic
    real_hidden: int
    real_ffn: int
    real_matrices: int  # 3: SwiGLU experts (gate, up, down)


MODELS: dict[str, ModelShape] = {
    "qwen15": ModelShape(
        name="qwen15",
        num_experts=60,
        top_k=4,
        hidden=256,
        ffn=512,
        layers=(0, 1, 2, 3, 4),  # the trace's layers: model layers 0, 8, 12, 18, 23
        real_hidden=2048,
        real_ffn=1408,
        real_matrices=3,
    ),
    "olmoe-real": ModelShape(
        name="olmoe-real",
        num_experts=64,
        top_k=8,
        hidden=256,
        ffn=512,
        layers=(0,),
        real_hidden=2048,
        real_ffn=1024,
        real_matrices=3,
    ),
    "mixtral": ModelShape(
        name="mixtral",
        num_experts=8,
        top_k=2,
        hidden=256,
        ffn=2048,
        layers=(0, 8, 16, 24),
        real_hidden=4096,
        real_ffn=14336,
        real_matrices=3,
    ),
    "olmoe": ModelShape(
        name="olmoe",
        num_experts=64,
        top_k=8,
        hidden=256,
        ffn=512,
        layers=(0, 1, 2),
        real_hidden=2048,
        real_ffn=1024,
        real_matrices=3,
    ),
}
OLMOE_DERIVED_TOKENS = 8192
DEFAULT_MODELS = ("qwen15", "olmoe-real", "mixtral", "olmoe")
SYNTHETIC_MODELS = ("olmoe",)  # co-activation derived from loads, not recorded


@dataclass(frozen=True)
class WorkloadSpec:
    model: str
    phase: str  # "prefill" or "decode"
    batch: int
    tokens_per_sequence: int  # prefill length, or 1 per decode step
    steps: int  # measured forwards
    warmup: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.phase}"

    @property
    def tokens_per_forward(self) -> int:
        return self.batch * self.tokens_per_sequence

    @property
    def shape(self) -> ModelShape:
        return MODELS[self.model]

    def paper_scale(self) -> str:
        if self.phase == "prefill":
            return (
                f"batch {self.batch} x prefill {self.tokens_per_sequence} = {self.tokens_per_forward} tokens "
                f"per forward (paper: {PAPER_BATCH} x {PAPER_PREFILL} = {PAPER_BATCH * PAPER_PREFILL}, "
                f"1/{PAPER_BATCH * PAPER_PREFILL // self.tokens_per_forward})"
            )
        return (
            f"batch {self.batch}, {self.steps} decode steps of 1 token per sequence "
            f"(paper: batch {PAPER_BATCH}, {PAPER_DECODE} steps)"
        )


def default_workloads(*, quick: bool = False, models: tuple[str, ...] = DEFAULT_MODELS) -> list[WorkloadSpec]:
    """The benchmark's workloads; `quick` is a tiny setting for tests (seconds, not minutes)."""
    specs = []
    for model in models:
        if model not in MODELS:
            raise ValueError(f"model ({model!r}) must be one of {sorted(MODELS)}")
        if quick:
            specs.append(WorkloadSpec(model, "prefill", batch=4, tokens_per_sequence=8, steps=3, warmup=1))
            continue
        specs.append(
            WorkloadSpec(model, "prefill", batch=16, tokens_per_sequence=32, steps=PREFILL_STEPS, warmup=2)
        )
        # decode warm-up: one forward per replayed layer, so every layer has learnt the token counts
        # its low-latency buffer is sized by (steady-state decode) before the measured steps
        warmup = max(2, len(MODELS[model].layers))
        specs.append(
            WorkloadSpec(model, "decode", batch=16, tokens_per_sequence=1, steps=DECODE_STEPS, warmup=warmup)
        )
    return specs


def _select_layers(trace: RoutingTrace, layers: tuple[int, ...], rows: slice | None = None) -> RoutingTrace:
    pick = (lambda a: a) if rows is None else (lambda a: a[rows])
    return RoutingTrace(
        topk_ids=tuple(pick(trace.topk_ids[layer]) for layer in layers),
        num_experts=trace.num_experts,
        gate_weights=None
        if trace.gate_weights is None
        else tuple(pick(trace.gate_weights[layer]) for layer in layers),
        metadata={**trace.metadata, "layers": list(layers)},
    )


MIXTRAL_TRACES = ("gsm8k_2_routing.jsonl", "humaneval_2_routing.jsonl")


def concat_traces(traces: list[RoutingTrace]) -> RoutingTrace:
    """The tokens of every trace one after the other, layer by layer (same layers, experts and top-k)."""
    first = traces[0]
    weights = None
    if all(t.gate_weights is not None for t in traces):
        weights = tuple(
            np.concatenate([t.gate_weights[layer] for t in traces]) for layer in range(first.num_layers)
        )
    token_ids = None
    if all(t.token_ids is not None for t in traces):  # the next trace's tokens numbered after this one's
        offsets = np.cumsum([0] + [int(max(ids.max() for ids in t.token_ids)) + 1 for t in traces[:-1]])
        token_ids = tuple(
            np.concatenate([t.token_ids[layer] + offset for t, offset in zip(traces, offsets, strict=True)])
            for layer in range(first.num_layers)
        )
    return RoutingTrace(
        topk_ids=tuple(
            np.concatenate([t.topk_ids[layer] for t in traces]) for layer in range(first.num_layers)
        ),
        num_experts=first.num_experts,
        gate_weights=weights,
        token_ids=token_ids,
        metadata={"concatenated": [dict(t.metadata) for t in traces]},
    )


def mixtral_halves() -> tuple[RoutingTrace, RoutingTrace]:
    """(first halves, second halves) of the two Mixtral traces (GSM8K, HumanEval), all 32 layers: the
    plans are fitted on the first half of each trace, every number is measured on the second halves."""
    halves = [
        split_trace(load_mixtral_jsonl(packaged_traces_dir() / "mixtral" / name, num_experts=8), fraction=0.5)
        for name in MIXTRAL_TRACES
    ]
    return concat_traces([h[0] for h in halves]), concat_traces([h[1] for h in halves])


def calibration_and_replay(model: str) -> tuple[RoutingTrace, RoutingTrace]:
    """(trace the plans are built from, trace whose routing is replayed), both over MODELS[model].layers."""
    shape = MODELS[model]
    traces = packaged_traces_dir()
    if model in ("qwen15", "olmoe-real"):
        folder, pattern = (
            ("qwen15_moe", "moe_layer*.jsonl") if model == "qwen15" else ("olmoe_tokens", "*.jsonl")
        )
        logged = load_route_logs(sorted((traces / folder).glob(pattern)), num_experts=shape.num_experts)
        calibration, replay = split_trace(logged, fraction=0.5)
        return _select_layers(calibration, shape.layers), _select_layers(replay, shape.layers)
    if model == "mixtral":
        calibration, replay = mixtral_halves()
        return _select_layers(calibration, shape.layers), _select_layers(replay, shape.layers)
    loads = load_olmoe_counts(traces / "olmoe" / "expert_counts" / "wikipedia.json")
    derived = derive_trace_from_loads(loads, num_tokens=OLMOE_DERIVED_TOKENS, seed=0)
    half = OLMOE_DERIVED_TOKENS // 2
    return (
        _select_layers(derived, shape.layers, slice(0, half)),
        _select_layers(derived, shape.layers, slice(half, None)),
    )


@dataclass(frozen=True)
class ReplayBatches:
    """What every forward of a workload replays: layer_I (index into the workload's layers),
    topk_ids_ITK and topk_weights_ITK over the whole batch (rank r takes rows r*T/R ..)."""

    layer_I: np.ndarray
    topk_ids_ITK: np.ndarray
    topk_weights_ITK: np.ndarray

    def save(self, path: Path) -> None:
        np.savez(
            path, layer_I=self.layer_I, topk_ids_ITK=self.topk_ids_ITK, topk_weights_ITK=self.topk_weights_ITK
        )

    @classmethod
    def load(cls, path: Path) -> ReplayBatches:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["layer_I"], data["topk_ids_ITK"], data["topk_weights_ITK"])


def replay_batches(spec: WorkloadSpec, replay: RoutingTrace, *, seed: int = 0) -> ReplayBatches:
    """warmup + steps forwards: forward i replays layer i % L on the next window of the trace's tokens
    (wrapping around), so consecutive forwards see different tokens."""
    rng = np.random.default_rng(seed)
    count = spec.warmup + spec.steps
    num_layers = replay.num_layers
    tokens = spec.tokens_per_forward
    layer_I = np.arange(count) % num_layers
    ids, weights = [], []
    for i in range(count):
        layer = int(layer_I[i])
        layer_ids = replay.topk_ids[layer]
        rows = (i // num_layers * tokens + np.arange(tokens)) % len(layer_ids)
        ids.append(layer_ids[rows])
        if replay.gate_weights is not None:
            weights.append(replay.gate_weights[layer][rows].astype(np.float32))
        else:
            drawn = rng.dirichlet(np.ones(replay.top_k), size=tokens).astype(np.float32)
            weights.append(-np.sort(-drawn, axis=1))  # gate order: largest weight first
    return ReplayBatches(layer_I, np.stack(ids).astype(np.int64), np.stack(weights).astype(np.float32))


def spec_to_dict(spec: WorkloadSpec) -> dict[str, Any]:
    data = asdict(spec)
    data.update(name=spec.name, tokens_per_forward=spec.tokens_per_forward, paper_scale=spec.paper_scale())
    data["shape"] = asdict(spec.shape)
    return data


def spec_from_dict(data: dict[str, Any]) -> WorkloadSpec:
    return WorkloadSpec(
        model=data["model"],
        phase=data["phase"],
        batch=int(data["batch"]),
        tokens_per_sequence=int(data["tokens_per_sequence"]),
        steps=int(data["steps"]),
        warmup=int(data["warmup"]),
    )


def with_steps(spec: WorkloadSpec, *, steps: int | None = None, warmup: int | None = None) -> WorkloadSpec:
    return replace(
        spec, steps=spec.steps if steps is None else steps, warmup=spec.warmup if warmup is None else warmup
    )
