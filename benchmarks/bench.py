"""`ds-grace bench`: full GRACE vs the sparse peers, vanilla DeepSpeed-MoE and GRACE's ablation ladder.

    python benchmarks/bench.py [--rates 50 200] [--mode auto|netns|local] [--quick]
    ds-grace bench ...   (the same)

Steps: build the workloads (replayed routing, ds_grace/data/traces) and the GRACE plans once, here;
then per setting (inter-node rate) start the rank script benchmarks/worker.py on the emulated
2 nodes x 2 ranks (network namespaces + tc, real deepspeed launcher; needs root) or, without root,
on plain local ranks with the declared topology; collect rank 0's results; write one JSON row per
(workload, setting, system), PNG plots and the markdown table of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.hardware import emulated_kappa, mimicked_profile  # noqa: E402
from benchmarks.systems import (  # noqa: E402
    BASELINE,
    DEEPEP_LIKE,
    FULL_GRACE,
    PEERS,
    SYSTEM_BY_NAME,
    build_plans,
    select_systems,
)
from benchmarks.workloads import (  # noqa: E402
    DEFAULT_MODELS,
    MODELS,
    SYNTHETIC_MODELS,
    WorkloadSpec,
    calibration_and_replay,
    default_workloads,
    replay_batches,
    spec_to_dict,
)
from ds_grace.files import write_text_atomic  # noqa: E402
from ds_grace.topology import Topology  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
README = REPO_ROOT / "benchmarks" / "README.md"
WORKER = REPO_ROOT / "benchmarks" / "worker.py"
TABLE_START, TABLE_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
DEFAULT_RATES = (50.0, 200.0)
# max |y - reference| allowed for "parity", times max(1, max |reference|): fp32 sums in another order
PARITY_TOLERANCE = 1e-5
ROW_FIELDS = (
    "workload", "setting", "system", "label", "mode", "rate_mbit", "median_ms", "p90_ms",
    "model_forward_median_ms", "model_forward_p90_ms", "expert_median_ms", "bytes_intra_node", "bytes_cross_node",
    "dropped_routes", "routes", "max_abs_diff", "parity", "speedup_vs_vanilla_lossless",
    "cross_node_bytes_vs_vanilla_lossless", "best_peer", "speedup_vs_best_peer", "speedup_vs_best_peer_ci95",
    "compute_link_kappa", "forwards",
)  # fmt: skip


@dataclass(frozen=True)
class Setting:
    name: str
    mode: str  # "netns" or "local"
    rate_mbit: float | None


class BenchError(RuntimeError):
    """A setting's cluster run failed; the message holds the failing ranks' output."""


def prepare(
    workdir: Path,
    *,
    workloads: Sequence[WorkloadSpec],
    systems: Sequence[str],
    topology: Topology,
    seed: int,
    timeout_s: float,
    model_forward: bool = False,
    quick: bool = False,
) -> dict[str, Any]:
    """Write the spec, the replayed batches and the plans into `workdir`; return the spec (plus plan metrics)."""
    from ds_grace.planning.metrics import evaluate_plan

    chosen = select_systems(list(systems))
    spec: dict[str, Any] = {
        "workdir": str(workdir), "topology": {"num_nodes": topology.num_nodes, "gpus_per_node": topology.gpus_per_node},
        "systems": [s.name for s in chosen], "seed": seed, "timeout_s": timeout_s, "workloads": [],
    }  # fmt: skip
    plan_metrics: dict[str, Any] = {}
    traces: dict[str, Any] = {}
    for workload in workloads:
        if workload.model not in traces:
            calibration, replay = calibration_and_replay(workload.model)
            plans = build_plans(calibration, topology, chosen)
            for key, plan in plans.items():
                plan.save(workdir / f"{workload.model}.{key}.plan.json")
            traces[workload.model] = (replay, plans)
            plan_metrics[workload.model] = {
                key: {k: v for k, v in evaluate_plan(replay, plan).items() if k != "per_layer"}
                for key, plan in plans.items()
            }
        replay, plans = traces[workload.model]
        replay_batches(workload, replay, seed=seed).save(workdir / f"{workload.name}.replay.npz")
        spec["workloads"].append({**spec_to_dict(workload), "plans": sorted(plans)})
    if model_forward:
        from benchmarks.model_forward import prepare_model

        spec["model"] = prepare_model(workdir, topology, sequences=2 if quick else 4, length=16 if quick else 32,
                                      steps=2 if quick else 6, warmup=1)  # fmt: skip
    write_text_atomic(workdir / "spec.json", json.dumps(spec, indent=1))
    return {**spec, "plan_metrics": plan_metrics}


def _cluster_tool() -> Any:
    from ds_grace.commands.cluster import load_tool

    return load_tool()


def resolve_settings(mode: str, rates: Sequence[float]) -> list[Setting]:
    """netns settings (one per rate) when the emulated cluster can run here, else one local setting."""
    if mode == "auto":
        reason = _cluster_tool().netns_unavailable_reason()
        if reason is not None:
            print(f"emulated cluster unavailable ({reason}); using plain local ranks", file=sys.stderr)
        mode = "local" if reason else "netns"
    if mode == "netns":
        return [Setting(f"{rate:g}mbit", "netns", float(rate)) for rate in rates]
    if mode == "local":
        return [Setting("local", "local", None)]
    raise ValueError(f"mode ({mode!r}) must be one of auto, netns, local")


def _progress_watcher(path: Path, bar: Any, stop: threading.Event) -> None:
    """Follow rank 0's progress file ("done total workload" per forward) on a tqdm bar."""
    seen, current = 0, ""
    while not stop.wait(0.5):
        lines = path.read_text().splitlines() if path.exists() else []
        if not lines:
            continue
        done, total, name = lines[-1].split(maxsplit=2)
        if int(done) == seen:
            continue
        bar.total = int(total)
        if name != current:
            bar.set_postfix_str(name, refresh=False)
            current = name
        bar.update(int(done) - seen)
        seen = int(done)


