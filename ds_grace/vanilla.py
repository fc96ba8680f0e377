"""Vanilla DeepSpeed-MoE inference, served correctly: the baseline GRACE is measured against.

Shape legend: T tokens, D hidden, K top-k, S tokens a gate sees (T plus padding).

What "correctly" means here:
- deterministic gating in eval (no RTS, no Gumbel-sampled second expert, no noisy gate);
- the expert-parallel groups deepspeed.init_inference creates are actually given to the MoE layers
  (see ds_grace.comm.deepspeed_groups), so ep_size < world size and drop_tokens=False work;
- two modes, from grace.vanilla: DeepSpeed's default (drop_tokens=True, eval_capacity_factor 1.0), whose
  dropped routes are counted per layer by :class:`DroppedRouteCounter`, and lossless (drop_tokens=False).

Equal token counts: DeepSpeed's all-to-all sends a capacity-padded [E, C, D] buffer and expects the same
size back. With drop_tokens=True, C comes from each rank's own token count; with top-1 and
drop_tokens=False, C is capped by the rank's token count. Either way ranks with different token counts
crash in the all-to-all, so in those cases :func:`vanilla_forward` pads every rank of an expert-parallel
group to the group's largest count, as a vanilla deployment must. Padding goes at the end, masked by
``used_token`` (which DeepSpeed honours for top-1 only: top-2 padding tokens take capacity after every
real first choice, as they would in any padded vanilla batch); it is never counted as a route.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.sharded_moe import TopKGate
from torch import nn

from ds_grace.comm.collectives import barrier, is_distributed, max_over_group
from ds_grace.comm.deepspeed_groups import (
    ExpertGroupError,
    check_ep_size,
    expert_parallel_group_ranks,
    expert_parallel_rank,
    moe_layers,
    wire_expert_parallel_groups,
)
from ds_grace.comm.local_ranks import RankContext
from ds_grace.config import GRACE_KEY, GraceConfigError, VanillaConfig
from ds_grace.models.toy import ToyMoEConfig, ToyMoEModel, toy_batch

DEEPSPEED_DEFAULT = VanillaConfig(drop_tokens=True, eval_capacity_factor=1.0, min_capacity=4)
LOSSLESS = VanillaConfig(drop_tokens=False, eval_capacity_factor=1.0, min_capacity=4)
VANILLA_MODES: dict[str, VanillaConfig] = {"deepspeed-default": DEEPSPEED_DEFAULT, "lossless": LOSSLESS}

_CPU_DTYPES = (torch.float32, torch.bfloat16)
_DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configure_vanilla_gates(model: nn.Module, vanilla: VanillaConfig) -> int:
    """Set every MoE gate of `model` to `vanilla`'s capacity rule and to deterministic gating.

    Returns the number of gates configured.
    """
    layers = moe_layers(model)
    if not layers:
        raise ExpertGroupError("model has no deepspeed.moe.layer.MoE layers")
    for _, layer in layers:
        gate = layer.deepspeed_moe.gate
        gate.drop_tokens = vanilla.drop_tokens
        gate.eval_capacity_factor = vanilla.eval_capacity_factor
        gate.min_capacity = vanilla.min_capacity
        gate.use_rts = False
        gate.top2_2nd_expert_sampling = False
        gate.noisy_gate_policy = None
    return len(layers)


def _inference_config(ds_config: Mapping[str, Any], *, ep_size: int) -> dict[str, Any]:
    if GRACE_KEY in ds_config:
        raise GraceConfigError(
            f'ds_config passed to serve_vanilla holds a "{GRACE_KEY}" block, which DeepSpeed\'s inference '
            "config forbids; split it off with ds_grace.config.load_ds_config"
        )
    config = copy.deepcopy(dict(ds_config))
    moe = config.get("moe")
    if moe is None or isinstance(moe, bool):
        config["moe"] = {"enabled": True, "ep_size": ep_size}
    elif isinstance(moe, Mapping):
        if "ep_size" in moe and moe["ep_size"] != ep_size:
            raise ExpertGroupError(
                f"moe.ep_size ({moe['ep_size']}) must equal the ep_size of the model's MoE layers ({ep_size})"
            )
        config["moe"] = {**moe, "ep_size": ep_size}
    else:
        raise GraceConfigError(f"moe ({moe!r}) must be a JSON object")

    from deepspeed.accelerator import get_accelerator
    from deepspeed.inference.config import DeepSpeedInferenceConfig

    dtype = DeepSpeedInferenceConfig(**config).dtype
    if get_accelerator().device_name() == "cpu" and dtype not in _CPU_DTYPES:
        shown = repr(config["dtype"]) if "dtype" in config else "unset, DeepSpeed's default fp16"
        raise GraceConfigError(
            f"dtype ({shown}) must be fp32 or bf16 on CPU: DeepSpeed inference refuses fp16 there"
        )
    return config


def serve_vanilla(model: nn.Module, ds_config: Mapping[str, Any], vanilla: VanillaConfig) -> Any:
    """Wrap `model` with deepspeed.init_inference as vanilla DeepSpeed-MoE, groups wired.

    `ds_config` is the DeepSpeed part of a ds_config.json (no "grace" block); its moe.ep_size, when
    given, must match the model's MoE layers, and is filled in from them otherwise. Needs
    torch.distributed initialised (deepspeed.init_distributed). Returns the InferenceEngine.
    """
    import deepspeed

    ep_sizes = sorted({layer.ep_size for _, layer in moe_layers(model)})
    if not ep_sizes:
        raise ExpertGroupError("model has no deepspeed.moe.layer.MoE layers")
    if len(ep_sizes) > 1:
        raise ExpertGroupError(
            f"MoE layers of one model must share one ep_size (found {ep_sizes}): "
            "deepspeed.init_inference builds groups for a single moe.ep_size"
        )
    ep_size = ep_sizes[0]
    config = _inference_config(ds_config, ep_size=ep_size)
    if not dist.is_initialized():
        raise RuntimeError("serve_vanilla needs torch.distributed initialised (deepspeed.init_distributed)")
    check_ep_size(world_size=dist.get_world_size(), ep_size=ep_size)
    ep_rank = expert_parallel_rank(dist.get_rank(), ep_size)
    built_for = getattr(model, "ep_rank", None)
    if isinstance(built_for, int) and built_for != ep_rank:
        raise ExpertGroupError(
            f"model.ep_rank ({built_for}) must be rank {dist.get_rank()}'s position in its expert-parallel "
            f"group ({ep_rank}, ranks {expert_parallel_group_ranks(dist.get_rank(), ep_size)}): "
            "the model holds another rank's experts"
        )
    configure_vanilla_gates(model, vanilla)
    model.eval()
    engine = deepspeed.init_inference(model, config=config)
    wire_expert_parallel_groups(engine.module, engine.ep_group)
    return engine


def _module_of(model: Any) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def needs_equal_token_counts(model: Any) -> bool:
    """Whether DeepSpeed's all-to-all needs the same token count on every rank of an ep group."""
    return any(
        layer.deepspeed_moe.gate.drop_tokens or layer.deepspeed_moe.gate.k == 1
        for _, layer in moe_layers(_module_of(model))
    )


