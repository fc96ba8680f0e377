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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
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
    NEW_PEERS,
    PEERS,
    SWEEP_SYSTEMS,
    SYSTEM_BY_NAME,
    build_plans,
    default_slots_per_gpu,
    select_systems,
    slot_range,
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
    "compute_link_kappa", "forwards", "slots_per_gpu", "run_medians_ms", "order_seed", "best_new_peer",
    "speedup_vs_best_new_peer", "speedup_vs_best_new_peer_ci95", "bytes_ratio_best_new_peer",
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
    order_seed: int = 0,
    sweep_slots: Mapping[str, Sequence[int]] | None = None,
    model_forward: bool = False,
    quick: bool = False,
) -> dict[str, Any]:
    """Write the spec, the replayed batches and the plans into `workdir`; return the spec (plus plan metrics).

    Plans are fitted on the first half of each trace (calibration_and_replay), every forward replays
    the other half. Every replicated plan has the same S slots on every GPU: default_slots_per_gpu, or
    with `sweep_slots` each S listed for the model (one spec entry per workload and S).
    """
    from ds_grace.planning.metrics import evaluate_plan

    chosen = select_systems(list(systems), baseline=sweep_slots is None)
    spec: dict[str, Any] = {
        "workdir": str(workdir), "topology": {"num_nodes": topology.num_nodes, "gpus_per_node": topology.gpus_per_node},
        "systems": [s.name for s in chosen], "seed": seed, "order_seed": order_seed, "timeout_s": timeout_s,
        "workloads": [],
    }  # fmt: skip
    plan_metrics: dict[str, Any] = {}
    traces: dict[str, Any] = {}
    for workload in workloads:
        if workload.model not in traces:
            traces[workload.model] = calibration_and_replay(workload.model)
        calibration, replay = traces[workload.model]
        default = default_slots_per_gpu(calibration.num_experts, topology)
        slot_values = list(sweep_slots[workload.model]) if sweep_slots is not None else [default]
        replay_batches(workload, replay, seed=seed).save(workdir / f"{workload.name}.replay.npz")
        for slots in slot_values:
            prefix = f"{workload.model}.S{slots}"
            if not (workdir / f"{prefix}.done").exists():
                plans = build_plans(calibration, topology, chosen, slots_per_gpu=slots)
                for key, plan in plans.items():
                    plan.save(workdir / f"{prefix}.{key}.plan.json")
                (workdir / f"{prefix}.done").write_text(" ".join(sorted(plans)))
                plan_metrics[prefix] = {
                    key: {k: v for k, v in evaluate_plan(replay, plan).items() if k != "per_layer"}
                    for key, plan in plans.items()
                }
            keys = (workdir / f"{prefix}.done").read_text().split()
            result_key = workload.name if sweep_slots is None else f"{workload.name}@S{slots}"
            spec["workloads"].append({**spec_to_dict(workload), "plans": keys, "plan_prefix": prefix,
                                      "result_key": result_key, "slots_per_gpu": slots})  # fmt: skip
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
    entry_of = {w.get("result_key", w["name"]): w for w in spec["workloads"]}
    for key, result in outcome["results"].items():
        systems = result["systems"]
        entry = entry_of.get(key)
        name = entry["name"] if entry is not None else key
        model = entry["model"] if entry is not None else None
        peers = [peer for peer in PEERS if peer in systems]
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
                "workload": name, "result_key": key, "setting": setting.name, "system": system_name,
                "label": system.label, "group": system.group, "synthetic": model in SYNTHETIC_MODELS,
                "mode": setting.mode, "rate_mbit": setting.rate_mbit,
                "slots_per_gpu": entry.get("slots_per_gpu") if entry is not None and system.replicated else None,
                "order_seed": spec.get("order_seed", 0),
                "median_ms": measured["median_ms"], "p90_ms": measured["p90_ms"],
                "run_medians_ms": [measured["median_ms"]],
                "model_forward_median_ms": measured.get("model_forward_median_ms"),
                "model_forward_p90_ms": measured.get("model_forward_p90_ms"),
                "expert_median_ms": measured["expert_median_ms"],
                "bytes_intra_node": measured["bytes_intra_node"], "bytes_cross_node": measured["bytes_cross_node"],
                "dropped_routes": measured["dropped_routes"], "routes": measured["routes"],
                "max_abs_diff": measured["max_abs_diff"],
                "parity": measured["max_abs_diff"] <= PARITY_TOLERANCE * scale,
                "speedup_vs_best_peer_ci95": (
                    speedup_ci95(measured["per_forward_ms"], [systems[p]["per_forward_ms"] for p in peers])
                    if system_name not in peers else None
                ),
                "speedup_vs_best_new_peer_ci95": (
                    speedup_ci95(measured["per_forward_ms"],
                                 [systems[p]["per_forward_ms"] for p in NEW_PEERS if p in systems])
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
    add_ratios(rows)
    return rows


def _row_group(row: dict[str, Any]) -> tuple[Any, ...]:
    """The rows one comparison is made within: one workload, setting and S (sweep)."""
    return row.get("result_key", row["workload"]), row["setting"]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill each row's ratios from the medians of its group: against DeepSpeed lossless, the best peer
    of all, and the best of the peers a user runs today (NEW_PEERS) with the ratio of that peer's
    cross-node bytes to the row's (the speedup the byte advantage alone would give on a pure link)."""
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_row_group(row), {})[row["system"]] = row
    for by_system in groups.values():
        base = by_system.get(BASELINE)
        peers = {p: by_system[p]["median_ms"] for p in PEERS if p in by_system}
        new_peers = {p: by_system[p]["median_ms"] for p in NEW_PEERS if p in by_system}
        best_peer = min(peers, key=peers.__getitem__) if peers else None
        best_new = min(new_peers, key=new_peers.__getitem__) if new_peers else None
        for row in by_system.values():
            median = row["median_ms"]
            row["speedup_vs_vanilla_lossless"] = base["median_ms"] / median if base and median else None
            row["cross_node_bytes_vs_vanilla_lossless"] = (
                row["bytes_cross_node"] / base["bytes_cross_node"]
                if base and base["bytes_cross_node"]
                else None
            )
            row["best_peer"] = best_peer
            row["speedup_vs_best_peer"] = peers[best_peer] / median if best_peer and median else None
            row["best_new_peer"] = best_new
            row["speedup_vs_best_new_peer"] = new_peers[best_new] / median if best_new and median else None
            row["bytes_ratio_best_new_peer"] = (
                by_system[best_new]["bytes_cross_node"] / row["bytes_cross_node"]
                if best_new and row["bytes_cross_node"]
                else None
            )


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


