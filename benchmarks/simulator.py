"""Scale simulator: a cost model of one MoE layer forward, driven by traces and plans.

Shape legend: T tokens (of one rank), K top-k, E experts, R ranks, N nodes, G GPUs per node.

Traffic is exact, not estimated, and counted with the runtime's own traffic model
(ds_grace.comm.schedule): for each forward of a replayed batch, the instance of every route is chosen
with the runtime's own tables (ds_grace.routing.choose_instances), and the rows each rank sends to
each other rank are the rows of each hop of the path (``path_rows``: flat, a token once per GPU
hosting its chosen instances; hierarchical, once per remote node to the relay GPU, then once per GPU
inside the node; combine: the same rows back), after the header round (one row of the runtime's
``header_row_bytes`` to every peer). The low-latency path (``fixed_rows``) sends every peer a fixed
buffer of as many rows as the rank's tokens and gets one back (two collectives, no header round);
its experts compute their routed rows (the grouped GEMM over routes sorted by slot, as the runtime
does for stacked slots). Vanilla DeepSpeed-MoE sends its
capacity-padded [E, C, D] buffer, E/R experts' C rows to every peer (``fixed_rows`` too), and its
experts compute every padded row.

Cost of one all-to-all stage (synchronous: everyone waits for the slowest):

    t_stage = alpha + max over inter-node links of max(bytes out, bytes in) / B_inter
                    + max over ranks of max(intra-node bytes out, in) / B_intra

where an inter-node link is shared by `gpus_per_link` GPUs of a node. Compute: max over ranks of
rows x t_row. A forward: every stage (flat: header, dispatch, combine; hierarchical: header, two
dispatch hops, two combine hops; low-latency: dispatch and combine buffers) plus compute plus a
fixed per-forward overhead. The sparse peers and every GRACE rung are costed the same way, with
their own plan, instance choice and path; full GRACE (auto) takes whichever of flat and hierarchical
the model predicts faster for each forward, as the runtime does with its calibrated model.

Calibration (``calibrate``): the model is linear in (1/B_inter_eff, 1/B_intra, t_row, alpha, overhead)
given the traffic; those are fitted by non-negative least squares to the emulated runs' measured
medians (benchmarks/results/bench.json), and the relative error per measured row is reported.
Predictions (``predict``) use the hardware profiles of benchmarks/hardware.py with the real model's
expert size, for 2x8, 4x8 and 8x8 GPUs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.hardware import PROFILES, HardwareProfile  # noqa: E402
from benchmarks.systems import (  # noqa: E402
    DEFAULT_COMMUNICATION,
    DEFAULT_ROUTING,
    PEERS,
    SYSTEMS,
    SystemSpec,
    build_plans,
)
from benchmarks.workloads import (  # noqa: E402
    MODELS,
    PAPER_BATCH,
    PAPER_PREFILL,
    ModelShape,
    calibration_and_replay,
    replay_batches,
    spec_from_dict,
)
from ds_grace.comm.schedule import PathName, fixed_rows, path_rows  # noqa: E402
from ds_grace.files import save_figure, write_text_atomic  # noqa: E402
from ds_grace.planning.plan import GracePlan, LayerPlan  # noqa: E402
from ds_grace.topology import Topology  # noqa: E402
from ds_grace.vanilla import DEEPSPEED_DEFAULT  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class LinkModel:
    """Parameters of the cost model (seconds, bytes per second)."""

    inter_bytes_per_s: float  # one inter-node link
    gpus_per_link: int  # GPUs of a node sharing one inter-node link
    intra_bytes_per_s: float  # per GPU, inside a node
    alpha_s: float  # per collective stage
    row_s: float  # expert compute per row
    overhead_s: float = 0.0  # per forward


@dataclass(frozen=True)
class Traffic:
    """One forward's communication and compute, per stage and rank."""

    stages: tuple[np.ndarray, ...]  # bytes_RR[src, dst] of each collective stage
    rows_R: np.ndarray  # expert rows each rank computes
    row_stages: int  # stages that carry rows (the others are row-count exchanges)