def _group_max_tokens(model: nn.Module, num_tokens: int) -> int:
    layers = moe_layers(model)
    group = layers[0][1].deepspeed_moe.ep_group if layers else None
    if group is None or not is_distributed():
        return num_tokens
    return max_over_group(num_tokens, group=group)


def vanilla_forward(model: Any, x_TD: torch.Tensor, *, pad_to: int | None = None) -> torch.Tensor:
    """One inference forward of a vanilla engine (or module) on this rank's tokens; returns y_TD.

    When :func:`needs_equal_token_counts`, the tokens are padded to `pad_to` (or, if None, to the
    largest count in the expert-parallel group, one all-reduce) and the padding is cut off again.
    The model's forward must take (x_TD, used_token_T=None), as ToyMoEModel's does.
    """
    module = _module_of(model)
    dtype = next(module.parameters()).dtype
    x_TD = x_TD.to(dtype)
    num_tokens = x_TD.shape[0]
    with torch.no_grad():
        if not needs_equal_token_counts(model):
            return model(x_TD)
        target = _group_max_tokens(module, num_tokens) if pad_to is None else pad_to
        if target < num_tokens:
            raise ValueError(f"pad_to ({target}) must be >= this rank's token count ({num_tokens})")
        padding_TD = x_TD.new_zeros(target - num_tokens, x_TD.shape[1])
        used_token_S = torch.zeros(target, dtype=torch.int64)
        used_token_S[:num_tokens] = 1
        y_SD = model(torch.cat([x_TD, padding_TD]), used_token_S)
        return y_SD[:num_tokens]


@dataclass(frozen=True)
class GateStats:
    """One MoE layer, one forward, one rank."""

    routes: int  # (token, expert) assignments the gate selected for real (unpadded) tokens
    dropped: int  # of those, assignments the capacity limit dropped
    capacity: int  # slots per expert in the dispatch buffer