BYTES_TO_TIME_NEEDED = 0.9  # prefill at the slowest link: speedup >= 0.9 x the best new peer's bytes ratio


def target_check(rows: list[dict[str, Any]], settings: list[Setting]) -> dict[str, Any]:
    """The targets for full GRACE (`grace`), per rated setting and workload (medians: of the runs when
    aggregated): on prefill at the slowest link, >= 1.0x the best peer of NEW_PEERS and a speedup of at
    least 0.9x that peer's cross-node bytes over GRACE's; elsewhere reported against 1.0x; zero drops and
    parity in every row. Also reported: the best of all peers, and cross-node bytes against the
    DeepEP-like peers'."""
    rated = [s for s in settings if s.rate_mbit is not None]
    slowest = min(rated, key=lambda s: s.rate_mbit or 0.0) if rated else settings[0]
    by_key = {(r["workload"], r["setting"], r["system"]): r for r in rows}
    checks: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["system"] != FULL_GRACE or row.get("speedup_vs_best_new_peer") is None:
            continue
        prefill = row["workload"].endswith("-prefill")
        headline = prefill and row["setting"] == slowest.name
        deepep = [by_key[(row["workload"], row["setting"], p)] for p in DEEPEP_LIKE
                  if (row["workload"], row["setting"], p) in by_key]  # fmt: skip
        least_deepep = min((r["bytes_cross_node"] for r in deepep), default=None)
        speedup, bytes_ratio = row["speedup_vs_best_new_peer"], row["bytes_ratio_best_new_peer"]
        bytes_to_time = None if not bytes_ratio else speedup / bytes_ratio
        same_group = [r for r in rows if _row_group(r) == _row_group(row)]
        checks.setdefault(row["setting"], {})[row["workload"]] = {
            "speedup_vs_best_new_peer": speedup, "best_new_peer": row["best_new_peer"],
            "speedup_vs_best_new_peer_range": row.get("speedup_vs_best_new_peer_range"),
            "speedup_vs_best_new_peer_ci95": row.get("speedup_vs_best_new_peer_ci95"),
            "speedup_needed": 1.0, "speed_met": speedup >= 1.0, "headline": headline,
            "bytes_ratio_best_new_peer": bytes_ratio, "bytes_to_time": bytes_to_time,
            "bytes_to_time_needed": BYTES_TO_TIME_NEEDED if headline else None,
            "bytes_to_time_met": (bytes_to_time is not None and bytes_to_time >= BYTES_TO_TIME_NEEDED)
            if headline else None,
            "speedup_vs_best_peer": row["speedup_vs_best_peer"], "best_peer": row["best_peer"],
            "speedup_vs_best_peer_ci95": row.get("speedup_vs_best_peer_ci95"),
            "speedup_vs_vanilla_lossless": row["speedup_vs_vanilla_lossless"],
            "cross_node_bytes": row["bytes_cross_node"], "deepep_like_cross_node_bytes": least_deepep,
            "bytes_met": least_deepep is None or row["bytes_cross_node"] <= least_deepep,
            "zero_drops": row["dropped_routes"] == 0, "parity": row["parity"], "max_abs_diff": row["max_abs_diff"],
            # every lossless row of the comparison: no drop, parity
            "all_rows_lossless": all(r["dropped_routes"] == 0 and r["parity"] for r in same_group
                                     if r["system"] != "vanilla_default"),
            "paths": row["paths"],
        }  # fmt: skip
    return {
        "system": FULL_GRACE,
        "slowest_setting": slowest.name,
        "new_peers": list(NEW_PEERS),
        "settings": checks,
    }


