"""Shared pieces of the integration tests: prompts, single-process references, plans, and the function
each spawned rank runs (module level, so spawned processes can import it).

Shape legend: P prompts, W padded prompt width, N new tokens, V vocabulary, T tokens, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ds_grace
from ds_grace.comm.local_ranks import RankContext
from ds_grace.config import GraceConfig
from ds_grace.models import load_checkpoint
from ds_grace.models.toy import ToyMoEConfig, ToyMoEModel
from ds_grace.planning.build import build_plan
from ds_grace.profiling import profile_routing
from ds_grace.topology import Topology

NEW_TOKENS = 6
PROMPT_LENGTHS = (7, 3, 9, 5, 4, 8, 6, 2)  # two prompts per rank on 4 ranks
VOCAB_SIZE = 128
FIRST_TOKEN = 3  # ids 0..2 are pad/bos/eos in the tiny checkpoints


def prompt_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids_PW, attention_mask_PW): PROMPT_LENGTHS random prompts, left-padded with 0."""
    generator = torch.Generator().manual_seed(seed)
    width = max(PROMPT_LENGTHS)
    input_ids = torch.zeros(len(PROMPT_LENGTHS), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        input_ids[row, width - length :] = torch.randint(
            FIRST_TOKEN, VOCAB_SIZE, (length,), generator=generator
        )
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def generate_kwargs(attention_mask: torch.Tensor) -> dict[str, Any]:
    return {
        "attention_mask": attention_mask,
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "use_cache": True,
        "pad_token_id": 0,
    }


@dataclass(frozen=True)
class Reference:
    tokens_PN: torch.Tensor  # greedy continuation of every prompt
    logits_PWV: torch.Tensor  # prefill logits


def hf_reference(checkpoint: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Reference:
    """Single-process transformers: generate (greedy, KV cache) and the prefill logits."""
    model = load_checkpoint(checkpoint)
    with torch.no_grad():
        tokens = model.generate(input_ids, **generate_kwargs(attention_mask))
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return Reference(tokens_PN=tokens[:, input_ids.shape[1] :], logits_PWV=logits)


def calibration_batches(seed: int, *, batches: int, rows: int, length: int) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        input_ids = torch.randint(FIRST_TOKEN, VOCAB_SIZE, (rows, length), generator=generator)
        out.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "use_cache": False})
    return out


def plan_for(
    model: torch.nn.Module, topology: Topology, *, seed: int, path: Path, routing_policy: str = "tar"
) -> Path:
    """Profile `model` on random calibration text, plan for `topology` with GRACE's defaults fitted for
    `routing_policy` (the policy that serves it), save."""
    trace = profile_routing(
        model, calibration_batches(seed, batches=4, rows=4, length=32), tokens=512, progress=False
    )
    fitted_for = "tar" if routing_policy == "primary" else routing_policy  # primary serves any plan
    config = GraceConfig.model_validate({"routing": {"policy": fitted_for}})
    build_plan(trace, topology=topology, config=config).save(path)
    return path


@dataclass(frozen=True)
class HFCase:
    name: str
    checkpoint: str
    config: dict[str, Any]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    # per rank, the batches profile_routing runs on the served engine (None: no profiling)
    profile_batches: tuple[tuple[dict[str, Any], ...], ...] | None = None
    profile_tokens: int = 0


@dataclass(frozen=True)
class ToyCase:
    name: str
    model: ToyMoEConfig
    config: dict[str, Any]
    x_TD: torch.Tensor
    tokens_per_rank: tuple[int, ...]
    profile: bool = False


@dataclass
class CaseResult:
    name: str
    mode: str
    layer_types: list[str]
    local_experts: list[int]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    trace: tuple[list[np.ndarray], list[np.ndarray]] | None = None
    stats_online: dict[str, Any] | None = None
    load: dict[str, Any] | None = None  # engine.grace.load.as_dict(), when it read a checkpoint


def _rows(ctx: RankContext, num_prompts: int) -> slice:
    share = num_prompts // ctx.world_size
    return slice(ctx.rank * share, (ctx.rank + 1) * share)


def _local_experts(served: Any) -> list[int]:
    return [len(layer.deepspeed_moe.experts.deepspeed_experts) for layer in served.layers]


def _trace_arrays(trace: Any) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    if trace is None:
        return None
    return [np.asarray(ids) for ids in trace.topk_ids], [np.asarray(w) for w in trace.gate_weights]


def _hf_case(ctx: RankContext, case: HFCase) -> CaseResult:
    engine = ds_grace.init_inference(case.checkpoint, config=case.config)
    served = engine.grace
    rows = _rows(ctx, case.input_ids.shape[0])
    input_ids, attention_mask = case.input_ids[rows], case.attention_mask[rows]
    served.reset_counters()
    with torch.no_grad():
        logits = engine(input_ids=input_ids, attention_mask=attention_mask).logits
        prefill_stats = served.stats()
        tokens = engine.generate(input_ids, **generate_kwargs(attention_mask))
    result = CaseResult(
        name=case.name,
        mode=served.mode,
        layer_types=[type(layer).__name__ for layer in served.layers],
        local_experts=_local_experts(served),
        outputs={"logits": logits, "tokens": tokens[:, input_ids.shape[1] :]},
        stats=prefill_stats,
        stats_online=served.online.metrics() if served.online is not None else None,
        load=served.load.as_dict() if served.load is not None else None,
    )
    if case.profile_batches is not None:
        trace = profile_routing(
            engine, list(case.profile_batches[ctx.rank]), tokens=case.profile_tokens, progress=False
        )
        result.trace = _trace_arrays(trace)
    return result


def _toy_case(ctx: RankContext, case: ToyCase) -> CaseResult:
    from ds_grace.comm.deepspeed_groups import expert_parallel_rank
    from ds_grace.vanilla import vanilla_forward

    model = ToyMoEModel(case.model, ep_rank=expert_parallel_rank(ctx.rank, case.model.ep_size))
    engine = ds_grace.init_inference(model, config=case.config)
    served = engine.grace
    start = sum(case.tokens_per_rank[: ctx.rank])
    x_TD = case.x_TD[start : start + case.tokens_per_rank[ctx.rank]]
    with torch.no_grad():
        y_TD = engine(x_TD) if served.mode == "grace" else vanilla_forward(engine, x_TD)
    result = CaseResult(
        name=case.name,
        mode=served.mode,
        layer_types=[type(layer).__name__ for layer in served.layers],
        local_experts=_local_experts(served),
        outputs={"y": y_TD},
        stats=served.stats(),
    )
    if case.profile:
        trace = profile_routing(engine, [x_TD], tokens=case.x_TD.shape[0], progress=False)
        result.trace = _trace_arrays(trace)
    return result


def serve_cases_on_rank(ctx: RankContext, cases: list[HFCase | ToyCase]) -> list[CaseResult]:
    """Serve every case with ds_grace.init_inference on this rank; run this rank's share of its inputs."""
    torch.manual_seed(1234)
    return [_hf_case(ctx, case) if isinstance(case, HFCase) else _toy_case(ctx, case) for case in cases]
