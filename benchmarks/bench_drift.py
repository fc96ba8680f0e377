"""Drift benchmark: plans fitted on one kind of traffic serve another, re-planned online (pure, no ranks).

Pairs (the shipped real traces): Mixtral-8x7B gsm8k -> humaneval and the reverse; Qwen1.5-MoE and OLMoE
route logs, first half of the tokens -> second half (the logs carry one request id for every line, so
they cannot be split by request: their first half is mostly prefill, the second decode). Each pair is
replayed by ``ds_grace.online.drift.replay_drift`` (as ``ds-grace replay-drift``) with online mode
off, replicas and regroup, at 2x2 and 2x4, S = ceil(E / GPUs) + 1. Intervals hold 32 tokens (Mixtral:
246-337 tokens per trace) or 128 (Qwen1.5, OLMoE); the window is 4 intervals. Budget: at most 10 % of
all expert slots (layers x GPUs x S) move per interval, in bytes of one expert (``--expert-bytes``).

Targets, on the intervals from the 4th after the shift on (mean): cross-node copies <= 1.05 x the plan
fitted on the served trace, balancedness >= EPLB re-planned on the same windows, bytes moved per
interval <= the budget.
Prints a summary and writes benchmarks/results/bench_drift.json.
Usage: python benchmarks/bench_drift.py [--pairs mixtral_gsm8k_to_humaneval ...] [--shapes 2x2 2x4]
       [--window 4]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from ds_grace.files import write_text_atomic  # noqa: E402
from ds_grace.online.drift import ONLINE_MODES, DriftSpec, replay_drift  # noqa: E402
from ds_grace.topology import Topology  # noqa: E402
from ds_grace.trace import (  # noqa: E402
    RoutingTrace,
    load_mixtral_jsonl,
    load_route_logs,
    packaged_traces_dir,
    split_trace,
)

RESULTS = Path(__file__).resolve().parent / "results"
QWEN_LAYERS = (0, 8, 12, 18, 23)
SETTLE = 4  # intervals after the shift before the targets apply
BUDGET_SHARE = 0.10
COPIES_TARGET = 1.05


def pairs() -> dict[str, tuple[RoutingTrace, RoutingTrace, int]]:
    """name -> (profile, served, tokens per interval)."""
    root = packaged_traces_dir()
    mixtral = {
        name: load_mixtral_jsonl(root / "mixtral" / f"{name}_2_routing.jsonl", num_experts=8)
        for name in ("gsm8k", "humaneval")
    }
    qwen = load_route_logs([root / "qwen15_moe" / f"moe_layer{layer}.jsonl" for layer in QWEN_LAYERS])
    olmoe = load_route_logs([root / "olmoe_tokens" / "moe_routes_layer0.jsonl"])
    return {
        "mixtral_gsm8k_to_humaneval": (mixtral["gsm8k"], mixtral["humaneval"], 32),
        "mixtral_humaneval_to_gsm8k": (mixtral["humaneval"], mixtral["gsm8k"], 32),
        "qwen15_moe_first_to_second_half": (*split_trace(qwen, fraction=0.5), 128),
        "olmoe_tokens_first_to_second_half": (*split_trace(olmoe, fraction=0.5), 128),
    }


def run_pair(
    profile: RoutingTrace, served: RoutingTrace, tokens: int, topology: Topology, *, window: int = 4
) -> dict:
    slots = -(-profile.num_experts // topology.world_size) + 1
    budget_copies = int(BUDGET_SHARE * profile.num_layers * topology.world_size * slots)
    row: dict = {"slots_per_gpu": slots, "budget_expert_copies_per_interval": budget_copies}
    for mode in ONLINE_MODES:
        spec = DriftSpec(
            tokens_per_forward=tokens,
            window=window,
            online=mode,
            max_bytes_per_interval=budget_copies,
            expert_nbytes=1,
        )
        intervals = replay_drift(profile, served, topology=topology, spec=spec)
        settled = intervals[SETTLE:]

        def mean(key: str, rows: list[dict] = settled) -> float:
            return round(float(np.mean([r[key] for r in rows])), 4)

        copies, fitted = mean("copies"), mean("fitted_copies")
        balance, eplb = mean("balancedness"), mean("eplb_replanned_balancedness")
        row[mode] = {
            "intervals": intervals,
            "settled": {
                "copies": copies,
                "fitted_copies": fitted,
                "balancedness": balance,
                "eplb_replanned_balancedness": eplb,
                "max_copies_moved": max(r["bytes_moved"] for r in intervals),
            },
            "copies_met": copies <= COPIES_TARGET * fitted,
            "balance_met": balance >= eplb,
            "budget_met": max(r["bytes_moved"] for r in intervals) <= budget_copies,
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="*")
    parser.add_argument("--shapes", nargs="*", default=["2x2", "2x4"])
    parser.add_argument("--window", type=int, default=4, help="intervals of history each re-plan sees")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_drift.json")
    args = parser.parse_args()
    report: dict = {
        "budget_share_of_slots": BUDGET_SHARE,
        "settle_intervals": SETTLE,
        "window": args.window,
        "rows": {},
    }
    for name, (profile, served, tokens) in pairs().items():
        if args.pairs and name not in args.pairs:
            continue
        for shape in args.shapes:
            nodes, gpus = (int(x) for x in shape.split("x"))
            topology = Topology(num_nodes=nodes, gpus_per_node=gpus)
            row = run_pair(profile, served, tokens, topology, window=args.window)
            report["rows"][f"{name}_{shape}"] = row
            for mode in ONLINE_MODES:
                s = row[mode]["settled"]
                print(
                    f"{name:34s} {shape} {mode:8s} copies {s['copies']:.3f} (fitted {s['fitted_copies']:.3f}, "
                    f"{'met' if row[mode]['copies_met'] else 'MISSED'})  balance {s['balancedness']:.3f} "
                    f"(eplb re-planned {s['eplb_replanned_balancedness']:.3f}, "
                    f"{'met' if row[mode]['balance_met'] else 'MISSED'})  moved <= {s['max_copies_moved']} "
                    f"of {row['budget_expert_copies_per_interval']} copies",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