def _ms_cell(row: dict[str, Any], key: str = "median_ms", runs_key: str = "run_medians_ms") -> str:
    """The median, with the min-max over runs when there was more than one run."""
    runs = row.get(runs_key) or []
    spread = f" ({min(runs):.1f}-{max(runs):.1f})" if len(runs) > 1 else ""
    return f"{row[key]:.1f}{spread}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per (workload, setting, system)."""
    head = ("| workload | setting | system | S | median ms (runs min-max) | p90 ms | expert ms | cross-node MB | "
            "intra-node MB | dropped | max abs diff | vs lossless | vs best peer | kappa |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        kappa = "" if row["compute_link_kappa"] is None else f"{row['compute_link_kappa']:.2g}"
        expert = "" if row["expert_median_ms"] is None else f"{row['expert_median_ms']:.1f}"
        forward = row["model_forward_median_ms"]
        expert = expert if forward is None else f"model fwd {forward:.1f}"
        slots = "" if row.get("slots_per_gpu") is None else str(row["slots_per_gpu"])
        lines.append(
            f"| {row['workload']} | {row['setting']} | {row['label']} | {slots} | {_ms_cell(row)} | "
            f"{row['p90_ms']:.1f} | {expert} | {row['bytes_cross_node'] / 1e6:.3f} | "
            f"{row['bytes_intra_node'] / 1e6:.3f} | {row['dropped_routes']}/{row['routes']} | "
            f"{row['max_abs_diff']:.1e} | {row['speedup_vs_vanilla_lossless']:.2f}x | "
            f"{_ratio(row.get('speedup_vs_best_peer'))}{_interval_cell(row.get('speedup_vs_best_peer_ci95'))} | "
            f"{kappa} |"
        )
    return "\n".join(lines)


def format_target_table(document: dict[str, Any]) -> str:
    """Markdown table of the target check: full GRACE against the best peer of NEW_PEERS (and of all),
    per workload and setting; medians of the runs, with their min-max and a within-run 95 % interval."""
    by_key = {(r["workload"], r["setting"], r["system"]): r for r in document["rows"]}
    head = ("| workload | setting | GRACE ms | best new peer ms | GRACE vs best new peer: median (runs min-max) "
            "[95 % within-run] | peer / GRACE cross-node bytes | speedup / bytes ratio | GRACE vs best of all peers | "
            "GRACE vs DeepSpeed lossless | paths (ll/hier/flat) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for setting, workloads in document["target"]["settings"].items():
        for workload, check in workloads.items():
            grace = by_key[(workload, setting, FULL_GRACE)]
            best = by_key[(workload, setting, check["best_new_peer"])]
            paths = grace["paths"] or {}
            spread = check.get("speedup_vs_best_new_peer_range")
            spread_text = f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else ""
            ci95 = check.get("speedup_vs_best_new_peer_ci95")
            interval = f" [{ci95[0]:.2f}-{ci95[1]:.2f}]" if ci95 else ""
            label = workload + (" (synthetic)" if grace["synthetic"] else "")
            ratio = check["bytes_ratio_best_new_peer"]
            conversion = check["bytes_to_time"]
            lines.append(
                f"| {label} | {setting} | {_ms_cell(grace)} | {_ms_cell(best)} ({check['best_new_peer']}) | "
                f"{check['speedup_vs_best_new_peer']:.2f}x{spread_text}{interval} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | {'' if conversion is None else f'{conversion:.2f}'} | "
                f"{check['speedup_vs_best_peer']:.2f}x ({check['best_peer']}) | "
                f"{check['speedup_vs_vanilla_lossless']:.2f}x | "
                f"{paths.get('low-latency', 0)}/{paths.get('hierarchical', 0)}/{paths.get('flat', 0)} |"
            )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _interval_cell(ci95: Sequence[float] | None) -> str:
    return "" if not ci95 else f" ({ci95[0]:.2f}-{ci95[1]:.2f})"


def _interval(ci95: Sequence[float] | None) -> str:
    return "" if not ci95 else f"[95% {ci95[0]:.2f}-{ci95[1]:.2f}] "


def update_readme(
    table: str, *, readme: Path = README, note: str = "", markers: tuple[str, str] = (TABLE_START, TABLE_END)
) -> None:
    start, end = markers
    text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        text += f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    body = (note + "\n\n" if note else "") + table
    readme.write_text(f"{before}{start}\n{body}\n{end}{after}")


def environment() -> dict[str, Any]:
    import deepspeed
    import torch

    return {
        "torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "backend": "gloo (CPU)", "cpu_count": os.cpu_count(),
    }  # fmt: skip


SWEEP_POINTS = 5  # S values per model in the slot sweep (evenly spaced, both ends kept)


def sweep_values(num_experts: int, topology: Topology, *, points: int = SWEEP_POINTS) -> list[int]:
    """S from ceil(E / R) (no replicas) to E / G (every node holds every expert): every value when there
    are at most `points`, else `points` evenly spaced ones, both ends included."""
    values = slot_range(num_experts, topology)
    if len(values) <= points:
        return values
    picks = np.linspace(0, len(values) - 1, points).round().astype(int)
    return [values[i] for i in sorted(set(picks.tolist()))]


def run_bench(
    *,
    rates: Sequence[float] = DEFAULT_RATES,
    mode: str = "auto",
    quick: bool = False,
    models: Sequence[str] = DEFAULT_MODELS,
    phases: Sequence[str] = ("prefill", "decode"),
    systems: Sequence[str] = (),
    steps: int | None = None,
    decode_steps: int | None = None,
    nodes: int = 2,
    ranks_per_node: int = 2,
    output: Path | None = RESULTS_DIR / "bench.json",
    plots: bool = True,
    readme: bool = True,
    timeout_s: float = 900.0,
    seed: int = 0,
    order_seed: int = 0,
    sweep: bool = False,
    sweep_points: int = SWEEP_POINTS,
    quiet: bool = False,
    model_forward: bool = True,
) -> dict[str, Any]:
    """The whole benchmark (or with `sweep`, the slot sweep); returns the JSON document (also written to
    `output` unless None)."""
    from benchmarks.workloads import with_steps

    topology = Topology(nodes, ranks_per_node)
    workloads = [w for w in default_workloads(quick=quick, models=tuple(models)) if w.phase in phases]
    if steps is not None:
        workloads = [with_steps(w, steps=steps) for w in workloads]
    if decode_steps is not None:
        workloads = [with_steps(w, steps=decode_steps) if w.phase == "decode" else w for w in workloads]
    if not workloads:
        raise ValueError(f"no workload left for models {list(models)} and phases {list(phases)}")
    sweep_slots = None
    if sweep:
        systems = list(systems) or list(SWEEP_SYSTEMS)
        sweep_slots = {
            w.model: sweep_values(w.shape.num_experts, topology, points=sweep_points) for w in workloads
        }
        model_forward = False
    settings = resolve_settings(mode, rates)
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="ds_grace_bench_"))
    try:
        spec = prepare(workdir, workloads=workloads, systems=list(systems), topology=topology, seed=seed,
                       order_seed=order_seed, sweep_slots=sweep_slots, timeout_s=min(timeout_s, 300.0),
                       model_forward=model_forward, quick=quick)  # fmt: skip
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
        "benchmark": "ds-grace bench --sweep-slots" if sweep else "ds-grace bench",
        "topology": spec["topology"],
        "settings": [vars(s) for s in settings],
        "workloads": [{k: v for k, v in w.items() if k != "plans"} for w in spec["workloads"]],
        "systems": {name: SYSTEM_BY_NAME[name].label for name in spec["systems"]},
        "parity_tolerance": PARITY_TOLERANCE,
        "plan_metrics": spec["plan_metrics"],
        "split": "plans fitted on the first half of each trace, every forward replays the second half",
        "order_seed": order_seed,
        "sweep_slots": sweep_slots,
        "mimics": _mimics(rows, topology),
        "rows": rows,
        "target": target_check(rows, settings) if not sweep else sweep_check(rows),
        "cluster_runs": runs,
        "environment": environment(),
        "wall_s": time.time() - started,
        "quick": quick,
    }
    if output is not None:
        write_document(document, output, plots=plots, readme=readme)
    return document


