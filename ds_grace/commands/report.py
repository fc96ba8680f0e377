"""`ds-grace report`: plots and a markdown summary of a plan.

    ds-grace report plan.json --trace PATH --out DIR [--layer L] [--held-out HELD_OUT]

Writes DIR/affinity.png (affinity heatmap on a log scale, experts ordered by primary GPU with GPU and node
boundaries drawn; per-token traces only),
DIR/gpu_load.png (expected per-GPU load without and with replicas), DIR/placement.png (which GPU
holds which expert, primaries and replicas) and DIR/summary.md. With --held-out (traffic the plan was not
fitted to, e.g. the second part from `ds-grace split-trace`), also DIR/held_out.png: per-GPU load, balancedness (higher is better) and cross-node copies (lower is
better) on separate axes, in-sample next to held-out, with a table in summary.md.
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
    parser.add_argument(
        "--held-out", help="a trace the plan was not fitted to: plots in-sample next to held-out"
    )


def run(args: argparse.Namespace) -> int:
    from ds_grace.report import write_report  # matplotlib only when reporting

    try:
        plan = GracePlan.load(args.plan)
        trace = load_trace(args.trace)
        held_out = load_trace(args.held_out) if args.held_out else None
        written = write_report(plan, trace, args.out, layer=args.layer, held_out=held_out)
    except (PlanError, TraceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
