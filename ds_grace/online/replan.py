"""Deterministic re-planning of replicas from aggregated loads (pure, no torch.distributed).

Shape legend: L MoE layers, E logical experts, R ranks.

Every rank calls ``replan`` with the same plan and the same aggregated integer loads, so every
rank computes the same new plan; the replicator checks that across ranks by content hash.
Memory is per GPU: in budget mode a re-plan keeps every GPU's slot count exactly (an equal-slot plan
stays equal-slot; replicas move, the memory each GPU holds for experts does not change).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ds_grace.planning.metrics import expected_gpu_loads
from ds_grace.planning.plan import GracePlan, LayerPlan, RoutingPolicy
from ds_grace.planning.replication import ReplicationMode, replan_layer
from ds_grace.topology import Topology

MIN_GAIN = 0.01  # a re-plan must lift a layer by this much, so drifting loads do not churn replicas


def predicted_balancedness(
    loads_E: np.ndarray, layer: LayerPlan, topology: Topology, policy: RoutingPolicy
) -> float:
    """mean / max of the GPU loads `layer` is expected to give for `loads_E` (1.0 when idle)."""
    gpu_R = expected_gpu_loads(np.asarray(loads_E, dtype=np.float64), layer, topology, policy)
    return float(gpu_R.mean() / gpu_R.max()) if gpu_R.max() > 0 else 1.0


@dataclass(frozen=True)
class ReplanResult:
    """plan is None when no layer fell below the threshold or no new placement does better."""

    plan: GracePlan | None
    layers: tuple[int, ...]
    balancedness_before: tuple[float, ...]
    balancedness_after: tuple[float, ...]


def replan(
    plan: GracePlan,
    loads_LE: np.ndarray,
    *,
    threshold: float,
    policy: RoutingPolicy,
    mode: ReplicationMode = "budget",
    max_experts_per_gpu: int | None = None,
) -> ReplanResult:
    """Re-place the replicas of every layer whose predicted balancedness on loads_LE is below threshold.

    Primaries stay; replicas that stay keep their slot (few bytes move). A layer is taken only if
    its new placement predicts a balancedness higher by at least MIN_GAIN. balancedness_before/after hold every
    layer's value under the current / returned plan. In mode "budget" every rank keeps exactly the slots
    it has in the layer (replicas are re-placed into them, all used); mode "paper" re-applies the
    paper's rule, which sets its own replica count.
    """
    loads = np.asarray(loads_LE, dtype=np.float64)
    if loads.shape != (plan.num_layers, plan.num_experts):
        raise ValueError(
            f"loads_LE (shape {loads.shape}) must be [layers={plan.num_layers}, experts={plan.num_experts}]"
        )
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"grace.replication.online.threshold ({threshold}) must be in (0, 1]")
    topology = plan.topology
    before = [
        predicted_balancedness(loads[i], layer, topology, policy) for i, layer in enumerate(plan.layers)
    ]
    after = list(before)
    new_layers = list(plan.layers)
    changed: list[int] = []
    for index, layer in enumerate(plan.layers):
        if before[index] >= threshold or loads[index].sum() == 0:
            continue
        candidate, _ = replan_layer(
            layer,
            loads[index],
            topology,
            mode=mode,
            max_experts_per_gpu=max_experts_per_gpu,
            routing_policy=policy,
            slots_per_gpu=[len(slots) for slots in layer.slots] if mode == "budget" else None,
        )
        value = predicted_balancedness(loads[index], candidate, topology, policy)
        if value > before[index] + MIN_GAIN and candidate != layer:
            new_layers[index] = candidate
            after[index] = value
            changed.append(index)
    if not changed:
        return ReplanResult(None, (), tuple(before), tuple(before))
    revision = int(plan.meta.get("online_revision", 0)) + 1
    new_plan = dataclasses.replace(
        plan, layers=tuple(new_layers), meta={**plan.meta, "online_revision": revision}
    )
    return ReplanResult(new_plan, tuple(changed), tuple(before), tuple(after))