def stage_terms(bytes_RR: np.ndarray, topology: Topology, gpus_per_link: int) -> tuple[float, float]:
    """(max inter-node link bytes, max intra-node rank bytes) of one stage, each the larger direction."""
    node_R = np.arange(topology.world_size) // topology.gpus_per_node
    cross_RR = node_R[:, None] != node_R[None, :]
    inter_out_R = (bytes_RR * cross_RR).sum(axis=1)
    inter_in_R = (bytes_RR * cross_RR).sum(axis=0)
    link_R = np.arange(topology.world_size) // max(1, min(gpus_per_link, topology.gpus_per_node))
    links = link_R.max() + 1
    link_out = np.bincount(link_R, weights=inter_out_R, minlength=links)
    link_in = np.bincount(link_R, weights=inter_in_R, minlength=links)
    intra_RR = bytes_RR * ~cross_RR
    np.fill_diagonal(intra_RR, 0)
    intra = max(intra_RR.sum(axis=1).max(), intra_RR.sum(axis=0).max())
    return float(max(link_out.max(), link_in.max())), float(intra)


def features(traffic: Traffic, topology: Topology, gpus_per_link: int) -> np.ndarray:
    """[inter bytes, intra bytes, max rows, stages, 1]: time = features @ [1/B_inter, 1/B_intra, t_row, alpha, overhead]."""
    inter = intra = 0.0
    for bytes_RR in traffic.stages:
        a, b = stage_terms(bytes_RR, topology, gpus_per_link)
        inter += a
        intra += b
    return np.array([inter, intra, float(traffic.rows_R.max()), float(len(traffic.stages)), 1.0])


def forward_time(traffic: Traffic, topology: Topology, model: LinkModel) -> float:
    coef = np.array([1.0 / model.inter_bytes_per_s, 1.0 / model.intra_bytes_per_s, model.row_s, model.alpha_s,
                     model.overhead_s])  # fmt: skip
    return float(features(traffic, topology, model.gpus_per_link) @ coef)


# ---- traffic of one forward ----


def vanilla_traffic(
    topk_ids_RTK: np.ndarray,
    *,
    num_experts: int,
    hidden: int,
    itemsize: int,
    topology: Topology,
    drop_tokens: bool,
) -> Traffic:
    """DeepSpeed-MoE: capacity-padded buffers (``schedule.fixed_rows``: E/R experts' capacity rows to
    every peer); lossless capacity = the group's largest expert count."""
    world = topology.world_size
    tokens, k = topk_ids_RTK.shape[1], topk_ids_RTK.shape[2]
    counts_RE = np.stack([np.bincount(ids.ravel(), minlength=num_experts) for ids in topk_ids_RTK])
    if drop_tokens:
        capacity = max(int(np.ceil(tokens / num_experts * DEEPSPEED_DEFAULT.eval_capacity_factor * k)),
                       DEEPSPEED_DEFAULT.min_capacity)  # fmt: skip
    else:
        capacity = int(counts_RE.max())
    rows_RR = _summed_hops(lambda origin: fixed_rows(num_experts // world * capacity, topology=topology,
                                                     origin=origin), world)[0]  # fmt: skip
    bytes_RR = rows_RR * float(hidden * itemsize)
    rows_R = np.full(world, float(num_experts * capacity))
    return Traffic(stages=(bytes_RR, bytes_RR.T.copy()), rows_R=rows_R, row_stages=2)


def _summed_hops(rows_of_origin: Callable[[int], list[np.ndarray]], world: int) -> list[np.ndarray]:
    """Every origin's hop rows added up: [hop][sender, receiver], as floats."""
    per_origin = [rows_of_origin(origin) for origin in range(world)]
    return [
        np.sum([hops[index] for hops in per_origin], axis=0).astype(float)
        for index in range(len(per_origin[0]))
    ]


def header_bytes(mode: str, *, topology: Topology, slot_stride: int) -> int:
    """Bytes of the runtime's header row for a system whose grace.communication.path is `mode`: the
    hierarchical columns unless fixed flat, the path policy's columns when chosen per forward."""
    import torch

    from ds_grace.comm.all_to_all import header_row_bytes
    from ds_grace.comm.path_model import PathPolicy

    extra = 0
    policy = PathPolicy(mode, topology=topology, model=lambda: None)  # type: ignore[arg-type, return-value]
    if policy.adaptive:
        member_TR = torch.zeros(1, topology.world_size, dtype=torch.bool)
        extra = int(policy.header_columns(member_TR, 0).numel())
    return header_row_bytes(gpus_per_node=topology.gpus_per_node, slot_stride=slot_stride, extra=extra,
                            hierarchical=mode != "flat")  # fmt: skip


