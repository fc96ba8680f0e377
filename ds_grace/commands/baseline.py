"""`ds-grace baseline`: vanilla DeepSpeed-MoE inference of the toy model on local gloo ranks.

Runs DeepSpeed's default mode (drop_tokens, eval_capacity_factor 1.0) and the lossless mode on one fixed
batch with uneven tokens per rank, and prints per mode: median forward latency, routes, dropped routes
and the largest deviation from the single-process reference. With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

from ds_grace.comm.local_ranks import RankFailure, run_on_ranks
from ds_grace.models.toy import ToyMoEConfig
from ds_grace.topology import Topology
from ds_grace.vanilla import (
    ModeSummary,
    ToyRunSpec,
    reference_forward,
    run_toy_modes_on_rank,
    summarize_toy_run,
    toy_global_batch,
)

DEFAULT_TOKENS_PER_RANK = 64


def uneven_token_split(total: int, world_size: int) -> list[int]:
    """Split `total` tokens over ranks with a linear ramp from 1.4x to 0.6x the mean (largest remainder)."""
    if world_size < 1 or total < world_size:
        raise ValueError(f"--tokens ({total}) must be at least the world size ({world_size})")
    if world_size == 1:
        return [total]
    weights = [1.4 - 0.8 * rank / (world_size - 1) for rank in range(world_size)]
    shares = [total * weight / sum(weights) for weight in weights]
    counts = [max(1, math.floor(share)) for share in shares]
    by_remainder = sorted(range(world_size), key=lambda rank: counts[rank] - shares[rank])
    for rank in by_remainder[: total - sum(counts)]:
        counts[rank] += 1
    return counts


def parse_tokens(text: str | None, world_size: int) -> list[int]:
    """Token counts per rank from --tokens: "N" is a total split unevenly, "a,b,..." one count per rank."""
    if text is None:
        return uneven_token_split(DEFAULT_TOKENS_PER_RANK * world_size, world_size)
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--tokens ({text!r}) must be an integer or a comma-separated list of integers"
        ) from None
    if len(values) == 1:
        return uneven_token_split(values[0], world_size)
    if len(values) != world_size or min(values) < 1:
        raise ValueError(f"--tokens ({text!r}) must list one count >= 1 per rank ({world_size} ranks)")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, default=4, help="local gloo ranks (default 4)")
    parser.add_argument(
        "--ep-size", type=int, default=None, help="expert-parallel size (default: world size)"
    )
    parser.add_argument(
        "--tokens",
        default=None,
        help='total tokens split unevenly over ranks ("256"), or one count per rank ("90,73,55,38"); '
        f"default {DEFAULT_TOKENS_PER_RANK} x world size, split unevenly",
    )
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument("--k", type=int, default=2, choices=(1, 2), help="top-k (default 2)")
    parser.add_argument("--layers", type=int, default=2, help="MoE blocks (default 2)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--ffn-hidden", type=int, default=128, help="expert MLP hidden size (default 128)")
    parser.add_argument("--skew", type=float, default=0.5, help="batch skew in [0, 1] (default 0.5)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per mode (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="model and batch seed (default 0)")
    parser.add_argument("--timeout", type=float, default=300.0, help="hard limit in seconds for the ranks")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _spec_from_args(args: argparse.Namespace) -> ToyRunSpec:
    if args.world_size < 1:
        raise ValueError(f"--world-size ({args.world_size}) must be >= 1")
    ep_size = args.world_size if args.ep_size is None else args.ep_size
    if ep_size < 1 or args.world_size % ep_size != 0:
        raise ValueError(f"--ep-size ({ep_size}) must be >= 1 and divide --world-size ({args.world_size})")
    if args.iters < 1:
        raise ValueError(f"--iters ({args.iters}) must be >= 1")
    model = ToyMoEConfig(
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn_hidden,
        num_experts=args.experts,
        k=args.k,
        num_layers=args.layers,
        ep_size=ep_size,
        seed=args.seed,
    )
    return ToyRunSpec(
        model=model,
        tokens_per_rank=tuple(parse_tokens(args.tokens, args.world_size)),
        batch_seed=args.seed,
        skew=args.skew,
        dtype=args.dtype,
        iters=args.iters,
    )


def format_table(summaries: list[ModeSummary]) -> str:
    header = (
        "mode",
        "ep_size",
        "world",
        "median fwd ms",
        "routes",
        "dropped routes (%)",
        "max |diff| vs ref",
    )
    rows = [
        (
            s.mode,
            str(s.ep_size),
            str(s.world_size),
            f"{s.median_forward_ms:.2f}",
            str(s.routes),
            f"{s.dropped} ({s.dropped_pct:.1f}%)",
            f"{s.max_abs_diff:.2e}",
        )
        for s in summaries
    ]
    widths = [max(len(row[col]) for row in [header, *rows]) for col in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        spec = _spec_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    world_size = len(spec.tokens_per_rank)
    try:
        per_rank = run_on_ranks(
            run_toy_modes_on_rank,
            topology=Topology(num_nodes=1, gpus_per_node=world_size),
            args=(spec,),
            timeout_s=args.timeout,
        )
    except RankFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    reference_TD = reference_forward(spec.model, toy_global_batch(spec), dtype=spec.dtype)
    summaries = summarize_toy_run(spec, per_rank, reference_TD)
    model = spec.model
    print(
        f"vanilla DeepSpeed-MoE, toy model: {model.num_layers} MoE layers, {model.num_experts} experts, "
        f"top-{model.k}, hidden {model.hidden_size}, {spec.dtype}; tokens per rank {list(spec.tokens_per_rank)}"
    )
    print(format_table(summaries))
    for s in summaries:
        if s.padded_tokens:
            print(
                f"note: {s.mode} pads each expert-parallel group to its largest token count "
                f"({s.padded_tokens} padding tokens per forward, not counted as routes)"
            )
    if args.json:
        record = {
            "command": "baseline",
            "world_size": world_size,
            "ep_size": model.ep_size,
            "tokens_per_rank": list(spec.tokens_per_rank),
            "dtype": spec.dtype,
            "model": asdict(model),
            "modes": [{**asdict(s), "dropped_pct": s.dropped_pct} for s in summaries],
        }
        print(json.dumps(record))
    return 0