class DroppedRouteCounter:
    """Counts, per MoE layer and forward, the routes the gate chose and capacity dropped.

    Hooks the output of each layer's TopKGate: a selected route is dropped when DeepSpeed marks its
    expert index -1 (sparse routes) or leaves it out of the dispatch mask (dense format). Tokens masked
    out by ``used_token`` are padding and not counted. ``stats[layer][forward]`` holds GateStats;
    with `record_gate_inputs`, ``gate_inputs[layer][forward]`` holds the gate's (x_SD, used_token_S).
    """

    def __init__(self, model: Any, *, record_gate_inputs: bool = False) -> None:
        layers = moe_layers(_module_of(model))
        if not layers:
            raise ExpertGroupError("model has no deepspeed.moe.layer.MoE layers to count")
        self.layer_names = [name for name, _ in layers]
        self.record_gate_inputs = record_gate_inputs
        self.stats: list[list[GateStats]] = [[] for _ in layers]
        self.gate_inputs: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = [[] for _ in layers]
        self._handles = [
            layer.deepspeed_moe.gate.register_forward_hook(self._hook_for(index))
            for index, (_, layer) in enumerate(layers)
        ]

    def _hook_for(self, layer_index: int) -> Any:
        def hook(gate: TopKGate, args: tuple[Any, ...], output: tuple[Any, ...]) -> None:
            used_token_S = args[1] if len(args) > 1 else None
            self.stats[layer_index].append(gate_stats(gate.k, output, used_token_S))
            if self.record_gate_inputs:
                used = None if used_token_S is None else used_token_S.detach().clone()
                self.gate_inputs[layer_index].append((args[0].detach().float().clone(), used))

        return hook

    def last_forward(self) -> list[GateStats]:
        return [layer_stats[-1] for layer_stats in self.stats]

    def reset(self) -> None:
        for layer_stats in self.stats:
            layer_stats.clear()
        for layer_inputs in self.gate_inputs:
            layer_inputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def gate_stats(k: int, gate_output: Sequence[Any], used_token_S: torch.Tensor | None) -> GateStats:
    """GateStats from a TopKGate output, in either of DeepSpeed's two formats."""
    if len(gate_output) == 7:  # sparse: (l_aux, capacity, E, indices_KS, locations_KS, gates_KS, counts)
        indices_KS = gate_output[3]
        real_S = (
            torch.ones(indices_KS.shape[1], dtype=torch.bool) if used_token_S is None else used_token_S.bool()
        )
        kept = int((indices_KS[:, real_S] >= 0).sum())
        capacity = int(gate_output[1])
    elif len(gate_output) == 4:  # dense: (l_aux, combine_weights_SEC, dispatch_mask_SEC, counts)
        dispatch_mask_SEC = gate_output[2]
        real_S = (
            torch.ones(dispatch_mask_SEC.shape[0], dtype=torch.bool)
            if used_token_S is None
            else used_token_S.bool()
        )
        kept = int(dispatch_mask_SEC[real_S].any(dim=-1).sum())
        capacity = int(dispatch_mask_SEC.shape[2])
    else:
        raise TypeError(f"unrecognised TopKGate output ({len(gate_output)} values, expected 4 or 7)")
    routes = k * int(real_S.sum())
    return GateStats(routes=routes, dropped=routes - kept, capacity=capacity)


def reference_forward(config: ToyMoEConfig, x_TD: torch.Tensor, *, dtype: str = "fp32") -> torch.Tensor:
    """The same toy model in one process: all experts local, no capacity (nothing dropped).

    `dtype` ("fp32" or "bf16") should be the served one, so that a difference measures capacity and
    distribution effects rather than precision.
    """
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype ({dtype!r}) must be one of {sorted(_DTYPE_NAMES)}")
    model = ToyMoEModel(replace(config, ep_size=1)).to(_DTYPE_NAMES[dtype])
    configure_vanilla_gates(model, LOSSLESS)
    model.eval()
    with torch.no_grad():
        return model(x_TD.to(_DTYPE_NAMES[dtype])).float()


# ---- the toy workload on local ranks (used by `ds-grace baseline` and the tests) ----


@dataclass(frozen=True)
class ToyRunSpec:
    model: ToyMoEConfig
    tokens_per_rank: tuple[int, ...]
    modes: tuple[tuple[str, VanillaConfig], ...] = tuple(VANILLA_MODES.items())
    batch_seed: int = 0
    skew: float = 0.0
    dtype: str = "fp32"
    warmup: int = 1
    iters: int = 5
    record_gate_inputs: bool = False


@dataclass(frozen=True)
class RankModeResult:
    """What one rank measured for one mode."""

    mode: str
    output_TD: torch.Tensor
    forward_ms: tuple[float, ...]
    gate_stats: tuple[GateStats, ...]  # per MoE layer, last forward
    padded_tokens: int
    gate_inputs: tuple[tuple[torch.Tensor, torch.Tensor | None], ...] | None  # per layer, last forward


