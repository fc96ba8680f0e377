"""What every rank of a benchmark run does: build the systems, replay the routing, time and check.

Shape legend: T tokens on this rank, D hidden, K top-k, E experts, R ranks, G GPUs per node,
I measured forwards.

Every rank builds the same experts from seeds (so it can also compute the single-process reference
for its own tokens), its share of each system (DeepSpeed's contiguous experts, or the plan's slots),
and replays each forward of the workload through every system in turn (order shuffled per forward,
seeded: the spec's order_seed).
One forward is timed from a barrier to this rank's finish; the slowest rank's time is the forward's
latency. Per forward it records: the experts' compute time (slowest rank), bytes sent inside and
across nodes (all ranks; GRACE: its traffic counters, vanilla: DeepSpeed's capacity-padded buffers),
dropped routes and the max |y - reference|.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from benchmarks.systems import SYSTEM_BY_NAME, SystemSpec
from benchmarks.workloads import ModelShape, ReplayBatches, WorkloadSpec, spec_from_dict
from ds_grace.comm.groups import create_grace_groups
from ds_grace.comm.schedule import cross_node_mask, fixed_rows
from ds_grace.moe.layer import GraceMoE
from ds_grace.planning.plan import GracePlan
from ds_grace.topology import Topology
from ds_grace.vanilla import DEEPSPEED_DEFAULT, gate_stats

MODEL_SEEDS = {"mixtral": 11, "olmoe": 23, "qwen15": 31, "olmoe-real": 37}


def make_expert(shape: ModelShape, layer: int, expert: int) -> nn.Module:
    """Expert `expert` of trace layer `layer`: the same weights on every rank (seeded)."""
    gen = torch.Generator().manual_seed(MODEL_SEEDS.get(shape.name, 0) * 1_000_003 + layer * 1009 + expert)
    module = nn.Sequential(nn.Linear(shape.hidden, shape.ffn), nn.GELU(), nn.Linear(shape.ffn, shape.hidden))
    with torch.no_grad():
        for linear in (module[0], module[2]):
            fan_in = linear.weight.shape[1]
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) / fan_in**0.5)
            linear.bias.copy_(0.1 * torch.randn(linear.bias.shape, generator=gen))
    return module.eval()


def reference_output(
    experts: list[nn.Module], x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
) -> torch.Tensor:
    """sum_k w_k * expert[id_k](x) in one process, every expert run once on exactly its rows."""
    y_TD = torch.zeros_like(x_TD)
    for expert_id in torch.unique(topk_ids_TK).tolist():
        rows, cols = torch.nonzero(topk_ids_TK == expert_id, as_tuple=True)
        y_TD.index_add_(0, rows, topk_weights_TK[rows, cols, None] * experts[expert_id](x_TD[rows]))
    return y_TD


def vanilla_bytes(
    *, capacity: int, num_experts: int, hidden: int, itemsize: int, topology: Topology
) -> tuple[int, int]:
    """(intra, inter) bytes one rank sends in DeepSpeed's two all-to-alls (every rank the same): an
    [E, C, D] buffer split evenly over the R ranks of the EP group, E/R experts' capacity rows to every
    peer (``schedule.fixed_rows``, the padded all-to-all's one hop), there and back."""
    rank = 0
    (rows_RR,) = fixed_rows(num_experts // topology.world_size * capacity, topology=topology, origin=rank)
    crosses_R = cross_node_mask(topology)[rank]
    others_R = np.arange(topology.world_size) != rank
    row_bytes = hidden * itemsize
    intra = int(rows_RR[rank, others_R & ~crosses_R].sum()) * row_bytes
    inter = int(rows_RR[rank, crosses_R].sum()) * row_bytes
    return 2 * intra, 2 * inter


class _Stopwatch:
    """Sums the time a module's forward takes (hooks), reset per measured forward."""

    def __init__(self, module: nn.Module) -> None:
        self.elapsed_s = 0.0
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.elapsed_s += time.perf_counter() - self._start


class _RankSystem:
    """One system's layers on this rank, with the instruments that measure it."""

    def __init__(
        self, spec: SystemSpec, layers: list[nn.Module], *, shape: ModelShape, topology: Topology
    ) -> None:
        self.spec = spec
        self.layers = layers
        self.shape = shape
        self.topology = topology
        self.stopwatches = [_Stopwatch(self._experts_of(layer)) for layer in layers]
        self.gate_outputs: list[Any] = []
        if spec.kind == "vanilla":
            for layer in layers:
                layer.gate.register_forward_hook(lambda _m, _a, out: self.gate_outputs.append(out))

    def _experts_of(self, layer: nn.Module) -> nn.Module:
        if isinstance(layer, GraceMoE):
            return layer.deepspeed_moe.experts
        return layer.moe.deepspeed_moe.experts

    def forward(
        self, layer_index: int, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor
    ) -> torch.Tensor:
        # GraceMoE and DeepSpeedRoutedExperts both take the replayed routing; every rank holds the same
        # token count, so a forward within the low-latency bound is promised to take that path
        layer = self.layers[layer_index]
        if (
            isinstance(layer, GraceMoE)
            and 0 < x_TD.shape[0] <= layer.deepspeed_moe.options.low_latency_max_tokens
        ):
            return layer.forward_routed(x_TD, ids_TK, w_TK, low_latency_tokens=int(x_TD.shape[0]))
        return layer.forward_routed(x_TD, ids_TK, w_TK)

    def reset(self, layer_index: int) -> None:
        self.stopwatches[layer_index].elapsed_s = 0.0
        self.gate_outputs.clear()
        layer = self.layers[layer_index]
        if isinstance(layer, GraceMoE):
            layer.comm_counters.reset()

    def measure(self, layer_index: int, *, routes: int) -> dict[str, float]:
        """This rank's bytes, drops and expert time of the forward just run."""
        layer = self.layers[layer_index]
        if isinstance(layer, GraceMoE):
            total = layer.comm_counters.total(include_sizes=True)
            intra, inter = total.bytes_sent_intra, total.bytes_sent_inter
            computed = sum(layer.comm_counters.expert_rows)
            dropped, capacity = routes - computed, 0
        else:
            stats = gate_stats(self.shape.top_k, self.gate_outputs[-1], None)
            capacity, dropped = stats.capacity, stats.dropped
            intra, inter = vanilla_bytes(
                capacity=capacity,
                num_experts=self.shape.num_experts,
                hidden=self.shape.hidden,
                itemsize=4,
                topology=self.topology,
            )
        path = layer.deepspeed_moe.last_path if isinstance(layer, GraceMoE) else None
        costs_s = layer.deepspeed_moe.last_path_costs_s if isinstance(layer, GraceMoE) else None
        flat_s, hier_s = costs_s if costs_s is not None else (float("nan"), float("nan"))
        return {
            "predicted_flat_s": flat_s,
            "predicted_hier_s": hier_s,
            "path_hierarchical": float(path == "hierarchical"),
            "path_low_latency": float(path == "low-latency"),
            "expert_s": self.stopwatches[layer_index].elapsed_s,
            "bytes_intra": float(intra),
            "bytes_inter": float(inter),
            "dropped": float(dropped),
            "capacity": float(capacity),
        }


def _build_system(
    spec: SystemSpec,
    *,
    shape: ModelShape,
    experts_LE: list[list[nn.Module]],
    plans: dict[str, GracePlan],
    topology: Topology,
    rank: int,
    timeout_s: float,
) -> _RankSystem:
    layers: list[nn.Module] = []
    if spec.kind == "vanilla":
        from ds_grace.inference import DeepSpeedRoutedExperts

        per_rank = shape.num_experts // topology.world_size
        for experts in experts_LE:
            layer = DeepSpeedRoutedExperts(
                experts[rank * per_rank : (rank + 1) * per_rank],
                num_experts=shape.num_experts,
                ep_size=topology.world_size,
                hidden_size=shape.hidden,
                k=shape.top_k,
                drop_tokens=spec.drop_tokens,
                eval_capacity_factor=DEEPSPEED_DEFAULT.eval_capacity_factor,
                min_capacity=DEEPSPEED_DEFAULT.min_capacity,
            ).eval()
            layer.moe.set_deepspeed_parallelism()
            layers.append(layer)
    else:
        assert spec.plan is not None  # SYSTEMS defines a plan for every GRACE system
        plan = plans[spec.plan]
        options = spec.runtime_options(timeout_s=timeout_s)
        groups = create_grace_groups(topology, timeout_s=timeout_s)
        for index, experts in enumerate(experts_LE):
            layer = GraceMoE.from_experts(
                experts,
                hidden_size=shape.hidden,
                k=shape.top_k,
                layer_plan=plan.layers[index],
                topology=topology,
                ep_index=rank,
                options=options,
            ).eval()
            layer.set_grace_groups(groups)
            layers.append(layer)
    return _RankSystem(spec, layers, shape=shape, topology=topology)


def expert_seconds_per_row(shape: ModelShape, *, rows: int = 64, repeats: int = 7) -> float:
    """Median time of one expert on `rows` rows, per row, measured on this rank (all ranks at once)."""
    expert = make_expert(shape, 0, 0)
    x_TD = torch.randn(rows, shape.hidden, generator=torch.Generator().manual_seed(5))
    samples = []
    with torch.no_grad():
        expert(x_TD)
        for _ in range(repeats):
            start = time.perf_counter()
            expert(x_TD)
            samples.append((time.perf_counter() - start) / rows)
    return statistics.median(samples)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_workload(
    workload: WorkloadSpec,
    *,
    systems: tuple[SystemSpec, ...],
    replay: ReplayBatches,
    plans: dict[str, GracePlan],
    topology: Topology,
    rank: int,
    timeout_s: float = 300.0,
    seed: int = 0,
    order_seed: int = 0,
    on_forward: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | None:
    """Run every system on `workload`; collective. Rank 0 returns {"systems": per-system summary,
    "expert_s_per_row": measured expert time per row}, the other ranks None."""
    shape = workload.shape
    world = topology.world_size
    tokens = workload.tokens_per_forward
    if tokens % world:
        raise ValueError(f"tokens per forward ({tokens}) must be a multiple of the world size ({world})")
    per_rank = tokens // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    experts_LE = [[make_expert(shape, layer, e) for e in range(shape.num_experts)] for layer in shape.layers]
    built = [
        _build_system(spec, shape=shape, experts_LE=experts_LE, plans=plans, topology=topology, rank=rank,
                      timeout_s=timeout_s)
        for spec in systems
    ]  # fmt: skip
    # every workload builds its layers afresh: each layer's path policy starts as a fresh server's would
    dist.barrier()
    row_s = torch.tensor([expert_seconds_per_row(shape)], dtype=torch.float64)
    dist.all_reduce(row_s)
    expert_s_per_row = float(row_s) / world
    keys = (
        "time_s",
        "expert_s",
        "bytes_intra",
        "bytes_inter",
        "dropped",
        "routes",
        "max_abs_diff",
        "capacity",
        "reference_max",
        "path_hierarchical",
        "path_low_latency",
        "predicted_flat_s",
        "predicted_hier_s",
    )
    records = {spec.name: {key: [] for key in keys} for spec in systems}
    # systems run in a shuffled order per forward (the same on every rank: seeded), so that no system
    # always follows the same predecessor through the shaped link's token bucket
    order_rng = np.random.default_rng(order_seed)
    count = len(replay.layer_I)
    with torch.no_grad():
        for i in range(count):
            layer_index = int(replay.layer_I[i])
            gen = torch.Generator().manual_seed(seed * 7919 + i)
            x_TD = torch.randn(tokens, shape.hidden, generator=gen)[mine].contiguous()
            ids_TK = torch.from_numpy(replay.topk_ids_ITK[i][mine]).long()
            w_TK = torch.from_numpy(replay.topk_weights_ITK[i][mine]).float()
            reference_TD = reference_output(experts_LE[layer_index], x_TD, ids_TK, w_TK)
            order = [built[j] for j in order_rng.permutation(len(built))]
            for system in order:
                system.reset(layer_index)
                dist.barrier()
                start = time.perf_counter()
                y_TD = system.forward(layer_index, x_TD, ids_TK, w_TK)
                elapsed = time.perf_counter() - start
                if i < workload.warmup:
                    continue
                measured = system.measure(layer_index, routes=ids_TK.numel())
                record = records[system.spec.name]
                record["time_s"].append(elapsed)
                record["routes"].append(float(ids_TK.numel()))
                record["reference_max"].append(
                    float(reference_TD.abs().max()) if reference_TD.numel() else 0.0
                )
                record["max_abs_diff"].append(
                    float((y_TD.float() - reference_TD).abs().max()) if y_TD.numel() else 0.0
                )
                for key, value in measured.items():
                    record[key].append(value)
            if on_forward is not None:
                on_forward(i + 1, count)
    reduce_ops = {
        "time_s": dist.ReduceOp.MAX, "expert_s": dist.ReduceOp.MAX, "bytes_intra": dist.ReduceOp.SUM,
        "bytes_inter": dist.ReduceOp.SUM, "dropped": dist.ReduceOp.SUM, "routes": dist.ReduceOp.SUM,
        "max_abs_diff": dist.ReduceOp.MAX, "capacity": dist.ReduceOp.MAX, "reference_max": dist.ReduceOp.MAX,
        "path_hierarchical": dist.ReduceOp.MAX, "path_low_latency": dist.ReduceOp.MAX,
        "predicted_flat_s": dist.ReduceOp.MAX, "predicted_hier_s": dist.ReduceOp.MAX,
    }  # fmt: skip
    summary: dict[str, Any] = {}
    for spec in systems:
        reduced = {}
        for key in keys:
            values = torch.tensor(records[spec.name][key], dtype=torch.float64)
            dist.all_reduce(values, op=reduce_ops[key])
            reduced[key] = values.tolist()
        summary[spec.name] = _summarize(reduced)
    return {"systems": summary, "expert_s_per_row": expert_s_per_row} if rank == 0 else None


def _summarize(per_forward: dict[str, list[float]]) -> dict[str, Any]:
    times = per_forward["time_s"]
    return {
        "median_ms": statistics.median(times) * 1e3,
        "p90_ms": _percentile(times, 90) * 1e3,
        "expert_median_ms": statistics.median(per_forward["expert_s"]) * 1e3,
        "bytes_intra_node": statistics.fmean(per_forward["bytes_intra"]),
        "bytes_cross_node": statistics.fmean(per_forward["bytes_inter"]),
        "dropped_routes": int(sum(per_forward["dropped"])),
        "routes": int(sum(per_forward["routes"])),
        "max_abs_diff": max(per_forward["max_abs_diff"]),
        "capacity_max": int(max(per_forward["capacity"])),
        "reference_scale": max(1.0, max(per_forward["reference_max"])),
        "forwards": len(times),
        # forwards on each path (sparse runtime; the same on every rank): low-latency, hierarchical, flat
        "paths": {
            "low-latency": int(sum(per_forward["path_low_latency"])),
            "hierarchical": int(sum(per_forward["path_hierarchical"])),
            "flat": len(times)
            - int(sum(per_forward["path_low_latency"]) + sum(per_forward["path_hierarchical"])),
        },
        "per_forward_ms": [t * 1e3 for t in times],
        # the cost model's prediction of each path's payload rounds per forward, corrected by the measured
        # residuals, on which full GRACE decided (identical on every rank)
        **_predicted_ms(per_forward["predicted_flat_s"], per_forward["predicted_hier_s"]),
    }


def _predicted_ms(flat_s: list[float], hier_s: list[float]) -> dict[str, Any]:
    pairs = [(f, h) for f, h in zip(flat_s, hier_s, strict=True) if not (np.isnan(f) or np.isnan(h))]
    if not pairs:
        return {}
    return {
        "predicted_flat_median_ms": statistics.median(f for f, _ in pairs) * 1e3,
        "predicted_hier_median_ms": statistics.median(h for _, h in pairs) * 1e3,
    }


def run_spec_on_rank(spec: dict[str, Any], *, rank: int, topology: Topology) -> dict[str, Any] | None:
    """The whole benchmark spec (every workload) on this rank; rank 0 returns the results."""
    if spec.get("e2e") is not None:
        from benchmarks.e2e import run_e2e_on_rank

        return run_e2e_on_rank(spec["e2e"], rank=rank, topology=topology)
    workdir = Path(spec["workdir"])
    systems = tuple(SYSTEM_BY_NAME[name] for name in spec["systems"])
    progress = workdir / "progress.txt"
    results: dict[str, Any] = {}
    total = sum(int(w["warmup"]) + int(w["steps"]) for w in spec["workloads"])
    done = 0
    for index, data in enumerate(spec["workloads"]):
        workload = spec_from_dict(data)
        replay = ReplayBatches.load(workdir / f"{workload.name}.replay.npz")
        prefix = data.get("plan_prefix", workload.model)
        plans = {key: GracePlan.load(workdir / f"{prefix}.{key}.plan.json") for key in data["plans"]}
        result_key = data.get("result_key", workload.name)

        def on_forward(i: int, _n: int, _base: int = done, _name: str = workload.name) -> None:
            if rank == 0:
                with open(progress, "a") as handle:
                    handle.write(f"{_base + i} {total} {_name}\n")

        started = time.perf_counter()
        summary = run_workload(
            workload, systems=systems, replay=replay, plans=plans, topology=topology, rank=rank,
            timeout_s=float(spec.get("timeout_s", 300.0)), seed=int(spec.get("seed", 0)),
            order_seed=int(spec.get("order_seed", 0)) * 1_000_003 + index, on_forward=on_forward,
        )  # fmt: skip
        done += workload.warmup + workload.steps
        if summary is not None:
            results[result_key] = {**summary, "wall_s": time.perf_counter() - started}
    if spec.get("model") is not None:
        from benchmarks.model_forward import MODEL_WORKLOAD, run_model_on_rank

        started = time.perf_counter()
        model_summary = run_model_on_rank(
            spec["model"], rank=rank, topology=topology, systems=list(spec["systems"])
        )
        if model_summary is not None:
            results[MODEL_WORKLOAD] = {"systems": model_summary, "expert_s_per_row": None,
                                       "wall_s": time.perf_counter() - started}  # fmt: skip
    return results if rank == 0 else None


def result_line(results: dict[str, Any]) -> str:
    return json.dumps({"bench_result": results})