def run_setting(
    setting: Setting, *, workdir: Path, topology: Topology, timeout_s: float, quiet: bool = False
) -> dict[str, Any]:
    """Run the worker on every rank for one setting; rank 0's results plus the cluster run's facts."""
    from tqdm import tqdm

    tool = _cluster_tool()
    progress = workdir / "progress.txt"
    progress.unlink(missing_ok=True)
    common = dict(
        nodes=topology.num_nodes, ranks_per_node=topology.gpus_per_node, timeout_s=timeout_s, pass_local_rank=False,
        failure_grace_s=30.0, cwd=str(REPO_ROOT),
    )  # fmt: skip
    stop = threading.Event()
    bar = tqdm(total=1, desc=f"{setting.name} ({setting.mode})", unit="fwd", disable=quiet, leave=True)
    watcher = threading.Thread(target=_progress_watcher, args=(progress, bar, stop), daemon=True)
    watcher.start()
    try:
        if setting.mode == "netns":
            run = tool.run_emulated(
                WORKER, [str(workdir / "spec.json")], rate_mbit=setting.rate_mbit, **common
            )
        else:
            run = tool.run_local_ranks(WORKER, [str(workdir / "spec.json")], **common)
    finally:
        stop.set()
        watcher.join()
        bar.close()
    records = [record for rank in run.ranks for record in rank.json_lines() if "bench_result" in record]
    if not run.ok or not records:
        details = []
        for rank in run.ranks:
            if rank.exit_code != 0 or not records:
                details.append(
                    f"--- rank {rank.rank} exit {rank.exit_code} ---\n" + "\n".join(rank.stderr[-25:])
                )
        raise BenchError(f"setting {setting.name} failed ({'timed out' if run.timed_out else 'rank failure'}):\n"
                         + "\n".join(details))  # fmt: skip
    return {
        "results": records[0]["bench_result"], "wall_s": run.wall_s, "mode": run.mode,
        "link_bytes": run.link_bytes,
    }  # fmt: skip


