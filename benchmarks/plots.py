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
        right.set_ylabel("bytes across nodes per forward (MB)")
        right.set_title(f"{workload}: cross-node traffic")
        right.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"bench_{workload}.png"
        save_figure(fig, path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
