"""`ds-grace import-trace`: read real routing data into one trace file (.npz).

    ds-grace import-trace FILE... --out TRACE.npz [--format auto|mixtral|olmoe-counts|route-log]
                          [--num-experts N] [--token-order] [--keep-warmup]

Formats (see ds_grace/data/traces/README.md): Mixtral JSONL (one record per token and layer; it records
no expert count, so --num-experts is required), OLMoE expert counts (.json; loads only; 64 experts
unless --num-experts), and route logs (.jsonl with a {"type": "meta"} header line; several single-layer
files combine into one multi-layer trace aligned by line order, warm-up blocks are dropped and counted
unless --keep-warmup). Prints one JSON summary line; `plan`, `evaluate`, `report` and `split-trace`
read the output.
"""

from __future__ import annotations

import argparse
import json
import sys

from ds_grace.trace import IMPORT_FORMATS, ExpertLoads, TraceError, import_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="source file(s)")
    parser.add_argument("--out", required=True, help="trace file to write (.npz)")
    parser.add_argument("--format", choices=IMPORT_FORMATS, default="auto", help="source format")
    parser.add_argument("--num-experts", type=int, help="expert count, where the source does not record it")
    parser.add_argument(
        "--token-order",
        action="store_true",
        help="Mixtral JSONL: the i-th record of every layer is token i (for files whose positions repeat)",
    )
    parser.add_argument("--keep-warmup", action="store_true", help="route logs: keep warm-up blocks")
    parser.add_argument("--top-k", type=int, help="OLMoE counts: top-k of the counted tokens (default 8)")


def run(args: argparse.Namespace) -> int:
    try:
        trace = import_trace(
            args.files,
            source_format=args.format,
            num_experts=args.num_experts,
            token_identity="record_order" if args.token_order else "key",
            keep_warmup=args.keep_warmup,
            top_k=args.top_k,
        )
        trace.save(args.out)
    except (TraceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "out": str(args.out),
        "kind": "loads" if isinstance(trace, ExpertLoads) else "per_token",
        "layers": trace.num_layers,
        "experts": trace.num_experts,
        "fingerprint": trace.fingerprint,
    }
    if not isinstance(trace, ExpertLoads):
        summary.update(top_k=trace.top_k, tokens=list(trace.num_tokens))
    for key in ("model_layers", "warmup_routes", "warmup_dropped", "assumptions"):
        if key in trace.metadata:
            summary[key] = trace.metadata[key]
    print(json.dumps(summary))
    return 0
