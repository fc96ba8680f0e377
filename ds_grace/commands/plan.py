"""`ds-grace plan`: build a GracePlan (JSON) from a routing trace.

    ds-grace plan --trace PATH --nodes N --gpus-per-node G [--policy grace|contiguous|occult|eplb]
                  [--extra-slots-per-gpu S] --out plan.json

Options default to the "grace" block of --config (or GraceConfig's defaults); the flags override
single fields. PATH is a trace file (.npz) from `ds-grace import-trace` or `ds-grace profile`; route logs
(.jsonl with a header) and OLMoE counts (.json) are also read directly. Mixtral JSONL records no expert
count: import it with `ds-grace import-trace FILE --num-experts 8`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from ds_grace.config import GraceConfigError, load_ds_config
from ds_grace.planning.build import PLANNER_POLICIES, build_plan
from ds_grace.planning.grouping import GroupingError
from ds_grace.planning.plan import PlanError
from ds_grace.planning.replication import ReplicationError
from ds_grace.topology import Topology
from ds_grace.trace import ExpertLoads, RoutingTrace, TraceError, derive_trace_from_loads, load_trace

PLANNING_ERRORS = (GraceConfigError, GroupingError, PlanError, ReplicationError, TraceError, ValueError)


def _ratio(value: str) -> float | str:
    return value if value == "auto" else float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trace",
        required=True,
        help="routing trace (.npz from import-trace or profile; a route-log .jsonl or OLMoE counts .json also read)",
    )
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    parser.add_argument("--policy", choices=PLANNER_POLICIES, default="grace")
    parser.add_argument("--out", required=True, help="plan file to write (JSON)")
    parser.add_argument("--config", help="ds_config.json whose grace block gives the defaults")
    parser.add_argument("--extra-slots-per-gpu", type=int, help="replica slots per GPU (0: no replication)")
    parser.add_argument("--replication-mode", choices=("paper", "budget"))
    parser.add_argument("--ratio", type=_ratio, help='GPU-level size slack r in [0, 1] or "auto"')
    parser.add_argument("--affinity", choices=("intra", "intra+inter"))
    parser.add_argument("--max-experts-per-gpu", type=int, help="memory cap: slots per GPU")
    parser.add_argument("--routing-policy", choices=("tar", "wrr", "primary"))
    parser.add_argument(
        "--derive-tokens",
        type=int,
        help="for loads-only traces: plan on a synthetic per-token trace of this many tokens matching the loads",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --derive-tokens")


def overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    grouping: dict[str, Any] = {}
    replication: dict[str, Any] = {}
    if args.ratio is not None:
        grouping["ratio"] = args.ratio
    if args.affinity is not None:
        grouping["affinity"] = args.affinity
    if args.max_experts_per_gpu is not None:
        grouping["max_experts_per_gpu"] = args.max_experts_per_gpu
    if args.replication_mode is not None:
        replication["mode"] = args.replication_mode
    if args.extra_slots_per_gpu is not None:
        if args.extra_slots_per_gpu == 0:
            replication["enabled"] = False
        else:
            replication.update(enabled=True, extra_slots_per_gpu=args.extra_slots_per_gpu)
    return grouping, replication


def run(args: argparse.Namespace) -> int:
    try:
        config = load_ds_config(args.config)[1] if args.config else None
        topology = Topology(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        trace: RoutingTrace | ExpertLoads = load_trace(args.trace)
        if isinstance(trace, ExpertLoads) and args.derive_tokens:
            print(
                f"note: {args.trace} holds loads only; planning on a synthetic per-token trace of "
                f"{args.derive_tokens} tokens whose loads match it (its co-activation is synthetic)",
                file=sys.stderr,
            )
            source = derive_trace_from_loads(trace, num_tokens=args.derive_tokens, seed=args.seed)
        else:
            source = trace
        grouping, replication = overrides(args)
        plan = build_plan(
            source,
            topology=topology,
            policy=args.policy,
            config=config,
            grouping=grouping,
            replication=replication,
            routing_policy=args.routing_policy,
        )
        if source is not trace:
            plan = dataclasses.replace(
                plan,
                trace_fingerprint=trace.fingerprint,
                meta={**plan.meta, "derived_tokens": args.derive_tokens},
            )
        plan.save(args.out)
    except PLANNING_ERRORS as exc:
        hint = ""
        if isinstance(exc, PlanError) and "needs per-token routing" in str(exc):
            hint = " (on the command line: --derive-tokens N)"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 2
    summary = {
        "out": str(args.out),
        "policy": plan.policy,
        "topology": str(plan.topology),
        "layers": plan.num_layers,
        "experts": plan.num_experts,
        "replicas": sum(layer.replica_count() for layer in plan.layers),
        "routing_policy": plan.meta.get("routing_policy"),
        "content_hash": plan.content_hash,
    }
    print(json.dumps(summary))
    return 0
