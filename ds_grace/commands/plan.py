"""`ds-grace plan`: build a GracePlan (JSON) from a routing trace.

    ds-grace plan --trace PATH [--trace PATH2 ... [--trace-weights W1 W2 ...]] --nodes N --gpus-per-node G
                  [--policy grace|contiguous|occult|eplb] [--slots-per-gpu S | --extra-slots-per-gpu X] --out plan.json

Memory is per GPU: grace and eplb give every GPU exactly S expert slots (default ceil(E / GPUs) + 1),
all used; contiguous and occult hold ceil(E / GPUs) or fewer.

Options default to the "grace" block of --config (or GraceConfig's defaults); the flags override
single fields. PATH is a trace file (.npz) from `ds-grace import-trace` or `ds-grace profile`; route logs
(.jsonl with a header) and OLMoE counts (.json) are also read directly. Mixtral JSONL records no expert
count: import it with `ds-grace import-trace FILE --num-experts 8`. Several --trace plan for a mix of
traffic kinds (ds_grace/planning/mix.py: each gets a share of the tokens by --trace-weights, equal by
default, so co-activation seen in several profiles counts for more than co-activation seen in one).
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
from ds_grace.planning.mix import mix_traces
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
        action="append",
        help="routing trace (.npz from import-trace or profile; a route-log .jsonl or OLMoE counts .json also "
        "read); repeat it to plan for a mix of per-token profiles",
    )
    parser.add_argument(
        "--trace-weights",
        type=float,
        nargs="+",
        help="with several --trace: each profile's share of the mix (default: equal)",
    )
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node")
    parser.add_argument("--policy", choices=PLANNER_POLICIES, default="grace")
    parser.add_argument("--out", required=True, help="plan file to write (JSON)")
    parser.add_argument("--config", help="ds_config.json whose grace block gives the defaults")
    parser.add_argument(
        "--slots-per-gpu",
        type=int,
        help="expert slots on every GPU (grace, eplb), all used; in [ceil(E / GPUs), E] (default: ceil(E / GPUs) + 1)",
    )
    parser.add_argument(
        "--extra-slots-per-gpu",
        type=int,
        help="slots per GPU beyond ceil(E / GPUs) (0: no replication)",
    )
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
    if args.slots_per_gpu is not None:
        replication.update(enabled=True, slots_per_gpu=args.slots_per_gpu)
    if args.extra_slots_per_gpu is not None:
        if args.extra_slots_per_gpu == 0:
            replication["enabled"] = False
        else:
            replication.update(enabled=True, extra_slots_per_gpu=args.extra_slots_per_gpu)
    return grouping, replication


def _load_traces(paths: list[str], weights: list[float] | None) -> RoutingTrace | ExpertLoads:
    """The one trace, or the weighted mix of several per-token traces (planning/mix.py)."""
    if len(paths) == 1:
        if weights is not None:
            raise TraceError(f"--trace-weights ({weights}) needs several --trace; one was given")
        return load_trace(paths[0])
    return mix_traces([load_trace(path) for path in paths], weights=weights)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_ds_config(args.config)[1] if args.config else None
        topology = Topology(num_nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        trace = _load_traces(args.trace, args.trace_weights)
        if isinstance(trace, ExpertLoads) and args.derive_tokens:
            print(
                f"note: {args.trace[0]} holds loads only; planning on a synthetic per-token trace of "
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
        "slots_per_gpu": sorted({len(slots) for layer in plan.layers for slots in layer.slots}),
        "routing_policy": plan.meta.get("routing_policy"),
        "content_hash": plan.content_hash,
    }
    print(json.dumps(summary))
    return 0
