"""Planner benchmark: speed at scale and plan quality on the shipped routing data.

Speed: 48 MoE layers x 128 experts, top-8, 8 nodes x 8 GPUs, 100k tokens per layer (synthetic
trace), planned with the default grace config on one core (BLAS threads limited to 1). Target:
< 5 s. Quality: the metrics of every policy on the Mixtral traces (2 x 2) and the OLMoE counts
(2 x 2, 2 x 4, 4 x 8, extra slots = 12.5 % of the experts rounded up to a multiple of the GPUs).

Prints a summary and writes benchmarks/results/bench_planner.json.
Usage: python benchmarks/bench_planner.py [--layers 48] [--tokens 100000] [--skip-quality]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from threadpoolctl import threadpool_limits  # noqa: E402

from ds_grace.planning.build import PLANNER_POLICIES, build_plan  # noqa: E402
from ds_grace.planning.metrics import METRIC_KEYS, evaluate_plan  # noqa: E402
from ds_grace.topology import Topology  # noqa: E402
from ds_grace.trace import (  # noqa: E402
    RoutingTrace,
    derive_trace_from_loads,
    load_mixtral_jsonl,
    load_olmoe_counts,
    packaged_traces_dir,
    synthetic,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _rounded(metrics: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if k in METRIC_KEYS}


def bench_speed(*, layers: int, tokens: int, repeats: int) -> dict:
    start = time.perf_counter()
    trace = synthetic(
        num_layers=layers, num_experts=128, top_k=8, num_tokens=tokens, skew=1.0, co_activation=0.5, seed=0
    )
    generated_s = time.perf_counter() - start
    topology = Topology(num_nodes=8, gpus_per_node=8)
    wall, cpu = [], []
    with threadpool_limits(1):
        for _ in range(repeats):
            fresh = RoutingTrace(topk_ids=trace.topk_ids, num_experts=trace.num_experts)  # no cached hash
            wall_0, cpu_0 = time.perf_counter(), time.process_time()
            plan = build_plan(fresh, topology=topology)
            wall.append(time.perf_counter() - wall_0)
            cpu.append(time.process_time() - cpu_0)
    subset = RoutingTrace(topk_ids=tuple(ids[:5000] for ids in trace.topk_ids), num_experts=128)
    metrics = evaluate_plan(subset, plan)
    return {
        "layers": layers,
        "experts": 128,
        "top_k": 8,
        "tokens_per_layer": tokens,
        "topology": "8x8",
        "trace_generation_s": round(generated_s, 2),
        "plan_wall_s": [round(x, 3) for x in wall],
        "plan_cpu_s": [round(x, 3) for x in cpu],
        "plan_cpu_s_worst": round(max(cpu), 3),
        "target_s": 5.0,
        "grouping_ratio": plan.meta["grouping"]["ratio"],
        "replicas_per_layer": plan.meta["replication"]["replicas"] / layers,
        "metrics_on_first_5000_tokens": _rounded(metrics),
    }


def bench_mixtral() -> dict:
    topology = Topology(num_nodes=2, gpus_per_node=2)
    results: dict = {}
    traces = {
        name: load_mixtral_jsonl(packaged_traces_dir() / "mixtral" / f"{name}_2_routing.jsonl", num_experts=8)
        for name in ("gsm8k", "humaneval")
    }
    for name, trace in traces.items():
        other = traces["humaneval" if name == "gsm8k" else "gsm8k"]
        rows = {}
        for policy in PLANNER_POLICIES:
            plan = build_plan(trace, topology=topology, policy=policy)
            rows[policy] = _rounded(evaluate_plan(trace, plan))
        for affinity in ("intra", "intra+inter"):
            plan = build_plan(trace, topology=topology, grouping={"affinity": affinity})
            rows[f"grace[{affinity}]"] = {
                "in_sample": _rounded(evaluate_plan(trace, plan)),
                "on_other_dataset": _rounded(evaluate_plan(other, plan)),
            }
        results[name] = rows
    return results


def bench_olmoe() -> dict:
    results: dict = {}
    for dataset in ("wikipedia", "github"):
        loads = load_olmoe_counts(packaged_traces_dir() / "olmoe" / "expert_counts" / f"{dataset}.json")
        derived = derive_trace_from_loads(loads, num_tokens=8192, seed=0)
        for nodes, gpus in ((2, 2), (2, 4), (4, 8)):
            topology = Topology(num_nodes=nodes, gpus_per_node=gpus)
            world = topology.world_size
            extra_total = math.ceil(math.ceil(0.125 * loads.num_experts) / world) * world
            extra = extra_total // world
            row = {"extra_slots_per_gpu": extra}
            for policy in ("contiguous", "eplb", "grace"):
                source = derived if policy == "grace" else loads
                plan = build_plan(
                    source, topology=topology, policy=policy, replication={"extra_slots_per_gpu": extra}
                )
                row[policy] = _rounded(evaluate_plan(loads, plan))
            results[f"{dataset}_{nodes}x{gpus}"] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_planner.json")
    args = parser.parse_args()
    report: dict = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }
    report["speed"] = bench_speed(layers=args.layers, tokens=args.tokens, repeats=args.repeats)
    speed = report["speed"]
    print(
        f"planning {args.layers} layers x 128 experts, 8x8 GPUs, {args.tokens} tokens: "
        f"cpu {speed['plan_cpu_s']} s, wall {speed['plan_wall_s']} s (target < 5 s)"
    )
    if not args.skip_quality:
        report["mixtral_2x2"] = bench_mixtral()
        report["olmoe"] = bench_olmoe()
        for name, rows in report["mixtral_2x2"].items():
            for policy, metrics in rows.items():
                print(f"mixtral {name:9s} {policy:18s} {json.dumps(metrics)}")
        for name, row in report["olmoe"].items():
            balance = {k: v["balancedness"] for k, v in row.items() if isinstance(v, dict)}
            print(f"olmoe {name:15s} extra/gpu={row['extra_slots_per_gpu']} balancedness {balance}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
