"""Replay a shifting routing workload through GraceMoE layers with online replication.

Shape legend: T tokens per rank per step, D hidden, K top-k, E experts, L replayed layers.

The workload is real: Mixtral-8x7B routing of gsm8k for the first phase, then of humaneval
(ds_grace/data/traces/mixtral), for the chosen trace layers. At step s rank r serves the next T
routed tokens of the phase (cycling), with random hidden vectors seeded by (seed, s, r). The
starting plan is the offline one: contiguous primaries, replicas planned on the whole first phase.
``replay_rank`` is the per-rank body (for ``run_on_ranks``): every forward's output is compared
with a single-process reference that holds every expert once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ds_grace.comm.local_ranks import RankContext
from ds_grace.comm.migration import PlanMismatchError
from ds_grace.config import OnlineReplicationConfig, ReplicationConfig
from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.online.replan import ReplanResult, predicted_balancedness
from ds_grace.online.replicator import OnlineReplicator
from ds_grace.planning.plan import GracePlan, LayerPlan
from ds_grace.planning.replication import replan_layer
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace, load_mixtral_jsonl, packaged_traces_dir

PHASE_FILES = ("gsm8k_2_routing.jsonl", "humaneval_2_routing.jsonl")
MIXTRAL_EXPERTS = 8


def load_phases() -> tuple[RoutingTrace, ...]:
    folder = packaged_traces_dir() / "mixtral"
    return tuple(load_mixtral_jsonl(folder / name, num_experts=MIXTRAL_EXPERTS) for name in PHASE_FILES)


@dataclass(frozen=True)
class ReplaySpec:
    """One replay. online None or not enabled: the offline plan stays (the "off" baseline)."""

    trace_layers: tuple[int, ...] = (15, 25)
    steps: tuple[int, int] = (8, 24)
    tokens_per_rank: int = 32
    hidden: int = 32
    online: dict[str, Any] | None = field(
        default_factory=lambda: {"enabled": True, "interval": 2, "window": 3}
    )
    extra_slots_per_gpu: int = 1
    hierarchical: bool = True
    seed: int = 0
    check_outputs: bool = True
    mismatch_on_rank: int | None = None


def initial_plan(phase_loads_LE: np.ndarray, topology: Topology, *, extra_slots_per_gpu: int) -> GracePlan:
    """Contiguous primaries, replicas placed for `phase_loads_LE` (the offline plan); every GPU holds
    E / GPUs + extra_slots_per_gpu slots (equal memory, kept by every re-plan)."""
    num_experts = phase_loads_LE.shape[1]
    per_rank = num_experts // topology.world_size
    base = LayerPlan.from_lists(
        slots=[list(range(r * per_rank, (r + 1) * per_rank)) for r in range(topology.world_size)],
        primary=[e // per_rank for e in range(num_experts)],
    )
    layers = tuple(
        replan_layer(base, loads_E, topology, slots_per_gpu=per_rank + extra_slots_per_gpu)[0]
        for loads_E in phase_loads_LE
    )
    return GracePlan(topology=topology, layers=layers, policy="offline")


def step_routing(
    phases: tuple[RoutingTrace, ...], spec: ReplaySpec, *, step: int, rank: int, world: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(topk_ids_TK, topk_weights_TK) per replayed layer for `rank` at `step`."""
    phase = 0 if step < spec.steps[0] else 1
    local_step = step if phase == 0 else step - spec.steps[0]
    trace = phases[phase]
    out = []
    for layer in spec.trace_layers:
        ids = trace.topk_ids[layer]
        rows = ((local_step * world + rank) * spec.tokens_per_rank + np.arange(spec.tokens_per_rank)) % len(
            ids
        )
        weights = (
            trace.gate_weights[layer][rows]
            if trace.gate_weights is not None
            else np.full((len(rows), ids.shape[1]), 1.0 / ids.shape[1])
        )
        out.append(
            (torch.from_numpy(ids[rows].astype(np.int64)), torch.from_numpy(weights.astype(np.float32)))
        )
    return out


def reference_output(
    experts: list[nn.Module], x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
) -> torch.Tensor:
    """Single-process sum_k w_k * expert_k(x) with every expert held once, accumulated in fp32 like
    DeepSpeed's combine; routes with id -1 are not taken."""
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
    for e, expert in enumerate(experts):
        token_idx, k_idx = (topk_ids_TK == e).nonzero(as_tuple=True)
        if token_idx.numel():
            out = expert(x_TD[token_idx]).float()
            y_TD.index_add_(0, token_idx, out * topk_weights_TK[token_idx, k_idx].float().unsqueeze(1))
    return y_TD.to(x_TD.dtype)