def grace_traffic(
    topk_ids_RTK: np.ndarray,
    *,
    layer: LayerPlan,
    topology: Topology,
    policy: str,
    path: PathName,
    mode: str | None = None,
    hidden: int,
    itemsize: int,
    low_latency_rows: int | None = None,
    low_latency_policy: str | None = None,
) -> Traffic:
    """GRACE: the rows of each hop of `path` (``schedule.path_rows``) for the instances the runtime
    chooses, after the header round of a system configured with path `mode` (None: `path`).

    low_latency_rows: the low-latency bound (tokens per rank); when every rank holds at most that many
    tokens the forward takes the low-latency path instead (``schedule.fixed_rows``: a buffer of as
    many rows as tokens to every peer and back, no header round; the experts compute their routed
    rows), and its instances are chosen by `low_latency_policy` (None: `policy`), as
    grace.routing.low_latency_policy does."""
    import torch

    from ds_grace.comm.all_to_all import dispatch_row_bytes
    from ds_grace.routing import RouteTable, choose_instances

    world = topology.world_size
    k = topk_ids_RTK.shape[2]
    dtype = {4: torch.float32, 2: torch.bfloat16}[itemsize]
    dispatch_bytes, combine_bytes = dispatch_row_bytes(k, hidden, dtype), hidden * itemsize
    tokens = topk_ids_RTK.shape[1]
    low_latency = low_latency_rows is not None and tokens <= low_latency_rows
    if low_latency:
        policy = low_latency_policy or policy
    table = RouteTable.build(layer, topology, policy)  # type: ignore[arg-type]
    members: list[np.ndarray] = []  # per origin: member_TR, True where the token has a route on rank r
    rows_R = np.zeros(world)
    for origin in range(world):
        rank_TK, _ = choose_instances(table, torch.tensor(topk_ids_RTK[origin]), origin_rank=origin)
        rank_TK = rank_TK.numpy()
        member_TR = np.zeros((rank_TK.shape[0], world), dtype=bool)
        np.put_along_axis(member_TR, rank_TK, True, axis=1)
        members.append(member_TR)
        rows_R += np.bincount(rank_TK.ravel(), minlength=world)
    if low_latency:
        rows_RR = _summed_hops(lambda origin: fixed_rows(tokens, topology=topology, origin=origin), world)[0]
        return Traffic(
            stages=(rows_RR * dispatch_bytes, rows_RR.T * combine_bytes), rows_R=rows_R, row_stages=2
        )
    hops = _summed_hops(
        lambda origin: path_rows(members[origin], path=path, topology=topology, origin=origin), world
    )
    slot_stride = max(1, max(len(slots) for slots in layer.slots))
    header_RR = np.full(
        (world, world), float(header_bytes(mode or path, topology=topology, slot_stride=slot_stride))
    )
    stages = [header_RR, *(rows_RR * dispatch_bytes for rows_RR in hops),
              *(rows_RR.T * combine_bytes for rows_RR in reversed(hops))]  # fmt: skip
    return Traffic(stages=tuple(stages), rows_R=rows_R, row_stages=2 * len(hops))


def system_traffic(
    system: SystemSpec,
    topk_ids_RTK: np.ndarray,
    *,
    plans: dict[str, GracePlan],
    layer_index: int,
    shape_experts: int,
    hidden: int,
    itemsize: int,
    topology: Topology,
    hierarchical: bool | None = None,
) -> Traffic:
    if system.kind == "vanilla":
        return vanilla_traffic(topk_ids_RTK, num_experts=shape_experts, hidden=hidden, itemsize=itemsize,
                               topology=topology, drop_tokens=system.drop_tokens)  # fmt: skip
    assert system.plan is not None  # every GRACE system names its plan
    if hierarchical is None:
        hierarchical = system.path != "flat"
    return grace_traffic(
        topk_ids_RTK,
        layer=plans[system.plan].layers[layer_index],
        topology=topology,
        policy=system.policy,
        path="hierarchical" if hierarchical else "flat",
        mode=system.path,
        hidden=hidden,
        itemsize=itemsize,
        low_latency_rows=DEFAULT_COMMUNICATION.low_latency_max_tokens or None,
        low_latency_policy=DEFAULT_ROUTING.low_latency_policy,
    )


