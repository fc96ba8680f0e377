"""`ds-grace replay-drift`: what happens when served traffic differs from the profile (pure, no ranks).

    ds-grace replay-drift --plan-on A.npz --serve B.npz --nodes N --gpus-per-node G
        [--slots-per-gpu S] [--tokens-per-forward F] [--interval I] [--window W]
        [--online regroup|replicas|off] [--max-bytes-per-interval B] [--expert-bytes X] [--json]

Plans on A, streams B's tokens through the plan in forwards of F tokens and re-plans online every I
forwards on the last W intervals (ds_grace/online/drift.py). Prints per interval: cross-node copies per
token and balancedness of the live plan, EPLB re-planned on the same windows, the copies of a plan
fitted on B, and the bytes the re-plan before that interval moved (instances added x X bytes). With
--json the last line is {"intervals": [{"interval", "copies", "balancedness",
"eplb_replanned_balancedness", "fitted_copies", "bytes_moved", "moves"}, ...]}.
"""

from __future__ import annotations

import argparse
import json
import sys

from ds_grace.config import GraceConfigError
from ds_grace.online.drift import ONLINE_MODES, DriftSpec, replay_drift
from ds_grace.planning.build import resolve_config
from ds_grace.planning.plan import PlanError
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace, TraceError

MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # one Mixtral-8x7B expert in bf16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan-on", required=True, help="per-token trace the plan is fitted on (.npz)")
    parser.add_argument("--serve", required=True, help="per-token trace that is served (.npz)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument(
        "--slots-per-gpu", type=int, help="expert slots on every GPU (default ceil(E / GPUs) + 1)"
    )
    parser.add_argument("--tokens-per-forward", type=int, default=16)
    parser.add_argument("--interval", type=int, default=1, help="forwards per interval")
    parser.add_argument("--window", type=int, default=4, help="intervals the re-planner looks back on")
    parser.add_argument("--online", choices=ONLINE_MODES, default="regroup")
    parser.add_argument(
        "--max-bytes-per-interval",
        type=int,
        help="bytes the re-planner may move per interval (default: no cap)",
    )
    parser.add_argument(
        "--expert-bytes", type=int, default=MIXTRAL_EXPERT_BYTES, help="bytes of one expert's weights"
    )
    parser.add_argument("--json", action="store_true", help="last line: the intervals as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        topology = Topology(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        replication = {} if args.slots_per_gpu is None else {"slots_per_gpu": args.slots_per_gpu}
        config = resolve_config(replication=replication)
        spec = DriftSpec(
            tokens_per_forward=args.tokens_per_forward,
            interval=args.interval,
            window=args.window,
            online=args.online,
            max_bytes_per_interval=args.max_bytes_per_interval,
            expert_nbytes=args.expert_bytes,
        )
        plan_on, serve = RoutingTrace.load(args.plan_on), RoutingTrace.load(args.serve)
        rows = replay_drift(plan_on, serve, topology=topology, spec=spec, config=config)
    except (TraceError, PlanError, GraceConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'interval':>8} {'copies':>7} {'fitted':>7} {'balance':>8} {'eplb':>7} {'MB moved':>9}")
    for row in rows:
        print(
            f"{row['interval']:>8} {row['copies']:>7.3f} {row['fitted_copies']:>7.3f} "
            f"{row['balancedness']:>8.3f} {row['eplb_replanned_balancedness']:>7.3f} "
            f"{row['bytes_moved'] / 1e6:>9.1f}"
        )
    if args.json:
        print(json.dumps({"intervals": rows}))
    return 0
