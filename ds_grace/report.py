"""Plots and a markdown summary of a GracePlan on a routing trace (``ds-grace report``).

Shape legend: E experts, R ranks (GPUs).

With a held-out trace (traffic the plan was not fitted to, e.g. from ``ds-grace split-trace``),
``held_out.png`` puts the plan's per-GPU load and its metrics on the fitting trace next to the same on
the held-out trace, and summary.md gains an in-sample / held-out table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ds_grace.files import save_figure, write_text_atomic  # noqa: E402
from ds_grace.planning.baselines import contiguous_primary, single_instance_layer  # noqa: E402
from ds_grace.planning.metrics import METRIC_KEYS, evaluate_plan, expected_gpu_loads  # noqa: E402
from ds_grace.planning.plan import GracePlan, PlanError  # noqa: E402
from ds_grace.planning.stats import expert_loads, intra_layer_affinity  # noqa: E402
from ds_grace.trace import ExpertLoads, RoutingTrace  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _expert_order(plan: GracePlan, layer: int) -> np.ndarray:
    """Experts sorted by primary rank (so by node, then GPU), then id."""
    primary_E = np.array(plan.layers[layer].primary)
    return np.lexsort((np.arange(len(primary_E)), primary_E))


def _boundaries(plan: GracePlan, layer: int, order_E: np.ndarray) -> tuple[list[float], list[float]]:
    primary_E = np.array(plan.layers[layer].primary)[order_E]
    gpu_cuts = [i - 0.5 for i in range(1, len(primary_E)) if primary_E[i] != primary_E[i - 1]]
    node_of = primary_E // plan.topology.gpus_per_node
    node_cuts = [i - 0.5 for i in range(1, len(node_of)) if node_of[i] != node_of[i - 1]]
    return gpu_cuts, node_cuts


def _block_ticks(primary_E: np.ndarray, gpus_per_node: int) -> tuple[list[float], list[str]]:
    """One tick per GPU block of the ordered experts, at its centre: "GPU r (n)" with its expert count."""
    ranks, starts, counts = np.unique(primary_E, return_index=True, return_counts=True)
    centres = [float(start + (count - 1) / 2) for start, count in zip(starts, counts)]
    labels = [f"node {r // gpus_per_node} GPU {r} ({n})" for r, n in zip(ranks, counts)]
    return centres, labels


def plot_affinity(plan: GracePlan, trace: RoutingTrace, layer: int, path: Path) -> None:
    """Co-activation of the layer's experts ordered by group (primary GPU, so by node), GPU blocks
    outlined in white and nodes in red; a log colour scale keeps the weak pairs visible next to the
    strong ones. Up to 32 experts every id is a tick; beyond, one tick per GPU block."""
    affinity_EE = intra_layer_affinity(trace.topk_ids[layer], trace.num_experts)
    order = _expert_order(plan, layer)
    num_experts = len(order)
    side = 6.5 if num_experts <= 32 else 9.5
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    ordered = affinity_EE[np.ix_(order, order)]
    norm = matplotlib.colors.SymLogNorm(linthresh=1.0, vmin=0, vmax=max(1.0, float(ordered.max())))
    image = ax.imshow(ordered, cmap="magma", norm=norm, interpolation="nearest")
    gpu_cuts, node_cuts = _boundaries(plan, layer, order)
    for cut in gpu_cuts:
        ax.axhline(cut, color="white", lw=0.6)
        ax.axvline(cut, color="white", lw=0.6)
    for cut in node_cuts:
        ax.axhline(cut, color="red", lw=1.6)
        ax.axvline(cut, color="red", lw=1.6)
    if num_experts <= 32:
        ticks = np.arange(num_experts)
        ax.set_xticks(ticks, [str(order[i]) for i in ticks], fontsize=6, rotation=90)
        ax.set_yticks(ticks, [str(order[i]) for i in ticks], fontsize=6)
        ax.set_xlabel("expert id, ordered by GPU and node")
    else:
        primary_E = np.array(plan.layers[layer].primary)[order]
        centres, labels = _block_ticks(primary_E, plan.topology.gpus_per_node)
        ax.set_xticks(centres, labels, fontsize=7, rotation=90)
        ax.set_yticks(centres, labels, fontsize=7)
        ax.set_xlabel("experts grouped by primary GPU (count in brackets)")
    ax.set_title(
        f"layer {layer}: co-activation of {num_experts} experts\nby GPU (white lines) and node (red lines)",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, label="tokens choosing both (log scale)", shrink=0.8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _draw_gpu_load_bars(ax: Axes, bars: Sequence[tuple[str, np.ndarray, float]], *, title: str) -> None:
    """Grouped bars of expected load per GPU, one group per rank and one bar per (label, gpu_R, mean):
    the height is gpu_R / mean, the legend gives each bar set's mean/max; a dashed line marks 1."""
    world = len(bars[0][1])
    width = 0.8 / len(bars)
    for i, (label, gpu_R, mean) in enumerate(bars):
        ax.bar(
            np.arange(world) + (i - (len(bars) - 1) / 2) * width,
            gpu_R / mean,
            width,
            label=f"{label}: mean/max {gpu_R.mean() / gpu_R.max():.3f}",
        )
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(np.arange(world))
    ax.set_xlabel("GPU (rank)")
    ax.set_ylabel("expected load / mean")
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_gpu_load(plan: GracePlan, loads_E: np.ndarray, layer: int, path: Path, routing: str) -> None:
    layer_plan = plan.layers[layer]
    world = plan.topology.world_size
    contiguous = single_instance_layer(contiguous_primary(len(loads_E), world), world)
    rows = {
        "contiguous (DeepSpeed)": expected_gpu_loads(loads_E, contiguous, plan.topology, "primary"),
        f"{plan.policy} primaries only": expected_gpu_loads(loads_E, layer_plan, plan.topology, "primary"),
        f"{plan.policy} with replicas ({routing})": expected_gpu_loads(
            loads_E, layer_plan, plan.topology, routing
        ),
    }
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * world + 3), 4))
    mean = loads_E.sum() / world
    _draw_gpu_load_bars(
        ax,
        [(label, gpu_R, mean) for label, gpu_R in rows.items()],
        title=f"layer {layer}: per-GPU load before and after replication",
    )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_placement(plan: GracePlan, layer: int, path: Path) -> None:
    layer_plan = plan.layers[layer]
    grid_RE = np.zeros((layer_plan.num_ranks, layer_plan.num_experts))
    for rank, experts in enumerate(layer_plan.slots):
        for e in experts:
            grid_RE[rank, e] = 2.0 if layer_plan.primary[e] == rank else 1.0
    fig, ax = plt.subplots(
        figsize=(max(6.0, 0.12 * layer_plan.num_experts + 2), max(3.0, 0.3 * layer_plan.num_ranks + 1.5))
    )
    colors = matplotlib.colors.ListedColormap(["white", "tab:orange", "tab:blue"])
    ax.imshow(grid_RE, cmap=colors, vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    for node in range(1, plan.topology.num_nodes):
        ax.axhline(node * plan.topology.gpus_per_node - 0.5, color="red", lw=1.2)
    ax.set_xlabel("expert")
    ax.set_ylabel("GPU (rank)")
    ax.set_title(f"layer {layer}: primaries (blue) and replicas (orange)\nred lines split nodes", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _check_matches(plan: GracePlan, trace: RoutingTrace | ExpertLoads, name: str) -> np.ndarray:
    loads_LE = expert_loads(trace)
    if loads_LE.shape != (plan.num_layers, plan.num_experts):
        raise PlanError(
            f"{name} has {loads_LE.shape[0]} layers of {loads_LE.shape[1]} experts but the plan has "
            f"{plan.num_layers} of {plan.num_experts}"
        )
    return loads_LE


def _all_metrics(plan: GracePlan, trace: RoutingTrace | ExpertLoads) -> dict[str, object]:
    from ds_grace.replayed import REPLAYED_KEYS, replayed_metrics  # torch only where replayed

    metrics: dict[str, object] = dict(evaluate_plan(trace, plan))
    if isinstance(trace, RoutingTrace):
        metrics.update(replayed_metrics(trace, plan))
    else:
        metrics.update(dict.fromkeys(REPLAYED_KEYS))
    return metrics


def plot_held_out(
    plan: GracePlan,
    fitted: RoutingTrace | ExpertLoads,
    held_out: RoutingTrace | ExpertLoads,
    layer: int,
    path: Path,
) -> tuple[dict[str, object], dict[str, object]]:
    """Per-GPU load of `layer` and the plan-wide metrics, in-sample next to held-out."""
    routing = plan.meta.get("routing_policy", "tar")
    world = plan.topology.world_size
    fig, (left, balance, copies) = plt.subplots(
        1, 3, figsize=(max(12.0, 0.35 * world + 10), 4), gridspec_kw={"width_ratios": [2, 1, 1]}
    )
    bars = []
    for label, trace in (("in-sample", fitted), ("held-out", held_out)):
        gpu_R = expected_gpu_loads(expert_loads(trace)[layer], plan.layers[layer], plan.topology, routing)
        bars.append((label, gpu_R, gpu_R.mean()))
    _draw_gpu_load_bars(left, bars, title=f"layer {layer}: per-GPU load of this plan")
    fitted_metrics, held_metrics = _all_metrics(plan, fitted), _all_metrics(plan, held_out)
    for ax, keys, title in (
        (balance, HELD_OUT_BALANCE_KEYS, "balancedness, all layers\n(mean / max load: higher is better)"),
        (copies, HELD_OUT_COPIES_KEYS, "cross-node copies per token\n(all layers: lower is better)"),
    ):
        _draw_metric_pairs(ax, keys, fitted_metrics, held_metrics, title=title)
    fig.suptitle(f"{plan.policy} on {plan.topology}: in-sample and held-out", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fitted_metrics, held_metrics


HELD_OUT_BALANCE_KEYS = ("balancedness", "balancedness_replayed")
HELD_OUT_COPIES_KEYS = ("cross_node_copies_per_token", "cross_node_copies_replayed")


def _draw_metric_pairs(
    ax: Axes,
    keys: Sequence[str],
    fitted: dict[str, object],
    held: dict[str, object],
    *,
    title: str,
) -> None:
    """In-sample next to held-out bars of metrics that share one direction (all higher- or all
    lower-is-better); metrics a trace cannot give are left out."""
    shown = [key for key in keys if fitted[key] is not None and held[key] is not None]
    width = 0.4
    for i, (label, metrics) in enumerate((("in-sample", fitted), ("held-out", held))):
        values = [float(metrics[key]) for key in shown]  # type: ignore[arg-type]
        ax.bar(np.arange(len(shown)) + (i - 0.5) * width, values, width, label=label)
    ax.set_xticks(
        np.arange(len(shown)),
        [key.split("_")[-1] if key.endswith("replayed") else "expected" for key in shown],
    )
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _fmt(value: object) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_markdown(plan: GracePlan, trace: RoutingTrace | ExpertLoads, layer: int) -> str:
    world = plan.topology.world_size
    contiguous = GracePlan(
        topology=plan.topology,
        layers=tuple(
            single_instance_layer(contiguous_primary(plan.num_experts, world), world) for _ in plan.layers
        ),
        policy="contiguous",
    )
    ours = evaluate_plan(trace, plan)
    # DeepSpeed-MoE sends every (token, expert) pair, so its copies are counted without dedup: its
    # cross-node copies are then vanilla_cross_node_copies_per_token, as `ds-grace evaluate` reports
    base = evaluate_plan(trace, contiguous, routing_policy="primary", dedup=False)
    lines = [
        f"# Plan report: {plan.policy} on {plan.topology}",
        "",
        f"- layers: {plan.num_layers}, experts per layer: {plan.num_experts}, "
        f"replicas: {sum(layer_plan.replica_count() for layer_plan in plan.layers)}",
        f"- routing: {ours['routing_policy']}; content hash `{plan.content_hash[:16]}`; "
        f"trace fingerprint `{plan.trace_fingerprint}` (this trace: `{trace.fingerprint}`)",
    ]
    grouping = plan.meta.get("grouping")
    if grouping:
        lines.append(
            f"- grouping: ratio r = {grouping.get('ratio')}, affinity kept inside nodes "
            f"{grouping.get('kept_node_affinity', 0):.3f}, inside GPUs {grouping.get('kept_gpu_affinity', 0):.3f}"
        )
    lines += [
        "",
        "| metric | this plan | DeepSpeed-MoE (contiguous, a copy per (token, expert) pair) |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {key} | {_fmt(ours[key])} | {_fmt(base[key])} |" for key in METRIC_KEYS]
    lines += [
        "",
        f"Plots show layer {layer}: `gpu_load.png` (expected load per GPU, every origin GPU equally likely), "
        "`placement.png` (primaries and replicas)"
        + (
            ", `affinity.png` (co-activation ordered by GPU and node)."
            if isinstance(trace, RoutingTrace)
            else "; the trace holds loads only, so there is no affinity heatmap."
        ),
        "",
    ]
    return "\n".join(lines)


def write_report(
    plan: GracePlan,
    trace: RoutingTrace | ExpertLoads,
    out_dir: str | Path,
    *,
    layer: int = 0,
    held_out: RoutingTrace | ExpertLoads | None = None,
) -> list[Path]:
    """Write the plots and summary.md into out_dir (with `held_out`, also held_out.png and an
    in-sample / held-out table); return the written paths."""
    loads_LE = _check_matches(plan, trace, "trace")
    if held_out is not None:
        _check_matches(plan, held_out, "held-out trace")
    if not 0 <= layer < plan.num_layers:
        raise ValueError(f"--layer ({layer}) must be in [0, {plan.num_layers})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if isinstance(trace, RoutingTrace):
        plot_affinity(plan, trace, layer, out / "affinity.png")
        written.append(out / "affinity.png")
    routing = plan.meta.get("routing_policy", "tar")
    plot_gpu_load(plan, loads_LE[layer], layer, out / "gpu_load.png", routing)
    plot_placement(plan, layer, out / "placement.png")
    summary = summary_markdown(plan, trace, layer)
    written += [out / "gpu_load.png", out / "placement.png"]
    if held_out is not None:
        fitted_metrics, held_metrics = plot_held_out(plan, trace, held_out, layer, out / "held_out.png")
        written.append(out / "held_out.png")
        summary += "\n".join(
            [
                "",
                "## In-sample and held-out",
                "",
                "`held_out.png`: the plan on the trace it was fitted to and on the held-out trace "
                "(replayed: every token on one origin GPU by consecutive blocks, routed as the runtime routes).",
                "",
                "| metric | in-sample | held-out |",
                "| --- | --- | --- |",
                *[
                    f"| {key} | {_fmt(fitted_metrics[key])} | {_fmt(held_metrics[key])} |"
                    for key in (*METRIC_KEYS, "balancedness_replayed", "cross_node_copies_replayed")
                ],
                "",
            ]
        )
    write_text_atomic(out / "summary.md", summary)
    written.append(out / "summary.md")
    return written