def write_document(document: dict[str, Any], output: Path, *, plots: bool, readme: bool) -> None:
    """The JSON, the plots next to it and the README table of a single or aggregated run."""
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, json.dumps(document, indent=1))
    if document.get("e2e"):
        from benchmarks.e2e import E2E_MARKERS, format_e2e_table

        if readme:
            update_readme(format_e2e_table(document), markers=E2E_MARKERS)
        return
    sweep = document.get("sweep_slots") is not None
    if plots:
        from benchmarks.plots import plot_bench, plot_sweep

        paths = plot_sweep(document, output.parent) if sweep else plot_bench(document, output.parent)
        document["plots"] = [str(p) for p in paths]
        write_text_atomic(output, json.dumps(document, indent=1))
    if readme:
        if sweep:
            update_readme(format_sweep_table(document), note=_table_note(document), markers=SWEEP_MARKERS)
        else:
            update_readme(format_table(document["rows"]), note=_table_note(document))
            update_readme(format_target_table(document), markers=TARGET_MARKERS)


SWEEP_MARKERS = ("<!-- sweep-table:start -->", "<!-- sweep-table:end -->")
TARGET_MARKERS = ("<!-- target-table:start -->", "<!-- target-table:end -->")


def sweep_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload, setting and S: GRACE's median against each peer's, and whether GRACE is slower
    beyond the run-to-run range (its fastest run slower than the peer's slowest run)."""
    checks: list[dict[str, Any]] = []
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_row_group(row), {})[row["system"]] = row
    for by_system in groups.values():
        grace = by_system.get(FULL_GRACE)
        if grace is None:
            continue
        for peer in NEW_PEERS:
            if peer not in by_system:
                continue
            other = by_system[peer]
            grace_runs, peer_runs = grace["run_medians_ms"], other["run_medians_ms"]
            checks.append({
                "workload": grace["workload"], "setting": grace["setting"], "slots_per_gpu": grace["slots_per_gpu"],
                "peer": peer, "grace_ms": grace["median_ms"], "peer_ms": other["median_ms"],
                "speedup": other["median_ms"] / grace["median_ms"],
                "grace_cross_node_bytes": grace["bytes_cross_node"], "peer_cross_node_bytes": other["bytes_cross_node"],
                "slower_beyond_range": min(grace_runs) > max(peer_runs),
            })  # fmt: skip
    return {"system": FULL_GRACE, "checks": checks, "met": not any(c["slower_beyond_range"] for c in checks)}


