"""`ds-grace profile`: record the routing of a checkpoint on calibration text into a RoutingTrace.

    ds-grace profile --model DIR --data TEXT_FILE --tokens N --out trace.npz

The text is tokenised with the folder's tokenizer, or with the byte-level fallback when the folder
holds no tokenizer files (see ds_grace.profiling), cut into sequences of --seq-len tokens and run in
batches of --batch-size with the whole model in this process. Under the deepspeed launcher
(``deepspeed --num_gpus R --no_local_rank --module ds_grace.cli profile ...``; --no_local_rank keeps
the launcher's --local_rank argument from landing before the subcommand) the model is served sharded,
as lossless vanilla DeepSpeed-MoE (contiguous placement: each rank reads and holds the dense weights and
its E / R experts only, so a model that fits on no single device can be profiled), sequence i goes to
rank i % R, every rank runs its share in lockstep with the others, and rank 0 writes the gathered trace
(rank 0's sequences first, then rank 1's, ...).
The output feeds ``ds-grace plan --trace``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

_DTYPES = ("fp32", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    parser.add_argument("--data", required=True, help="calibration text file (UTF-8)")
    parser.add_argument("--tokens", type=int, required=True, help="tokens to record (over all ranks)")
    parser.add_argument("--out", required=True, help="RoutingTrace file to write (.npz)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--dtype", choices=_DTYPES, default="fp32", help="dtype to run the model in")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def _error(message: str) -> int:
    print(f"ds-grace profile: error: {message}", file=sys.stderr)
    return 2


def _serve_sharded(folder: str, *, dtype: str):
    """Under a launcher: the folder served as lossless vanilla DeepSpeed-MoE (contiguous placement), so
    every rank reads and holds only the dense weights and its E / R experts; an error message otherwise."""
    import ds_grace
    from ds_grace.config import GraceConfigError
    from ds_grace.models import ModelAdapterError

    config = {"dtype": dtype, "grace": {"enabled": False, "vanilla": {"drop_tokens": False}}}
    try:
        return ds_grace.init_inference(folder, config=config)
    except (GraceConfigError, ModelAdapterError) as exc:
        return str(exc)


def run(args: argparse.Namespace) -> int:
    from ds_grace.inference import check_checkpoint_folder
    from ds_grace.models import ModelAdapterError

    for name in ("tokens", "seq_len", "batch_size"):
        value = getattr(args, name)
        if value < 1:
            return _error(f"--{name.replace('_', '-')} ({value}) must be >= 1")
    data = Path(args.data)
    if not data.is_file():
        return _error(f"--data file ({data}) does not exist")
    try:
        family = check_checkpoint_folder(args.model)
    except ModelAdapterError as exc:
        return _error(str(exc))

    import torch

    from ds_grace.models import load_checkpoint
    from ds_grace.profiling import ByteTokenizer, load_text_tokenizer, profile_routing, token_batches

    world_size, rank = 1, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ds_grace.comm.collectives import init_distributed, world

        init_distributed(timeout_s=300.0)
        world_size, rank = world()
    tokenizer = load_text_tokenizer(args.model)
    token_ids = tokenizer.encode(data.read_text(encoding="utf-8"))
    if not token_ids:
        return _error(f"--data file ({data}) holds no text")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if world_size > 1:
        model = _serve_sharded(args.model, dtype=args.dtype)
        if isinstance(model, str):
            return _error(model)
    else:
        model = load_checkpoint(args.model, dtype=dtype)
    batches = token_batches(
        token_ids, seq_len=args.seq_len, batch_size=args.batch_size, rank=rank, world_size=world_size
    )
    tokenizer_name = "byte-fallback" if isinstance(tokenizer, ByteTokenizer) else "checkpoint"
    trace = profile_routing(
        model,
        batches,
        tokens=args.tokens,
        progress=not args.no_progress,
        metadata={"model": str(args.model), "family": family, "data": str(data), "tokenizer": tokenizer_name},
    )
    if trace is None:  # not rank 0 (ds_grace.cli leaves the process group together once every rank returns)
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trace.save(out)
    summary = {
        "out": str(out),
        "family": family,
        "tokens": trace.num_tokens[0],
        "requested_tokens": args.tokens,
        "layers": trace.num_layers,
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "tokenizer": tokenizer_name,
        "ranks": world_size,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        short = " (the text ran out)" if summary["tokens"] < args.tokens else ""
        print(
            f"recorded {summary['tokens']} tokens{short} x {trace.num_layers} MoE layers "
            f"({trace.num_experts} experts, top-{trace.top_k}, {tokenizer_name} tokenizer) -> {out}"
        )
    return 0
