"""Online replication on vs off while Mixtral's routing shifts from gsm8k to humaneval.

Shape legend: T tokens per rank per step, D hidden, L replayed layers.

Replays real Mixtral-8x7B routing (ds_grace/data/traces/mixtral) of several MoE layers through
GraceMoE layers on local gloo ranks: the first steps route gsm8k tokens, the rest humaneval tokens.
All variants start from the same offline plan (replicas planned on gsm8k). Variants: "off" (the
offline plan stays), "on" (no byte budget) and "on_budget" (max_bytes_per_interval). Per step the
live plan's predicted balancedness (mean / max GPU load) on the phase's whole-trace loads is
recorded, per interval the balancedness the monitor measured, and per migration its bytes
(cross-node among them), transfer time and the time forwards stalled for it. Every forward's
output is checked against a single-process reference.

    python benchmarks/bench_online.py [--layers 8 15 21 25] [--steps 16 48] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ds_grace.comm.local_ranks import run_on_ranks
from ds_grace.files import save_figure, write_text_atomic
from ds_grace.online.replay import ReplaySpec, replay_many
from ds_grace.topology import Topology

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _summarise(name: str, ranks: list[dict[str, Any]], *, shift: int, threshold: float) -> dict[str, Any]:
    live = ranks[0]["live_balancedness"]
    after = live[shift:]
    mean_after = statistics.fmean(statistics.fmean(row) for row in after)
    recovered = next(
        (s for s in range(shift, len(live)) if all(min(row) >= threshold for row in live[s:])), None
    )
    forward_ms = [1e3 * max(r["forward_s"][s] for r in ranks) for s in range(len(live))]
    summary: dict[str, Any] = {
        "variant": name,
        "max_abs_diff": max(r["max_abs_diff"] for r in ranks),
        "mean_balancedness_before_shift": statistics.fmean(statistics.fmean(row) for row in live[:shift]),
        "mean_balancedness_after_shift": mean_after,
        "min_balancedness_last_quarter": min(min(row) for row in live[-max(1, len(after) // 4) :]),
        "steps_to_recover": None if recovered is None else recovered - shift,
        "forward_ms_median": statistics.median(forward_ms),
        "forward_ms_max": max(forward_ms),
        "live_balancedness": live,
        "forward_ms": forward_ms,
    }
    if "metrics" in ranks[0]:
        metrics = ranks[0]["metrics"]
        summary["migrations"] = metrics["migrations"]
        summary["intervals"] = metrics["intervals"]
        summary["bytes_moved_total"] = metrics["bytes_moved_total"]
        summary["max_boundary_ms"] = 1e3 * max(
            max(r["boundary_s"] for r in rank["metrics"]["intervals"]) for rank in ranks
        )
    return summary


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), gridspec_kw={"height_ratios": [3, 2]})
    shift, threshold = results["shift_step"], results["threshold"]
    for variant in results["variants"]:
        worst = [min(row) for row in variant["live_balancedness"]]
        top.plot(range(len(worst)), worst, label=f"{variant['variant']} (worst layer)")
    top.axhline(threshold, color="grey", linestyle="--", label=f"threshold {threshold}")
    top.axvline(shift, color="black", linestyle=":", label="gsm8k -> humaneval")
    top.set_xlabel("forward pass")
    top.set_ylabel("predicted balancedness (mean/max GPU load)")
    top.set_title(f"Mixtral layers {results['layers']} on {results['topology']}")
    top.legend(loc="lower left", fontsize=8)
    labels, mbytes, seconds = [], [], []
    for variant in results["variants"]:
        for i, migration in enumerate(variant.get("migrations", [])):
            labels.append(f"{variant['variant']}#{i}\n@{migration['switched_at_step']}")
            mbytes.append(migration["bytes_moved"] / 2**20)
            seconds.append(migration["transfer_s"])
    bars = bottom.bar(range(len(labels)), mbytes, color="tab:blue")
    for bar, sec in zip(bars, seconds):
        bottom.annotate(
            f"{1e3 * sec:.0f} ms",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    bottom.set_xticks(range(len(labels)), labels, fontsize=7)
    bottom.set_ylabel("MiB moved per migration")
    bottom.set_title("migrations (label: variant#index @switch step; annotation: transfer time)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 15, 21, 25], help="Mixtral trace layers")
    parser.add_argument(
        "--steps", type=int, nargs=2, default=[16, 48], help="forwards on gsm8k, then humaneval"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank per forward")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.85)
    parser.add_argument("--budget", type=int, default=2 * 2**20, help="max_bytes_per_interval of on_budget")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "bench_online.json")
    args = parser.parse_args(argv)
    topology = Topology(args.nodes, args.gpus_per_node)
    online = {"enabled": True, "interval": args.interval, "window": args.window, "threshold": args.threshold}
    common = {
        "trace_layers": tuple(args.layers),
        "steps": tuple(args.steps),
        "tokens_per_rank": args.tokens,
        "hidden": args.hidden,
    }
    variants = {
        "off": ReplaySpec(**common, online=None),
        "on": ReplaySpec(**common, online=online),
        "on_budget": ReplaySpec(**common, online={**online, "max_bytes_per_interval": args.budget}),
    }
    begin = time.perf_counter()
    by_rank = run_on_ranks(replay_many, topology=topology, args=(tuple(variants.values()),), timeout_s=1800)
    wall_s = time.perf_counter() - begin
    results: dict[str, Any] = {
        "benchmark": "bench_online",
        "topology": str(topology),
        "layers": args.layers,
        "steps": args.steps,
        "shift_step": args.steps[0],
        "tokens_per_rank": args.tokens,
        "hidden": args.hidden,
        "interval": args.interval,
        "window": args.window,
        "threshold": args.threshold,
        "budget_bytes": args.budget,
        "wall_s": wall_s,
        "host": {
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(),
        },
        "variants": [
            _summarise(
                name,
                [by_rank[r][i] for r in range(topology.world_size)],
                shift=args.steps[0],
                threshold=args.threshold,
            )
            for i, name in enumerate(variants)
        ],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(results, indent=1))
    png = args.output.with_suffix(".png")
    _plot(results, png)
    print(f"online replication, Mixtral layers {args.layers}, {topology}, shift at forward {args.steps[0]}")
    print(
        f"{'variant':<10} {'bal before':>10} {'bal after':>10} {'worst last 1/4':>14} {'recover':>8} "
        f"{'fwd ms p50':>10} {'fwd ms max':>10} {'MiB moved':>9} {'max diff':>9}"
    )
    for v in results["variants"]:
        moved = v.get("bytes_moved_total", 0) / 2**20
        recover = "-" if v["steps_to_recover"] is None else str(v["steps_to_recover"])
        print(
            f"{v['variant']:<10} {v['mean_balancedness_before_shift']:>10.3f} {v['mean_balancedness_after_shift']:>10.3f} "
            f"{v['min_balancedness_last_quarter']:>14.3f} {recover:>8} {v['forward_ms_median']:>10.1f} "
            f"{v['forward_ms_max']:>10.1f} {moved:>9.2f} {v['max_abs_diff']:>9.1e}"
        )
    for v in results["variants"]:
        for m in v.get("migrations", []):
            print(
                f"  {v['variant']}: layers {m['layers']} decided @{m['decided_at_step']} live @{m['switched_at_step']}: "
                f"{m['replicas_added']} replicas in, {m['replicas_freed']} freed, {m['bytes_moved'] / 2**20:.2f} MiB "
                f"({m['cross_node_bytes'] / 2**20:.2f} cross-node) over {m['transfer_intervals']} interval(s), "
                f"transfer {1e3 * m['transfer_s']:.0f} ms, stall {1e3 * m['stall_s']:.1f} ms"
            )
    print(f"wrote {args.output} and {png} ({wall_s:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
