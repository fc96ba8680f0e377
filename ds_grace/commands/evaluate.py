"""`ds-grace evaluate`: metrics of a plan on a routing trace.

    ds-grace evaluate --trace PATH --plan plan.json [--json] [--routing-policy tar|wrr|primary]

With --json, prints one JSON object holding cross_node_copies_per_token, cross_gpu_copies_per_token,
balancedness, max_gpu_load_ratio and vanilla_cross_node_copies_per_token (null where the trace
cannot give one, e.g. loads-only traces), plus the policies used.
"""

from __future__ import annotations

import argparse
import json
import sys

from ds_grace.planning.metrics import METRIC_KEYS, evaluate_plan
from ds_grace.planning.plan import GracePlan, PlanError
from ds_grace.trace import TraceError, load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        required=True,
        help="routing trace (.npz from import-trace or profile; a route-log .jsonl or OLMoE counts .json also read)",
    )
    parser.add_argument("--plan", required=True, help="plan file (JSON) from `ds-grace plan`")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--routing-policy",
        choices=("tar", "wrr", "primary"),
        help="routing to evaluate with (default: the one the plan was built for)",
    )
    parser.add_argument("--per-layer", action="store_true", help="include each layer's values")


def run(args: argparse.Namespace) -> int:
    try:
        plan = GracePlan.load(args.plan)
        trace = load_trace(args.trace)
        metrics = evaluate_plan(trace, plan, routing_policy=args.routing_policy, per_layer=args.per_layer)
    except (PlanError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics["trace_matches_plan"] = plan.trace_fingerprint == trace.fingerprint
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(
        f"plan {args.plan} ({plan.policy}, {plan.topology}, routing {metrics['routing_policy']}) on {args.trace}"
    )
    for key in METRIC_KEYS:
        value = metrics[key]
        print(f"  {key:38s} {'n/a' if value is None else f'{value:.4f}'}")
    return 0