def format_sweep_table(document: dict[str, Any]) -> str:
    """Markdown: per workload, setting and S, each system's median (runs min-max) and cross-node MB."""
    head = (
        "| workload | setting | S | "
        + " | ".join(f"{SYSTEM_BY_NAME[s].name} ms (runs) / cross-node MB" for s in SWEEP_SYSTEMS)
        + " | GRACE vs best peer |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in document["rows"]:
        groups.setdefault(_row_group(row), {})[row["system"]] = row
    for by_system in groups.values():
        any_row = next(iter(by_system.values()))
        slots = next((r["slots_per_gpu"] for r in by_system.values() if r.get("slots_per_gpu")), "")
        cells = [
            f"{_ms_cell(by_system[s])} / {by_system[s]['bytes_cross_node'] / 1e6:.3f}"
            if s in by_system
            else ""
            for s in SWEEP_SYSTEMS
        ]
        grace = by_system.get(FULL_GRACE)
        ratio = _ratio(grace.get("speedup_vs_best_new_peer")) if grace else ""
        lines.append(
            f"| {any_row['workload']} | {any_row['setting']} | {slots} | "
            + " | ".join(cells)
            + f" | {ratio} |"
        )
    return "\n".join(lines)


def aggregate_runs(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """One document from several runs of the same command: each row's median_ms is the median of the
    runs' medians (run_medians_ms lists them); bytes and p90 are medians too; drops and routes add up;
    parity must hold in every run. The within-run 95 % intervals are the median run's; the ratios are
    recomputed from the aggregated medians, with their min-max over the runs."""
    keyed = [{(r.get("result_key", r["workload"]), r["setting"], r["system"]): r for r in d["rows"]}
             for d in documents]  # fmt: skip
    rows = []
    for key, first in keyed[0].items():
        runs = [k[key] for k in keyed if key in k]
        medians = [r["median_ms"] for r in runs]
        middle = runs[int(np.argsort(medians)[len(medians) // 2])]
        row = {k: v for k, v in middle.items() if k != "per_forward_ms"}
        row.update(
            median_ms=statistics.median(medians), run_medians_ms=medians,
            p90_ms=statistics.median(r["p90_ms"] for r in runs),
            bytes_cross_node=statistics.median(r["bytes_cross_node"] for r in runs),
            bytes_intra_node=statistics.median(r["bytes_intra_node"] for r in runs),
            dropped_routes=sum(r["dropped_routes"] for r in runs), routes=sum(r["routes"] for r in runs),
            max_abs_diff=max(r["max_abs_diff"] for r in runs), parity=all(r["parity"] for r in runs),
            order_seed=[r.get("order_seed") for r in runs], forwards=sum(r["forwards"] for r in runs),
        )  # fmt: skip
        for metric in ("ttft_ms", "decode_step_ms"):
            if first.get(metric) is not None:
                values = [r[metric] for r in runs]
                row[metric], row[f"run_{metric}"] = statistics.median(values), values
        for ratio in ("speedup_vs_best_new_peer", "speedup_vs_best_peer", "ttft_ms_vs_best_new_peer",
                      "ttft_ms_vs_vanilla_lossless", "decode_step_ms_vs_best_new_peer"):  # fmt: skip
            values = [r.get(ratio) for r in runs if r.get(ratio) is not None]
            row[f"{ratio}_range"] = [min(values), max(values)] if values else None
        rows.append(row)
    base = documents[0]
    settings = [Setting(**s) for s in base["settings"]]
    sweep = base.get("sweep_slots") is not None
    if base.get("e2e"):
        from benchmarks.e2e import add_e2e_ratios, e2e_check

        add_e2e_ratios(rows)
        target = e2e_check(rows)
    else:
        add_ratios(rows)
        target = sweep_check(rows) if sweep else target_check(rows, settings)
    return {
        **{
            k: v
            for k, v in base.items()
            if k not in ("rows", "target", "wall_s", "cluster_runs", "order_seed")
        },
        "aggregate": f"Median of {len(documents)} runs' medians (fresh processes), min-max over runs",
        "runs": [
            {"order_seed": d.get("order_seed"), "wall_s": d["wall_s"], "cluster_runs": d["cluster_runs"]}
            for d in documents
        ],  # fmt: skip
        "cluster_runs": [c for d in documents for c in d["cluster_runs"]],
        "rows": rows,
        "target": target,
        "wall_s": sum(d["wall_s"] for d in documents),
    }


def run_repeated(args: argparse.Namespace, *, runs: int) -> dict[str, Any]:
    """`runs` full runs of the same command, each in a fresh process (its own order seed), then one
    aggregated document; each run's JSON is kept next to the output (NAME.runK.json)."""
    output: Path = args.output
    documents = []
    for index in range(runs):
        run_output = output.with_name(f"{output.stem}.run{index}.json")
        command = [sys.executable, str(Path(__file__).resolve()), *child_arguments(args, order_seed=args.order_seed + index,
                   output=run_output)]  # fmt: skip
        print(f"run {index + 1}/{runs}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        proc = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise BenchError(f"run {index + 1} of {runs} failed with exit code {proc.returncode}")
        documents.append(json.loads(run_output.read_text()))
    document = aggregate_runs(documents)
    write_document(document, output, plots=not args.no_plots, readme=not args.no_readme)
    return document


def child_arguments(args: argparse.Namespace, *, order_seed: int, output: Path) -> list[str]:
    """The command line of one run of `args` (no repeat, no README, no plots)."""
    out = ["--rates", *map(str, args.rates), "--mode", args.mode, "--models", *args.models,
           "--phases", *args.phases, "--nodes", str(args.nodes), "--ranks-per-node", str(args.ranks_per_node),
           "--timeout-s", str(args.timeout_s), "--seed", str(args.seed), "--order-seed", str(order_seed),
           "--output", str(output), "--no-readme", "--no-plots", "--runs", "1", "--quiet",
           "--sweep-points", str(args.sweep_points)]  # fmt: skip
    if args.systems:
        out += ["--systems", *args.systems]
    if args.steps is not None:
        out += ["--steps", str(args.steps)]
    if args.decode_steps is not None:
        out += ["--decode-steps", str(args.decode_steps)]
    for flag in ("quick", "no_model_forward", "sweep_slots", "e2e"):
        if getattr(args, flag, False):
            out.append("--" + flag.replace("_", "-"))
    return out


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
    steps = sorted({(w["phase"], w["steps"]) for w in document["workloads"]})
    sizes = ", ".join(f"{steps_} measured {phase} forwards" for phase, steps_ in steps)
    aggregate = f" {document['aggregate']}." if document.get("aggregate") else ""
    return (
        f"Generated by `{document['benchmark']}` ({'quick' if document['quick'] else 'full'}; {sizes} per system "
        f"and run) on {document['topology']['num_nodes']} x {document['topology']['gpus_per_node']} ranks, "
        f"{env['cpu_count']} CPU cores, torch {env['torch']}, deepspeed {env['deepspeed']}; runs: {runs}.{aggregate} "
        "Latency: one MoE layer forward, barrier to slowest rank; bytes: per forward, all ranks; "
        "dropped: routes dropped / routes replayed over all measured forwards."
    )


def print_summary(document: dict[str, Any]) -> None:
    if document.get("e2e"):
        from benchmarks.e2e import format_e2e_table

        print(format_e2e_table(document))
        return
    if document.get("sweep_slots") is not None:
        print(format_sweep_table(document))
        slower = [c for c in document["target"]["checks"] if c["slower_beyond_range"]]
        print(f"\nSlot sweep: GRACE slower than a peer beyond the run-to-run range at {len(slower)} of "
              f"{len(document['target']['checks'])} (workload, setting, S, peer) points")  # fmt: skip
        for check in slower:
            print(f"  {check['workload']} {check['setting']} S={check['slots_per_gpu']} vs {check['peer']}: "
                  f"{check['grace_ms']:.1f} against {check['peer_ms']:.1f} ms")  # fmt: skip
        return
    print(format_table(document["rows"]))
    target = document["target"]
    print("\n" + format_target_table(document))
    print(
        f"\nTargets for full GRACE ({target['system']}) vs the best peer of {', '.join(target['new_peers'])}:"
    )
    for setting, workloads in target["settings"].items():
        for workload, check in workloads.items():
            conversion = ""
            if check["headline"]:
                conversion = (f"; speedup / bytes ratio {check['bytes_to_time'] or 0.0:.2f} "
                              f"({'meets' if check['bytes_to_time_met'] else 'misses'} {BYTES_TO_TIME_NEEDED})")  # fmt: skip
            print(
                f"  {setting} {workload}: {check['speedup_vs_best_new_peer']:.2f}x "
                f"{_interval(check.get('speedup_vs_best_new_peer_ci95'))}vs {check['best_new_peer']} "
                f"({'meets' if check['speed_met'] else 'misses'} {check['speedup_needed']:.1f}x){conversion}; "
                f"{check['speedup_vs_best_peer']:.2f}x vs the best of all peers ({check['best_peer']}); "
                f"{check['speedup_vs_vanilla_lossless']:.2f}x vs DeepSpeed lossless; cross-node "
                f"{check['cross_node_bytes'] / 1e6:.3f} MB vs DeepEP-like "
                f"{(check['deepep_like_cross_node_bytes'] or 0.0) / 1e6:.3f} MB; "
                f"drops {'0' if check['zero_drops'] else 'NONZERO'}; {'parity' if check['parity'] else 'NO parity'}; "
                f"every lossless row: {'0 drops, parity' if check['all_rows_lossless'] else 'NOT lossless'}; "
                f"paths {check['paths']}"
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
            f"{row['speedup_vs_vanilla_lossless']:>10.2f}x {_ratio(row['speedup_vs_best_new_peer']):>12} "
            f"{row['bytes_cross_node'] / 1e6:>13.3f} "
            f"{str(row['dropped_routes']) + '/' + str(row['routes']):>11} {parity:>14}"
        )
    for setting, workloads in document["target"]["settings"].items():
        for workload, check in workloads.items():
            print(f"{setting} {workload}: full GRACE {check['speedup_vs_best_new_peer']:.2f}x vs the best peer "
                  f"({check['best_new_peer']}), {check['speedup_vs_vanilla_lossless']:.2f}x vs DeepSpeed lossless")  # fmt: skip
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
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="measured forwards per workload (--e2e: generations per system)",
    )
    parser.add_argument(
        "--decode-steps",
        type=int,
        default=None,
        help="measured forwards per decode workload (overrides --steps)",
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument(
        "--output", type=Path, default=None,
        help="JSON (default benchmarks/results/bench.json, sweep.json with --sweep-slots, e2e.json with --e2e)",
    )  # fmt: skip
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--no-readme", action="store_true", help="do not rewrite the tables in benchmarks/README.md"
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="limit for each setting's cluster run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the replayed inputs")
    parser.add_argument(
        "--order-seed", type=int, default=0,
        help="seed of the per-forward system order (run k of --runs uses order-seed + k)",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, default=1,
        help="full runs, each in a fresh process; the tables report the median of the runs' medians",
    )  # fmt: skip
    parser.add_argument(
        "--sweep-slots", action="store_true",
        help="slots per GPU from ceil(E / GPUs) to E / GPUs-per-node for grace, peer_sglang and peer_vllm",
    )  # fmt: skip
    parser.add_argument(
        "--sweep-points", type=int, default=SWEEP_POINTS, help="S values per model in the sweep"
    )
    parser.add_argument(
        "--e2e", action="store_true",
        help="whole-model generation (prefill, then decode steps) of Mixtral- and Qwen1.5-MoE-shaped models",
    )  # fmt: skip
    parser.add_argument("--no-model-forward", action="store_true", help="skip the full tiny-model forward")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")  # fmt: skip


def _default_output(args: argparse.Namespace) -> Path:
    if args.output is not None:
        return args.output
    return RESULTS_DIR / ("e2e.json" if args.e2e else "sweep.json" if args.sweep_slots else "bench.json")


def run_from_args(args: argparse.Namespace) -> int:
    args.output = _default_output(args)
    if args.runs < 1:
        print(f"error: --runs ({args.runs}) must be >= 1", file=sys.stderr)
        return 2
    if args.e2e and args.sweep_slots:
        print("error: --e2e and --sweep-slots are separate benchmarks; give one of them", file=sys.stderr)
        return 2
    try:
        if args.runs > 1:
            document = run_repeated(args, runs=args.runs)
        elif args.e2e:
            from benchmarks.e2e import run_e2e

            document = run_e2e(
                rates=args.rates, mode=args.mode, quick=args.quick, systems=args.systems, nodes=args.nodes,
                ranks_per_node=args.ranks_per_node, output=args.output, timeout_s=args.timeout_s, seed=args.seed,
                order_seed=args.order_seed, quiet=args.quiet, readme=not args.no_readme, repetitions=args.steps,
                models=args.models,
            )  # fmt: skip
        else:
            document = run_bench(
                rates=args.rates, mode=args.mode, quick=args.quick, models=args.models, phases=args.phases,
                systems=args.systems, steps=args.steps, decode_steps=args.decode_steps, nodes=args.nodes,
                ranks_per_node=args.ranks_per_node,
                output=args.output, plots=not args.no_plots, readme=not args.no_readme, timeout_s=args.timeout_s,
                seed=args.seed, order_seed=args.order_seed, sweep=args.sweep_slots, sweep_points=args.sweep_points,
                quiet=args.quiet, model_forward=not args.no_model_forward,
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