def build_rows(
    spec: dict[str, Any], setting: Setting, outcome: dict[str, Any], topology: Topology
) -> list[dict[str, Any]]:
    rows = []
    model_of = {w["name"]: w["model"] for w in spec["workloads"]}
    for name, result in outcome["results"].items():
        systems = result["systems"]
        base = systems[BASELINE]
        model = model_of.get(name)
        peers = {peer: systems[peer]["median_ms"] for peer in PEERS if peer in systems}
        best_peer = min(peers, key=peers.__getitem__) if peers else None
        kappa = None
        if model is not None and setting.rate_mbit is not None and result["expert_s_per_row"] is not None:
            shape = MODELS[model]
            kappa = emulated_kappa(
                shape, rate_mbit=setting.rate_mbit, ranks_per_node=topology.gpus_per_node,
                expert_s_per_row=result["expert_s_per_row"],
            )  # fmt: skip
        for system_name, measured in systems.items():
            system = SYSTEM_BY_NAME[system_name]
            scale = measured.get("reference_scale", 1.0)  # max(1, max |reference|)
            rows.append({
                "workload": name, "setting": setting.name, "system": system_name, "label": system.label,
                "group": system.group, "synthetic": model in SYNTHETIC_MODELS,
                "mode": setting.mode, "rate_mbit": setting.rate_mbit,
                "median_ms": measured["median_ms"], "p90_ms": measured["p90_ms"],
                "model_forward_median_ms": measured.get("model_forward_median_ms"),
                "model_forward_p90_ms": measured.get("model_forward_p90_ms"),
                "model_forward_speedup_vs_vanilla_lossless": (
                    base["model_forward_median_ms"] / measured["model_forward_median_ms"]
                    if measured.get("model_forward_median_ms") else None
                ),
                "expert_median_ms": measured["expert_median_ms"],
                "bytes_intra_node": measured["bytes_intra_node"], "bytes_cross_node": measured["bytes_cross_node"],
                "dropped_routes": measured["dropped_routes"], "routes": measured["routes"],
                "max_abs_diff": measured["max_abs_diff"],
                "parity": measured["max_abs_diff"] <= PARITY_TOLERANCE * scale,
                "speedup_vs_vanilla_lossless": base["median_ms"] / measured["median_ms"] if measured["median_ms"] else None,
                "cross_node_bytes_vs_vanilla_lossless": (
                    measured["bytes_cross_node"] / base["bytes_cross_node"] if base["bytes_cross_node"] else None
                ),
                "best_peer": best_peer,
                "speedup_vs_best_peer": (
                    peers[best_peer] / measured["median_ms"] if best_peer and measured["median_ms"] else None
                ),
                "speedup_vs_best_peer_ci95": (
                    speedup_ci95(measured["per_forward_ms"], [systems[p]["per_forward_ms"] for p in peers])
                    if system_name not in peers else None
                ),
                "paths": measured.get("paths") if system.kind == "grace" else None,
                "compute_link_kappa": kappa, "forwards": measured["forwards"],
                "per_forward_ms": measured["per_forward_ms"],
                "predicted_flat_median_ms": measured.get("predicted_flat_median_ms"),
                "predicted_hier_median_ms": measured.get("predicted_hier_median_ms"),
                "reference_scale": scale, "capacity_max": measured["capacity_max"],
                "expert_s_per_row": result["expert_s_per_row"],
            })  # fmt: skip
    return rows


BOOTSTRAP_RESAMPLES = 2000


