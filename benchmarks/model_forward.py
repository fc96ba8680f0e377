"""A full model forward: a tiny Mixtral checkpoint served by ds_grace.init_inference, as vanilla
DeepSpeed-MoE (default capacity and lossless) and as GRACE (flat + TAR, and full GRACE with HSC).

Shape legend: B sequences on this rank, S sequence length, V vocabulary.

The checkpoint is built from a seed (ds_grace.models.tiny_checkpoint, widened so that expert compute
is not negligible), its routing profiled on random prompts, and a GRACE plan built from that trace
(GraceConfig defaults) before the ranks start. Every rank forwards its own prompts; latency is the
slowest rank's forward; the MoE layers' share of it is timed with hooks. Parity: logits against the
same checkpoint run in one process by transformers.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ds_grace.topology import Topology

MODEL_WORKLOAD = "tiny-mixtral-model"
TINY_OVERRIDES = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
FIRST_TOKEN, VOCAB = 3, 128


def system_blocks(plan_path: str, topology: Topology) -> dict[str, dict[str, Any]]:
    """The grace block of each served system (the topology declared: local ranks look like one node)."""
    shape = {"num_nodes": topology.num_nodes, "gpus_per_node": topology.gpus_per_node}
    off = {"enabled": False, "topology": shape}
    grace = {"enabled": True, "topology": shape, "plan": {"path": plan_path}, "routing": {"policy": "tar"}}
    return {
        "vanilla_default": {
            **off,
            "vanilla": {"drop_tokens": True, "eval_capacity_factor": 1.0, "min_capacity": 4},
        },
        "vanilla_lossless": {
            **off,
            "vanilla": {"drop_tokens": False, "eval_capacity_factor": 1.0, "min_capacity": 4},
        },
        "grace_tar": {**grace, "communication": {"path": "flat", "dedup": True}},
        "grace_hsc": {
            **grace,
            "communication": {"path": "hierarchical", "dedup": True},
        },
        "grace": grace,  # the default communication block: path chosen per layer and forward
    }


def prompts(*, sequences: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, VOCAB, (sequences, length), generator=generator)


def prepare_model(
    workdir: Path, topology: Topology, *, sequences: int, length: int, steps: int, warmup: int
) -> dict[str, Any]:
    """Checkpoint, routing profile and GRACE plan (in this process); returns the model part of the spec."""
    from ds_grace.config import GraceConfig
    from ds_grace.models import load_checkpoint, tiny_checkpoint
    from ds_grace.planning.build import build_plan
    from ds_grace.profiling import profile_routing

    checkpoint = tiny_checkpoint("mixtral", workdir / "tiny_mixtral", seed=0, **TINY_OVERRIDES)
    model = load_checkpoint(checkpoint)
    calibration = prompts(sequences=16, length=length, seed=101)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
               for ids in calibration.split(4)]  # fmt: skip
    trace = profile_routing(model, batches, tokens=int(calibration.numel()), progress=False)
    plan_path = workdir / "tiny_mixtral.plan.json"
    build_plan(trace, topology=topology, config=GraceConfig()).save(plan_path)
    return {
        "checkpoint": str(checkpoint), "plan": str(plan_path), "sequences": sequences, "length": length,
        "steps": steps, "warmup": warmup, "overrides": TINY_OVERRIDES,
    }  # fmt: skip


class _LayerTimer:
    def __init__(self, layers: tuple[torch.nn.Module, ...]) -> None:
        self.elapsed_s = 0.0
        self._starts: dict[int, float] = {}
        for layer in layers:
            layer.register_forward_pre_hook(self._pre)
            layer.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, *_: Any) -> None:
        self._starts[id(module)] = time.perf_counter()

    def _post(self, module: torch.nn.Module, *_: Any) -> None:
        self.elapsed_s += time.perf_counter() - self._starts.pop(id(module))


def _traffic(
    served: Any, topology: Topology, *, hidden: int, num_experts: int, routes: int
) -> tuple[float, float, int, int, int]:
    """(intra bytes, inter bytes, dropped, routes, capacity) of this rank's last forward; `routes`:
    the (token, expert) routes the gates chose (GRACE drops none of them if its experts computed all)."""
    from benchmarks.runner import vanilla_bytes

    if served.mode == "grace":
        totals = [counters.total(include_sizes=True) for counters in served.counters]
        computed = sum(sum(counters.expert_rows) for counters in served.counters)
        return (float(sum(t.bytes_sent_intra for t in totals)), float(sum(t.bytes_sent_inter for t in totals)),
                routes - computed, routes, 0)  # fmt: skip
    intra = inter = 0.0
    dropped = routes = capacity = 0
    for stats in served.dropped_routes.last_forward():
        a, b = vanilla_bytes(capacity=stats.capacity, num_experts=num_experts, hidden=hidden, itemsize=4,
                             topology=topology)  # fmt: skip
        intra, inter = intra + a, inter + b
        dropped, routes, capacity = (
            dropped + stats.dropped,
            routes + stats.routes,
            max(capacity, stats.capacity),
        )
    return intra, inter, dropped, routes, capacity


def run_model_on_rank(
    model_spec: dict[str, Any], *, rank: int, topology: Topology, systems: list[str]
) -> dict[str, Any] | None:
    """Serve and time every system; rank 0 returns per-system summaries (runner's keys plus model forward)."""
    import ds_grace
    from ds_grace.models import load_checkpoint

    world = topology.world_size
    ids_BS = prompts(sequences=model_spec["sequences"] * world, length=model_spec["length"], seed=7)
    mine = slice(rank * model_spec["sequences"], (rank + 1) * model_spec["sequences"])
    ids_BS = ids_BS[mine]
    mask_BS = torch.ones_like(ids_BS)
    reference = load_checkpoint(model_spec["checkpoint"])
    with torch.no_grad():
        reference_BSV = reference(input_ids=ids_BS, attention_mask=mask_BS).logits.float()
    hidden, num_experts = int(reference.config.hidden_size), int(reference.config.num_local_experts)
    top_k = int(reference.config.num_experts_per_tok)
    blocks = system_blocks(model_spec["plan"], topology)
    keys = ("time_s", "moe_s", "bytes_intra", "bytes_inter", "dropped", "routes", "max_abs_diff", "capacity")
    reference_scale = max(1.0, float(reference_BSV.abs().max()))
    out: dict[str, Any] = {}
    for name in systems:
        if name not in blocks:
            continue
        engine = ds_grace.init_inference(
            model_spec["checkpoint"], config={"dtype": "fp32", "grace": blocks[name]}
        )
        served = engine.grace
        timer = _LayerTimer(
            served.blocks or served.layers
        )  # the MoE blocks: router, dispatch, experts, combine
        record: dict[str, list[float]] = {key: [] for key in keys}
        with torch.no_grad():
            for step in range(model_spec["warmup"] + model_spec["steps"]):
                served.reset_counters()
                timer.elapsed_s = 0.0
                dist.barrier()
                start = time.perf_counter()
                logits_BSV = engine(input_ids=ids_BS, attention_mask=mask_BS).logits
                elapsed = time.perf_counter() - start
                if step < model_spec["warmup"]:
                    continue
                intra, inter, dropped, routes, capacity = _traffic(
                    served, topology, hidden=hidden, num_experts=num_experts,
                    routes=ids_BS.numel() * top_k * len(served.layers),
                )  # fmt: skip
                values = (elapsed, timer.elapsed_s, intra, inter, dropped, routes,
                          float((logits_BSV.float() - reference_BSV).abs().max()), capacity)  # fmt: skip
                for key, value in zip(keys, values):
                    record[key].append(float(value))
        ops = {"time_s": dist.ReduceOp.MAX, "moe_s": dist.ReduceOp.MAX, "max_abs_diff": dist.ReduceOp.MAX,
               "capacity": dist.ReduceOp.MAX}  # fmt: skip
        reduced = {}
        for key in keys:
            values_t = torch.tensor(record[key], dtype=torch.float64)
            dist.all_reduce(values_t, op=ops.get(key, dist.ReduceOp.SUM))
            reduced[key] = values_t.tolist()
        times, moe = reduced["time_s"], reduced["moe_s"]
        out[name] = {
            "median_ms": statistics.median(moe) * 1e3, "p90_ms": float(np.percentile(moe, 90)) * 1e3,
            "model_forward_median_ms": statistics.median(times) * 1e3,
            "model_forward_p90_ms": float(np.percentile(times, 90)) * 1e3,
            "expert_median_ms": None, "bytes_intra_node": statistics.fmean(reduced["bytes_intra"]),
            "bytes_cross_node": statistics.fmean(reduced["bytes_inter"]),
            "dropped_routes": int(sum(reduced["dropped"])), "routes": int(sum(reduced["routes"])),
            "max_abs_diff": max(reduced["max_abs_diff"]), "capacity_max": int(max(reduced["capacity"])),
            "reference_scale": reference_scale,
            "forwards": len(times), "per_forward_ms": [t * 1e3 for t in times],
        }  # fmt: skip
        del engine
    return out if rank == 0 else None