def toy_global_batch(spec: ToyRunSpec) -> torch.Tensor:
    return toy_batch(sum(spec.tokens_per_rank), spec.model.hidden_size, seed=spec.batch_seed, skew=spec.skew)


def rank_token_slices(tokens_per_rank: Sequence[int]) -> list[slice]:
    starts = [sum(tokens_per_rank[:rank]) for rank in range(len(tokens_per_rank))]
    return [slice(start, start + count) for start, count in zip(starts, tokens_per_rank, strict=True)]


def run_toy_modes_on_rank(ctx: RankContext, spec: ToyRunSpec) -> list[RankModeResult]:
    """Serve the toy model in every mode of `spec` on this rank; forward this rank's slice of the batch."""
    if len(spec.tokens_per_rank) != ctx.world_size:
        raise ValueError(
            f"tokens_per_rank has {len(spec.tokens_per_rank)} entries but the world has {ctx.world_size} ranks"
        )
    x_TD = toy_global_batch(spec)[rank_token_slices(spec.tokens_per_rank)[ctx.rank]]
    ep_size = spec.model.ep_size
    group_tokens = [spec.tokens_per_rank[r] for r in expert_parallel_group_ranks(ctx.rank, ep_size)]
    ds_config = {"dtype": spec.dtype, "replace_with_kernel_inject": False}
    results = []
    for mode, vanilla in spec.modes:
        model = ToyMoEModel(spec.model, ep_rank=expert_parallel_rank(ctx.rank, ep_size))
        engine = serve_vanilla(model, ds_config, vanilla)
        counter = DroppedRouteCounter(engine, record_gate_inputs=spec.record_gate_inputs)
        pad_to = max(group_tokens) if needs_equal_token_counts(engine) else x_TD.shape[0]
        forward_ms = []
        for iteration in range(spec.warmup + spec.iters):
            barrier()
            start = time.perf_counter()
            y_TD = vanilla_forward(engine, x_TD, pad_to=pad_to)
            elapsed_ms = (time.perf_counter() - start) * 1e3
            if iteration >= spec.warmup:
                forward_ms.append(elapsed_ms)
        gate_inputs = None
        if spec.record_gate_inputs:
            gate_inputs = tuple(layer_inputs[-1] for layer_inputs in counter.gate_inputs)
        results.append(
            RankModeResult(
                mode=mode,
                output_TD=y_TD.float().clone(),
                forward_ms=tuple(forward_ms),
                gate_stats=tuple(counter.last_forward()),
                padded_tokens=pad_to - x_TD.shape[0],
                gate_inputs=gate_inputs,
            )
        )
        counter.remove()
    return results


@dataclass(frozen=True)
class ModeSummary:
    """One mode over all ranks: the row `ds-grace baseline` prints."""

    mode: str
    drop_tokens: bool
    eval_capacity_factor: float
    ep_size: int
    world_size: int
    median_forward_ms: float  # median over iterations of the slowest rank's forward
    routes: int  # per forward, all layers and ranks
    dropped: int
    dropped_per_layer: tuple[int, ...]
    padded_tokens: int  # per forward, all ranks
    max_abs_diff: float  # vs reference_forward on the whole batch

    @property
    def dropped_pct(self) -> float:
        return 100.0 * self.dropped / self.routes if self.routes else 0.0


def summarize_toy_run(
    spec: ToyRunSpec, per_rank: Sequence[Sequence[RankModeResult]], reference_TD: torch.Tensor
) -> list[ModeSummary]:
    """Combine every rank's results per mode and compare the gathered output with the reference."""
    summaries = []
    for mode_index, (mode, vanilla) in enumerate(spec.modes):
        results = [rank_results[mode_index] for rank_results in per_rank]
        output_TD = torch.cat([result.output_TD for result in results])
        slowest_ms = [max(times) for times in zip(*(result.forward_ms for result in results), strict=True)]
        dropped_per_layer = tuple(
            sum(result.gate_stats[layer].dropped for result in results)
            for layer in range(spec.model.num_layers)
        )
        summaries.append(
            ModeSummary(
                mode=mode,
                drop_tokens=vanilla.drop_tokens,
                eval_capacity_factor=vanilla.eval_capacity_factor,
                ep_size=spec.model.ep_size,
                world_size=len(per_rank),
                median_forward_ms=float(statistics.median(slowest_ms)) if slowest_ms else float("nan"),
                routes=sum(stats.routes for result in results for stats in result.gate_stats),
                dropped=sum(dropped_per_layer),
                dropped_per_layer=dropped_per_layer,
                padded_tokens=sum(result.padded_tokens for result in results),
                max_abs_diff=float((output_TD - reference_TD.float()).abs().max())
                if output_TD.numel()
                else 0.0,
            )
        )
    return summaries