def speedup_ci95(system_ms: Sequence[float], peers_ms: Sequence[Sequence[float]]) -> list[float] | None:
    """95 % interval of (best peer's median / this system's median), by a paired bootstrap over forwards.

    Forward i of every system replays the same tokens (systems interleaved), so forwards are resampled
    together; the best peer is re-chosen in every resample, so the interval carries that choice too.
    """
    if not peers_ms or len(system_ms) < 3 or any(len(p) != len(system_ms) for p in peers_ms):
        return None
    from scipy.stats import bootstrap

    def ratio(system: np.ndarray, *peers: np.ndarray, axis: int = -1) -> np.ndarray:
        best = np.min([np.median(p, axis=axis) for p in peers], axis=0)
        return best / np.median(system, axis=axis)

    result = bootstrap(
        (np.asarray(system_ms), *(np.asarray(p) for p in peers_ms)), ratio, paired=True, vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95, method="percentile", rng=np.random.default_rng(0),
    )  # fmt: skip
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def target_check(rows: list[dict[str, Any]], settings: list[Setting]) -> dict[str, Any]:
    """The targets for full GRACE (`grace`), per rated setting and workload: median <= the best peer's
    (prefill at the slowest link: >= 1.1x), cross-node bytes <= the DeepEP-like peers', zero drops, parity."""
    rated = [s for s in settings if s.rate_mbit is not None]
    slowest = min(rated, key=lambda s: s.rate_mbit or 0.0) if rated else settings[0]
    by_key = {(r["workload"], r["setting"], r["system"]): r for r in rows}
    checks: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["system"] != FULL_GRACE or row["speedup_vs_best_peer"] is None:
            continue
        prefill = row["workload"].endswith("-prefill")
        needed = 1.1 if prefill and row["setting"] == slowest.name else 1.0
        deepep = [by_key[(row["workload"], row["setting"], p)] for p in DEEPEP_LIKE
                  if (row["workload"], row["setting"], p) in by_key]  # fmt: skip
        least_deepep = min((r["bytes_cross_node"] for r in deepep), default=None)
        checks.setdefault(row["setting"], {})[row["workload"]] = {
            "speedup_vs_best_peer": row["speedup_vs_best_peer"], "best_peer": row["best_peer"],
            "speedup_vs_best_peer_ci95": row.get("speedup_vs_best_peer_ci95"),
            "speedup_needed": needed, "speed_met": row["speedup_vs_best_peer"] >= needed,
            "speedup_vs_vanilla_lossless": row["speedup_vs_vanilla_lossless"],
            "cross_node_bytes": row["bytes_cross_node"], "deepep_like_cross_node_bytes": least_deepep,
            "bytes_met": least_deepep is None or row["bytes_cross_node"] <= least_deepep,
            "zero_drops": row["dropped_routes"] == 0, "parity": row["parity"], "max_abs_diff": row["max_abs_diff"],
            "paths": row["paths"],
        }  # fmt: skip
    return {"system": FULL_GRACE, "slowest_setting": slowest.name, "settings": checks}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per (workload, setting, system)."""
    head = ("| workload | setting | system | median ms | p90 ms | expert ms | cross-node MB | intra-node MB | "
            "dropped | max abs diff | vs lossless | vs best peer | kappa |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        kappa = "" if row["compute_link_kappa"] is None else f"{row['compute_link_kappa']:.2g}"
        expert = "" if row["expert_median_ms"] is None else f"{row['expert_median_ms']:.1f}"
        forward = row["model_forward_median_ms"]
        expert = expert if forward is None else f"model fwd {forward:.1f}"
        lines.append(
            f"| {row['workload']} | {row['setting']} | {row['label']} | {row['median_ms']:.1f} | {row['p90_ms']:.1f} | "
            f"{expert} | {row['bytes_cross_node'] / 1e6:.3f} | {row['bytes_intra_node'] / 1e6:.3f} | "
            f"{row['dropped_routes']}/{row['routes']} | {row['max_abs_diff']:.1e} | "
            f"{row['speedup_vs_vanilla_lossless']:.2f}x | {_ratio(row.get('speedup_vs_best_peer'))}"
            f"{_interval_cell(row.get('speedup_vs_best_peer_ci95'))} | {kappa} |"
        )
    return "\n".join(lines)


def format_target_table(document: dict[str, Any]) -> str:
    """Markdown table of the target check: full GRACE against the best peer, per workload and setting."""
    by_key = {(r["workload"], r["setting"], r["system"]): r for r in document["rows"]}
    head = ("| workload | setting | full GRACE ms | best peer ms | GRACE vs best peer (95 % interval) | "
            "GRACE vs DeepSpeed lossless | cross-node MB: GRACE / DeepEP-like / EPLB+DeepEP | paths (ll/hier/flat) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for setting, workloads in document["target"]["settings"].items():
        for workload, check in workloads.items():
            grace = by_key[(workload, setting, FULL_GRACE)]
            best = by_key[(workload, setting, check["best_peer"])]
            deepep = [by_key[(workload, setting, p)]["bytes_cross_node"] / 1e6 for p in DEEPEP_LIKE]
            paths = grace["paths"] or {}
            ci95 = check.get("speedup_vs_best_peer_ci95")
            interval = f" ({ci95[0]:.2f}-{ci95[1]:.2f})" if ci95 else ""
            label = workload + (" (synthetic)" if grace["synthetic"] else "")
            lines.append(
                f"| {label} | {setting} | {grace['median_ms']:.1f} | {best['median_ms']:.1f} ({check['best_peer']}) | "
                f"{check['speedup_vs_best_peer']:.2f}x{interval} | {check['speedup_vs_vanilla_lossless']:.2f}x | "
                f"{grace['bytes_cross_node'] / 1e6:.3f} / {deepep[0]:.3f} / {deepep[1]:.3f} | "
                f"{paths.get('low-latency', 0)}/{paths.get('hierarchical', 0)}/{paths.get('flat', 0)} |"
            )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _interval_cell(ci95: Sequence[float] | None) -> str:
    return "" if not ci95 else f" ({ci95[0]:.2f}-{ci95[1]:.2f})"


def _interval(ci95: Sequence[float] | None) -> str:
    return "" if not ci95 else f"[95% {ci95[0]:.2f}-{ci95[1]:.2f}] "


def update_readme(table: str, *, readme: Path = README, note: str = "") -> None:
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{TABLE_START}\n{TABLE_END}\n"
    if TABLE_START not in text or TABLE_END not in text:
        text += f"\n{TABLE_START}\n{TABLE_END}\n"
    before, rest = text.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    body = (note + "\n\n" if note else "") + table
    readme.write_text(f"{before}{TABLE_START}\n{body}\n{TABLE_END}{after}")


def environment() -> dict[str, Any]:
    import deepspeed
    import torch

    return {
        "torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "backend": "gloo (CPU)", "cpu_count": os.cpu_count(),
    }  # fmt: skip


def run_bench(
    *,
    rates: Sequence[float] = DEFAULT_RATES,
    mode: str = "auto",
    quick: bool = False,
    models: Sequence[str] = DEFAULT_MODELS,
    phases: Sequence[str] = ("prefill", "decode"),
    systems: Sequence[str] = (),
    steps: int | None = None,
    nodes: int = 2,
    ranks_per_node: int = 2,
    output: Path | None = RESULTS_DIR / "bench.json",
    plots: bool = True,
    readme: bool = True,
    timeout_s: float = 900.0,
    seed: int = 0,
    quiet: bool = False,
    model_forward: bool = True,
) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document (also written to `output` unless None)."""
    from benchmarks.workloads import with_steps

    topology = Topology(nodes, ranks_per_node)
    workloads = [w for w in default_workloads(quick=quick, models=tuple(models)) if w.phase in phases]
    if steps is not None:
        workloads = [with_steps(w, steps=steps) for w in workloads]
    if not workloads:
        raise ValueError(f"no workload left for models {list(models)} and phases {list(phases)}")
    settings = resolve_settings(mode, rates)
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="ds_grace_bench_"))
    try:
        spec = prepare(workdir, workloads=workloads, systems=list(systems), topology=topology, seed=seed,
                       timeout_s=min(timeout_s, 300.0), model_forward=model_forward, quick=quick)  # fmt: skip
        rows: list[dict[str, Any]] = []
        runs = []
        for setting in settings:
            outcome = run_setting(
                setting, workdir=workdir, topology=topology, timeout_s=timeout_s, quiet=quiet
            )
            rows += build_rows(spec, setting, outcome, topology)
            runs.append({"setting": setting.name, "mode": outcome["mode"], "wall_s": outcome["wall_s"],
                         "link_bytes": outcome["link_bytes"]})  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    document = {
        "benchmark": "ds-grace bench",
        "topology": spec["topology"],
        "settings": [vars(s) for s in settings],
        "workloads": [{k: v for k, v in w.items() if k != "plans"} for w in spec["workloads"]],
        "systems": {name: SYSTEM_BY_NAME[name].label for name in spec["systems"]},
        "parity_tolerance": PARITY_TOLERANCE,
        "plan_metrics": spec["plan_metrics"],
        "mimics": _mimics(rows, topology),
        "rows": rows,
        "target": target_check(rows, settings),
        "cluster_runs": runs,
        "environment": environment(),
        "wall_s": time.time() - started,
        "quick": quick,
    }
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, json.dumps(document, indent=1))
        if plots:
            from benchmarks.plots import plot_bench

            document["plots"] = [str(p) for p in plot_bench(document, output.parent)]
            write_text_atomic(output, json.dumps(document, indent=1))
        if readme:
            update_readme(format_table(rows), note=_table_note(document))
    return document