def _experts(hidden: int, num_experts: int, seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [
        nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        for _ in range(num_experts)
    ]


def _perturbed_replanner(replicator: OnlineReplicator) -> Any:
    """A replanner that nudges one WRR weight: a rank that plans differently from the others."""
    honest = replicator.replanner

    def replanner(plan: GracePlan, loads_LE: np.ndarray) -> ReplanResult:
        result = honest(plan, loads_LE)
        if result.plan is None:
            return result
        index = result.layers[0]
        layer = result.plan.layers[index]
        weights = [list(w) for w in layer.slot_weights]
        weights[0][0] *= 1.001
        nudged = LayerPlan(slots=layer.slots, slot_weights=tuple(map(tuple, weights)), primary=layer.primary)
        new_layers = list(result.plan.layers)
        new_layers[index] = nudged
        return ReplanResult(
            GracePlan(
                topology=plan.topology, layers=tuple(new_layers), policy=plan.policy, meta=result.plan.meta
            ),
            result.layers,
            result.balancedness_before,
            result.balancedness_after,
        )

    return replanner


def replay_rank(ctx: RankContext, spec: ReplaySpec) -> dict[str, Any]:
    """Serve the replay on this rank; returns output diffs, live-plan balancedness and metrics."""
    topology = ctx.topology
    phases = load_phases()
    loads = [np.stack([trace.loads()[layer] for layer in spec.trace_layers]) for trace in phases]
    plan = initial_plan(loads[0], topology, extra_slots_per_gpu=spec.extra_slots_per_gpu)
    experts = [_experts(spec.hidden, MIXTRAL_EXPERTS, seed=1000 + i) for i in range(len(spec.trace_layers))]
    options = RuntimeOptions(path="hierarchical" if spec.hierarchical else "flat", dedup=True)
    layers = [
        GraceMoE.from_experts(
            experts[i],
            hidden_size=spec.hidden,
            k=2,
            layer_plan=plan.layers[i],
            topology=topology,
            options=options,
        )
        for i in range(len(spec.trace_layers))
    ]
    replicator = None
    if spec.online is not None and spec.online.get("enabled", False):
        replicator = OnlineReplicator(
            layers,
            config=OnlineReplicationConfig(**spec.online),
            replication=ReplicationConfig(extra_slots_per_gpu=spec.extra_slots_per_gpu),
            plan=plan,
        )
        if spec.mismatch_on_rank == ctx.rank:
            replicator.replanner = _perturbed_replanner(replicator)
    max_diff, live_balancedness, forward_s = 0.0, [], []
    error = None
    with torch.no_grad():
        for step in range(sum(spec.steps)):
            routing = step_routing(phases, spec, step=step, rank=ctx.rank, world=topology.world_size)
            x_TD = torch.randn(
                spec.tokens_per_rank,
                spec.hidden,
                generator=torch.Generator().manual_seed(spec.seed * 100003 + step * 97 + ctx.rank),
            )
            begin = time.perf_counter()
            outputs = [layer.forward_routed(x_TD, ids, w) for layer, (ids, w) in zip(layers, routing)]
            forward_s.append(time.perf_counter() - begin)
            if spec.check_outputs:
                for i, (ids, w) in enumerate(routing):
                    expected = reference_output(experts[i], x_TD, ids, w)
                    max_diff = max(max_diff, float((outputs[i] - expected).abs().max()))
            phase = 0 if step < spec.steps[0] else 1
            live_balancedness.append(
                [
                    predicted_balancedness(
                        loads[phase][i], layer.layer_plan, topology, layer.deepspeed_moe.options.policy
                    )
                    for i, layer in enumerate(layers)
                ]
            )
            if replicator is not None:
                try:
                    replicator.step()
                except PlanMismatchError as exc:
                    error = str(exc)
                    break
    result: dict[str, Any] = {
        "rank": ctx.rank,
        "max_abs_diff": max_diff,
        "live_balancedness": live_balancedness,
        "forward_s": forward_s,
        "error": error,
        "live_slots": [list(map(list, layer.layer_plan.slots)) for layer in layers],
    }
    if replicator is not None:
        result["metrics"] = replicator.metrics()
        if error is None:
            replicator.close()
    return result


def replay_many(ctx: RankContext, specs: tuple[ReplaySpec, ...]) -> list[dict[str, Any]]:
    """Several replays in one spawn (ranks stay in step: a mismatch stops all ranks at one boundary)."""
    return [replay_rank(ctx, spec) for spec in specs]
