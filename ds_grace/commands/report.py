"""`ds-grace report`: plots and a markdown summary of a plan.

    ds-grace report plan.json --trace PATH --out DIR [--layer L]

Writes DIR/affinity.png (affinity heatmap, experts ordered by GPU and node; per-token traces only),
DIR/gpu_load.png (expected per-GPU load without and with replicas), DIR/placement.png (which GPU
holds which expert, primaries and replicas) and DIR/summary.md.
"""

from __future__ import annotations

import argparse
import sys

from ds_grace.planning.plan import GracePlan, PlanError
from ds_grace.trace import TraceError, load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", help="plan file (JSON) from `ds-grace plan`")
    parser.add_argument(
        "--trace",
        required=True,
        help="routing trace (.npz from import-trace or profile; a route-log .jsonl or OLMoE counts .json also read)",
    )
    parser.add_argument("--out", required=True, help="directory to write the report into")
    parser.add_argument("--layer", type=int, default=0, help="MoE layer the plots show (default 0)")


def run(args: argparse.Namespace) -> int:
    from ds_grace.report import write_report  # matplotlib only when reporting

    try:
        plan = GracePlan.load(args.plan)
        trace = load_trace(args.trace)
        written = write_report(plan, trace, args.out, layer=args.layer)
    except (PlanError, TraceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