def _mimics(rows: list[dict[str, Any]], topology: Topology) -> list[dict[str, Any]]:
    seen, out = set(), []
    for row in rows:
        key = (row["workload"].rsplit("-", 1)[0], row["setting"])
        if row["compute_link_kappa"] is None or key in seen:
            continue
        seen.add(key)
        shape = MODELS[key[0]]
        out.append({
            "model": key[0], "setting": row["setting"], "kappa": row["compute_link_kappa"],
            "expert_us_per_row": row["expert_s_per_row"] * 1e6,
            **mimicked_profile(row["compute_link_kappa"], shape, gpus_per_node=topology.gpus_per_node),
        })  # fmt: skip
    return out


def _table_note(document: dict[str, Any]) -> str:
    env = document["environment"]
    runs = ", ".join(f"{r['setting']} ({r['mode']}, {r['wall_s']:.0f} s)" for r in document["cluster_runs"])
    return (
        f"Generated by `ds-grace bench` ({'quick' if document['quick'] else 'full'}) on "
        f"{document['topology']['num_nodes']} x {document['topology']['gpus_per_node']} ranks, {env['cpu_count']} "
        f"CPU cores, torch {env['torch']}, deepspeed {env['deepspeed']}; runs: {runs}. "
        "Latency: one MoE layer forward, barrier to slowest rank; bytes: per forward, all ranks; "
        "dropped: routes dropped / routes replayed over all measured forwards."
    )


