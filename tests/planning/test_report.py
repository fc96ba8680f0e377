"""`ds-grace report`'s figures and summary agree with `ds-grace evaluate` and can be read."""

from __future__ import annotations

import re

import matplotlib.figure
import numpy as np
import pytest

import ds_grace.report as report
from ds_grace.planning.build import build_plan
from ds_grace.planning.metrics import evaluate_plan
from ds_grace.topology import Topology
from ds_grace.trace import split_trace, synthetic


@pytest.fixture
def figures(monkeypatch) -> dict[str, matplotlib.figure.Figure]:
    """Every figure write_report saves, by file name, drawn as saved."""
    saved: dict[str, matplotlib.figure.Figure] = {}

    def keep(fig, path, **_kwargs):
        fig.canvas.draw()
        saved[path.name] = fig

    monkeypatch.setattr(report, "save_figure", keep)
    monkeypatch.setattr(report.plt, "close", lambda fig: None)
    return saved


def _drawn_outside(fig: matplotlib.figure.Figure) -> list[float]:
    """How far (inches) the drawn artists reach beyond each edge of the canvas (left, bottom, right, top)."""
    box = fig.get_tightbbox(fig.canvas.get_renderer())
    width, height = fig.get_size_inches()
    return [round(max(0.0, v), 3) for v in (-box.x0, -box.y0, box.x1 - width, box.y1 - height)]


@pytest.mark.parametrize("num_experts", [8, 128])
def test_no_text_of_any_figure_is_cut(figures, tmp_path, num_experts):
    trace = synthetic(num_layers=2, num_experts=num_experts, top_k=2, num_tokens=800, seed=1)
    fitted, held_out = split_trace(trace, fraction=0.5)
    plan = build_plan(fitted, topology=Topology(2, 2), policy="grace")
    report.write_report(plan, fitted, tmp_path, held_out=held_out)
    assert set(figures) == {"affinity.png", "gpu_load.png", "placement.png", "held_out.png"}
    for name, fig in figures.items():
        assert _drawn_outside(fig) == [0.0, 0.0, 0.0, 0.0], name


def test_held_out_axes_do_not_mix_higher_and_lower_is_better(figures, tmp_path):
    trace = synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=800, seed=2)
    fitted, held_out = split_trace(trace, fraction=0.5)
    plan = build_plan(fitted, topology=Topology(2, 2), policy="grace")
    report.write_report(plan, fitted, tmp_path, held_out=held_out)
    titles = [ax.get_title().lower() for ax in figures["held_out.png"].axes]
    balance = [t for t in titles if "balancedness" in t]
    copies = [t for t in titles if "copies" in t]
    assert len(balance) == 1 and len(copies) == 1
    assert "higher is better" in balance[0] and "copies" not in balance[0]
    assert "lower is better" in copies[0] and "balancedness" not in copies[0]


def test_affinity_at_128_experts_labels_gpu_blocks_not_scattered_ids(figures, tmp_path):
    trace = synthetic(num_layers=1, num_experts=128, top_k=8, num_tokens=2000, seed=3)
    plan = build_plan(trace, topology=Topology(2, 4), policy="grace")
    report.write_report(plan, trace, tmp_path)
    ax = figures["affinity.png"].axes[0]
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels == [
        f"node {r // 4} GPU {r} ({n})" for r, n in enumerate(np.bincount(plan.layers[0].primary))
    ]
    # node boundary (red) and GPU boundaries (white) drawn across the map
    colours = [line.get_color() for line in ax.get_lines()]
    assert colours.count("red") == 2 and colours.count("white") == 2 * 7


def test_summary_deepspeed_column_matches_its_vanilla_row_and_evaluate(tmp_path):
    trace = synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=600, seed=4)
    plan = build_plan(trace, topology=Topology(2, 2), policy="grace")
    summary = report.summary_markdown(plan, trace, 0)
    rows = {
        match[0]: (float(match[1]), float(match[2]))
        for match in re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|$", summary, re.M)
    }
    vanilla = evaluate_plan(trace, plan)["vanilla_cross_node_copies_per_token"]
    assert vanilla == pytest.approx(1.0)  # K (N - 1) / N
    assert rows["cross_node_copies_per_token"][1] == pytest.approx(vanilla, abs=1e-4)
    assert rows["vanilla_cross_node_copies_per_token"] == pytest.approx((vanilla, vanilla), abs=1e-4)
    assert rows["cross_gpu_copies_per_token"][1] == pytest.approx(2 * 3 / 4, abs=1e-4)  # K (R - 1) / R