def candidate_traffics(system: SystemSpec, topk_ids_RTK: np.ndarray, **kwargs: Any) -> list[Traffic]:
    """The traffic of each path the system may take: both for full GRACE (adaptive), else its one path."""
    if system.path == "auto":
        return [system_traffic(system, topk_ids_RTK, hierarchical=h, **kwargs) for h in (False, True)]
    return [system_traffic(system, topk_ids_RTK, **kwargs)]


# ---- calibration on the emulated runs ----


def measured_features(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Per measured row of bench.json (netns settings): the features of its forwards (median) and its time."""
    topology = Topology(bench["topology"]["num_nodes"], bench["topology"]["gpus_per_node"])
    by_workload: dict[str, Any] = {}
    replayed = {w["name"] for w in bench["workloads"]}
    out = []
    for row in bench["rows"]:
        if row["rate_mbit"] is None or row["workload"] not in replayed:
            continue
        name = row["workload"]
        if name not in by_workload:
            spec = spec_from_dict(next(w for w in bench["workloads"] if w["name"] == name))
            calibration, replay = calibration_and_replay(spec.model)
            plans = build_plans(calibration, topology, SYSTEMS)
            batches = replay_batches(spec, replay, seed=0)
            by_workload[name] = (spec, plans, batches)
        spec, plans, batches = by_workload[name]
        system = next(s for s in SYSTEMS if s.name == row["system"])
        per_forward = []
        world = topology.world_size
        hierarchical = None
        if system.path == "auto" and row.get("paths"):  # the path the runtime took most often
            hierarchical = row["paths"]["hierarchical"] > row["paths"]["flat"]
        for i in range(spec.warmup, len(batches.layer_I)):
            ids_RTK = batches.topk_ids_ITK[i].reshape(world, -1, spec.shape.top_k)
            traffic = system_traffic(system, ids_RTK, plans=plans, layer_index=int(batches.layer_I[i]),
                                     shape_experts=spec.shape.num_experts, hidden=spec.shape.hidden, itemsize=4,
                                     topology=topology, hierarchical=hierarchical)  # fmt: skip
            per_forward.append(features(traffic, topology, topology.gpus_per_node))
        x = np.median(np.stack(per_forward), axis=0)
        x[0] /= row["rate_mbit"] * 1e6 / 8  # inter bytes -> seconds at the nominal link rate
        out.append({"row": row, "x": x})
    return out


def calibrate(bench: dict[str, Any]) -> dict[str, Any]:
    """Fit [1/efficiency, 1/B_intra, t_row, alpha, overhead] (>= 0) to the measured medians; report errors."""
    from scipy.optimize import nnls

    items = measured_features(bench)
    if not items:
        raise ValueError("bench.json holds no emulated (netns) rows to calibrate on")
    X = np.stack([item["x"] for item in items])
    y = np.array([item["row"]["median_ms"] / 1e3 for item in items])
    weights = 1.0 / y  # relative error
    coef, _ = nnls(X * weights[:, None], y * weights)
    predicted = X @ coef
    errors = []
    for item, p in zip(items, predicted):
        row = item["row"]
        errors.append({"workload": row["workload"], "setting": row["setting"], "system": row["system"],
                       "measured_ms": row["median_ms"], "predicted_ms": p * 1e3,
                       "relative_error": (p * 1e3 - row["median_ms"]) / row["median_ms"]})  # fmt: skip
    rel = np.abs([e["relative_error"] for e in errors])
    per_system = {}
    for name in dict.fromkeys(e["system"] for e in errors):
        errs = np.abs([e["relative_error"] for e in errors if e["system"] == name])
        per_system[name] = {"rows": len(errs), "mean_abs_relative_error": float(errs.mean()),
                            "max_abs_relative_error": float(errs.max())}  # fmt: skip
    return {
        "per_system": per_system,
        "link_efficiency": 1.0 / coef[0] if coef[0] > 0 else None,
        "intra_bytes_per_s": 1.0 / coef[1] if coef[1] > 0 else None,
        "row_s": coef[2], "alpha_s": coef[3], "overhead_s": coef[4],
        "mean_abs_relative_error": float(rel.mean()), "median_abs_relative_error": float(np.median(rel)),
        "max_abs_relative_error": float(rel.max()), "rows": errors,
    }  # fmt: skip


# ---- predictions for real hardware ----


def hardware_model(
    profile: HardwareProfile, shape: ModelShape, *, link_efficiency: float, mfu: float
) -> LinkModel:
    flops_per_row = 2 * shape.real_matrices * shape.real_hidden * shape.real_ffn
    return LinkModel(
        inter_bytes_per_s=profile.inter_node_bytes_per_s * link_efficiency, gpus_per_link=profile.gpus_per_link,
        intra_bytes_per_s=profile.intra_node_bytes_per_s * link_efficiency, alpha_s=profile.inter_latency_s,
        row_s=flops_per_row / (profile.peak_flops * mfu),
    )  # fmt: skip


def predict(
    *,
    model_name: str = "olmoe-real",
    nodes: Sequence[int] = (2, 4, 8),
    gpus_per_node: int = 8,
    tokens_per_forward: int = PAPER_BATCH * PAPER_PREFILL,
    forwards: int = 3,
    link_efficiency: float = 0.8,
    mfu: float = 0.4,
) -> list[dict[str, Any]]:
    """Predicted MoE-layer time of every system for each cluster size and hardware profile (real model dims, bf16)."""
    shape = MODELS[model_name]
    calibration, replay = calibration_and_replay(model_name)
    out = []
    for num_nodes in nodes:
        topology = Topology(num_nodes, gpus_per_node)
        if shape.num_experts % topology.world_size:
            continue  # vanilla DeepSpeed-MoE needs E divisible by the ranks
        plans = build_plans(calibration, topology, SYSTEMS)
        per_rank = tokens_per_forward // topology.world_size
        traffics: dict[str, list[list[Traffic]]] = {s.name: [] for s in SYSTEMS}
        for i in range(forwards):
            layer = i % replay.num_layers
            ids = replay.topk_ids[layer]
            rows = (i * tokens_per_forward + np.arange(per_rank * topology.world_size)) % len(ids)
            ids_RTK = ids[rows].reshape(topology.world_size, per_rank, shape.top_k)
            for system in SYSTEMS:
                traffics[system.name].append(candidate_traffics(
                    system, ids_RTK, plans=plans, layer_index=layer, shape_experts=shape.num_experts,
                    hidden=shape.real_hidden, itemsize=2, topology=topology,
                ))  # fmt: skip
        for profile in PROFILES:
            model = hardware_model(profile, shape, link_efficiency=link_efficiency, mfu=mfu)
            # each forward: the system's path, or for full GRACE the faster of its two candidates
            times = {name: float(np.median([min(forward_time(t, topology, model) for t in options)
                                            for options in per_forward]))
                     for name, per_forward in traffics.items()}  # fmt: skip
            best_peer = min(PEERS, key=times.__getitem__)
            for name, t in times.items():
                out.append({"model": model_name, "profile": profile.name, "nodes": num_nodes,
                            "gpus_per_node": gpus_per_node, "system": name, "predicted_ms": t * 1e3,
                            "speedup_vs_vanilla_lossless": times["vanilla_lossless"] / t,
                            "best_peer": best_peer, "speedup_vs_best_peer": times[best_peer] / t})  # fmt: skip
    return out


def plot_predictions(predictions: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = list(dict.fromkeys(p["profile"] for p in predictions))
    fig, axes = plt.subplots(1, len(profiles), figsize=(6 * len(profiles), 4.2), squeeze=False)
    for ax, profile in zip(axes[0], profiles):
        rows = [p for p in predictions if p["profile"] == profile]
        for system in dict.fromkeys(r["system"] for r in rows):
            pts = [
                (r["nodes"] * r["gpus_per_node"], r["predicted_ms"]) for r in rows if r["system"] == system
            ]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs (nodes x 8)")
        ax.set_ylabel("predicted MoE layer time (ms)")
        ax.set_title(f"{rows[0]['model']} on {profile}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def summary_markdown(calibration: dict[str, Any], predictions: list[dict[str, Any]]) -> str:
    """Calibration error (overall and per system) and the scale table, for benchmarks/README.md."""
    per_system = ", ".join(
        f"{name} {item['mean_abs_relative_error']:.0%}" for name, item in calibration["per_system"].items()
    )
    model = predictions[0]["model"] if predictions else "?"
    lines = [
        f"Calibration on {len(calibration['rows'])} emulated rows (`results/bench.json`): mean |relative error| "
        f"{calibration['mean_abs_relative_error']:.1%}, median {calibration['median_abs_relative_error']:.1%}, "
        f"max {calibration['max_abs_relative_error']:.1%}. Fitted: link efficiency "
        f"{calibration['link_efficiency'] or float('nan'):.2f}, t_row {calibration['row_s'] * 1e6:.1f} us, "
        f"alpha {calibration['alpha_s'] * 1e3:.2f} ms per stage, overhead {calibration['overhead_s'] * 1e3:.2f} ms.",
        "",
        f"Mean |relative error| per system: {per_system}.",
        "",
        f"Predicted MoE-layer time (ms) of full GRACE vs the sparse peers, {model}, prefill 256 x 128 tokens "
        "(speedup of GRACE vs the best peer and vs DeepSpeed-MoE lossless in the last columns):",
        "",
    ]
    systems = ["vanilla_lossless", *PEERS, "grace"]
    lines.append("| profile | GPUs | " + " | ".join(systems) + " | GRACE vs best peer | GRACE vs lossless |")
    lines.append("|" + "---|" * (4 + len(systems)))
    for profile in dict.fromkeys(p["profile"] for p in predictions):
        for nodes in dict.fromkeys(p["nodes"] for p in predictions):
            cells = {p["system"]: p for p in predictions if p["profile"] == profile and p["nodes"] == nodes}
            if not cells:
                continue
            gpus = f"{nodes}x{next(iter(cells.values()))['gpus_per_node']}"
            grace = cells["grace"]
            lines.append(f"| {profile} | {gpus} | " + " | ".join(f"{cells[s]['predicted_ms']:.2f}" for s in systems)
                         + f" | {grace['speedup_vs_best_peer']:.2f}x ({grace['best_peer']}) | "
                         f"{grace['speedup_vs_vanilla_lossless']:.1f}x |")  # fmt: skip
    return "\n".join(lines)


def update_readme_section(text: str, *, readme: Path = REPO_ROOT / "benchmarks" / "README.md") -> None:
    start, end = "<!-- simulator:start -->", "<!-- simulator:end -->"
    content = readme.read_text() if readme.exists() else ""
    if start not in content or end not in content:
        content += f"\n{start}\n{end}\n"
    before, rest = content.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{start}\n{text}\n{end}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bench", type=Path, default=RESULTS_DIR / "bench.json", help="emulated runs to calibrate on"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "simulator.json")
    parser.add_argument("--mfu", type=float, default=0.4, help="expert compute efficiency on real GPUs")
    parser.add_argument(
        "--no-readme", action="store_true", help="do not rewrite the section in benchmarks/README.md"
    )
    parser.add_argument(
        "--link-efficiency", type=float, default=0.8, help="achieved / nominal link bandwidth"
    )
    args = parser.parse_args(argv)
    bench = json.loads(args.bench.read_text())
    calibration = calibrate(bench)
    print(f"calibration on {len(calibration['rows'])} emulated rows: mean |relative error| "
          f"{calibration['mean_abs_relative_error']:.1%}, median {calibration['median_abs_relative_error']:.1%}, "
          f"max {calibration['max_abs_relative_error']:.1%}; link efficiency {calibration['link_efficiency']}, "
          f"t_row {calibration['row_s'] * 1e6:.1f} us, alpha {calibration['alpha_s'] * 1e3:.2f} ms, "
          f"overhead {calibration['overhead_s'] * 1e3:.2f} ms")  # fmt: skip
    predictions = predict(mfu=args.mfu, link_efficiency=args.link_efficiency)
    for p in predictions:
        print(f"{p['model']} {p['profile']:<11} {p['nodes']}x{p['gpus_per_node']} {p['system']:<18} "
              f"{p['predicted_ms']:9.3f} ms  {p['speedup_vs_vanilla_lossless']:5.2f}x")  # fmt: skip
    plot = plot_predictions(predictions, args.output.with_suffix(".png"))
    write_text_atomic(args.output, json.dumps({
        "calibration": calibration, "predictions": predictions, "plot": str(plot.resolve().relative_to(REPO_ROOT)),
        "assumptions": {"mfu": args.mfu, "link_efficiency": args.link_efficiency,
                        "profiles": [asdict(p) for p in PROFILES], "tokens_per_forward": PAPER_BATCH * PAPER_PREFILL,
                        "model": "olmoe (real dims: hidden 2048, expert ffn 1024, SwiGLU, bf16)"},
    }, indent=1))  # fmt: skip
    if not args.no_readme:
        update_readme_section(summary_markdown(calibration, predictions))
    print(f"wrote {args.output} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