def print_summary(document: dict[str, Any]) -> None:
    print(format_table(document["rows"]))
    target = document["target"]
    print("\n" + format_target_table(document))
    print(f"\nTargets for full GRACE ({target['system']}) vs the best sparse peer:")
    for setting, workloads in target["settings"].items():
        for workload, check in workloads.items():
            print(
                f"  {setting} {workload}: {check['speedup_vs_best_peer']:.2f}x "
                f"{_interval(check.get('speedup_vs_best_peer_ci95'))}vs {check['best_peer']} "
                f"({'meets' if check['speed_met'] else 'misses'} {check['speedup_needed']:.1f}x); "
                f"{check['speedup_vs_vanilla_lossless']:.2f}x vs DeepSpeed lossless; cross-node "
                f"{check['cross_node_bytes'] / 1e6:.3f} MB vs DeepEP-like "
                f"{(check['deepep_like_cross_node_bytes'] or 0.0) / 1e6:.3f} MB "
                f"({'meets' if check['bytes_met'] else 'misses'}); drops {'0' if check['zero_drops'] else 'NONZERO'}; "
                f"{'parity' if check['parity'] else 'NO parity'}; paths {check['paths']}"
            )


def print_demo(document: dict[str, Any]) -> None:
    """The demo's table: per workload, each system's latency, speedups, cross-node bytes, drops and parity."""
    runs = ", ".join(f"{r['setting']} ({r['mode']})" for r in document["cluster_runs"])
    print(f"\nFull GRACE vs the sparse peers and vanilla DeepSpeed-MoE, {document['topology']['num_nodes']} nodes x "
          f"{document['topology']['gpus_per_node']} ranks, {runs}; one MoE layer, replayed real routing")  # fmt: skip
    head = (f"{'workload':<19} {'system':<28} {'median ms':>10} {'vs lossless':>11} {'vs best peer':>12} "
            f"{'cross-node MB':>13} {'dropped':>11} {'parity':>14}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for row in document["rows"]:
        parity = f"{'yes' if row['parity'] else 'NO'} ({row['max_abs_diff']:.0e})"
        print(
            f"{row['workload']:<19} {row['label']:<28} {row['median_ms']:>10.1f} "
            f"{row['speedup_vs_vanilla_lossless']:>10.2f}x {_ratio(row['speedup_vs_best_peer']):>12} "
            f"{row['bytes_cross_node'] / 1e6:>13.3f} "
            f"{str(row['dropped_routes']) + '/' + str(row['routes']):>11} {parity:>14}"
        )
    for setting, workloads in document["target"]["settings"].items():
        for workload, check in workloads.items():
            print(f"{setting} {workload}: full GRACE {check['speedup_vs_best_peer']:.2f}x vs the best peer "
                  f"({check['best_peer']}), {check['speedup_vs_vanilla_lossless']:.2f}x vs DeepSpeed lossless")  # fmt: skip
    for item in document["mimics"]:
        print(f"{item['model']} at {item['setting']}: compute:link kappa {item['kappa']:.2g} "
              f"(closest hardware: {item['closest']})")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rates", type=float, nargs="+", default=list(DEFAULT_RATES), help="inter-node Mbit/s"
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "netns", "local"),
        default="auto",
        help="netns: emulated nodes (root); local: plain local ranks; auto: netns when possible",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny setting (seconds): for tests and smoke runs"
    )
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(MODELS))
    parser.add_argument("--phases", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    parser.add_argument("--systems", nargs="+", default=[], help=f"subset of {', '.join(SYSTEM_BY_NAME)}")
    parser.add_argument("--steps", type=int, default=None, help="measured forwards per workload")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "bench.json")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--no-readme", action="store_true", help="do not rewrite the table in benchmarks/README.md"
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="limit for each setting's cluster run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-model-forward", action="store_true", help="skip the full tiny-model forward")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")  # fmt: skip


def run_from_args(args: argparse.Namespace) -> int:
    try:
        document = run_bench(
            rates=args.rates, mode=args.mode, quick=args.quick, models=args.models, phases=args.phases,
            systems=args.systems, steps=args.steps, nodes=args.nodes, ranks_per_node=args.ranks_per_node,
            output=args.output, plots=not args.no_plots, readme=not args.no_readme, timeout_s=args.timeout_s,
            seed=args.seed, quiet=args.quiet, model_forward=not args.no_model_forward,
        )  # fmt: skip
    except (BenchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(document)
    if args.output is not None:
        print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
