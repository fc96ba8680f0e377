"""PNG plots of `ds-grace bench` results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ds_grace.files import save_figure  # noqa: E402


def _grouped_bars(
    ax: Any, rows: list[dict[str, Any]], key: str, *, scale: float = 1.0, log: bool = False
) -> None:
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    systems = list(dict.fromkeys(row["system"] for row in rows))
    labels = {row["system"]: row["label"] for row in rows}
    width = 0.8 / max(1, len(systems))
    for index, system in enumerate(systems):
        values = []
        for setting in settings:
            match = [r for r in rows if r["setting"] == setting and r["system"] == system]
            values.append(match[0][key] * scale if match else 0.0)
        ax.bar([s + index * width for s in range(len(settings))], values, width, label=labels[system])
    ax.set_xticks([s + width * (len(systems) - 1) / 2 for s in range(len(settings))], settings)
    if log:
        ax.set_yscale("log")


def plot_bench(document: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per workload: MoE-layer median latency and cross-node bytes per system and setting."""
    paths = []
    for workload in dict.fromkeys(row["workload"] for row in document["rows"]):
        rows = [row for row in document["rows"] if row["workload"] == workload]
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
        _grouped_bars(left, rows, "median_ms", log=True)
        left.set_ylabel("MoE layer latency, median (ms, log)")
        left.set_title(f"{workload}: latency")
        _grouped_bars(right, rows, "bytes_cross_node", scale=1e-6)
        right.set_title(f"{workload}: cross-node traffic")
        paths.append(_save(fig, right, out_dir / f"bench_{workload}.png"))
    return paths


def _save(fig: Any, right: Any, path: Path) -> Path:
    """The right panel's bytes label and legend, then the PNG."""
    right.set_ylabel("bytes across nodes per forward (MB)")
    right.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(document: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per workload and setting of the slot sweep: median latency (with the min-max over runs)
    and cross-node bytes against the slots per GPU S, one line per system."""
    paths = []
    rows = [row for row in document["rows"] if row.get("slots_per_gpu") is not None]
    for workload, setting in dict.fromkeys((row["workload"], row["setting"]) for row in rows):
        mine = [row for row in rows if row["workload"] == workload and row["setting"] == setting]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for system in dict.fromkeys(row["system"] for row in mine):
            points = sorted(
                (row for row in mine if row["system"] == system), key=lambda r: r["slots_per_gpu"]
            )
            slots = [row["slots_per_gpu"] for row in points]
            medians = [row["median_ms"] for row in points]
            low = [row["median_ms"] - min(row.get("run_medians_ms") or [row["median_ms"]]) for row in points]
            high = [max(row.get("run_medians_ms") or [row["median_ms"]]) - row["median_ms"] for row in points]
            left.errorbar(slots, medians, yerr=[low, high], marker="o", capsize=3, label=points[0]["label"])
            right.plot(
                slots, [row["bytes_cross_node"] / 1e6 for row in points], marker="o", label=points[0]["label"]
            )
        left.set_xlabel("expert slots per GPU (S)")
        left.set_ylabel("MoE layer latency, median of runs (ms; bars: runs min-max)")
        left.set_title(f"{workload} at {setting}: latency vs S")
        right.set_xlabel("expert slots per GPU (S)")
        right.set_title(f"{workload} at {setting}: cross-node traffic vs S")
        paths.append(_save(fig, right, out_dir / f"sweep_{workload}_{setting}.png"))
    return paths
