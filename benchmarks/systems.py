"""The systems the benchmark compares, and the plans they serve.

Shape legend: T tokens on this rank, D hidden, K top-k, E experts, R ranks, G GPUs per node.

- vanilla_default: DeepSpeed-MoE's own MOELayer (contiguous placement, capacity-padded dense
  all_to_all_single over one flat EP group) with DeepSpeed's default eval capacity (factor 1.0,
  min_capacity 4): routes over capacity are dropped and counted;
- vanilla_lossless: the same with drop_tokens=False (capacity = the EP group's largest expert count);
- grace_grouping: GRACE's hierarchical grouping, one instance per expert, flat sparse all-to-all;
- grace_replication: + replicas of hot experts, instance chosen by weighted round-robin (WRR);
- grace_tar: + topology-aware routing (own GPU, then own node, then WRR), flat sparse all-to-all;
- grace_hsc: + hierarchical sparse communication (each token crosses to a node once): full GRACE.
Every system replays the same top-k ids and gate weights (the vanilla gate is DeepSpeed's
capacity rule applied to the forced routing: ds_grace.inference.RoutingGate).
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_grace.planning.build import build_plan
from ds_grace.planning.plan import GracePlan
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace


@dataclass(frozen=True)
class SystemSpec:
    name: str
    label: str
    kind: str  # "vanilla" or "grace"
    drop_tokens: bool = False  # vanilla
    plan: str | None = None  # grace: key into the workload's plans
    policy: str = "tar"  # grace: instance choice
    hierarchical: bool = False  # grace: HSC


SYSTEMS: tuple[SystemSpec, ...] = (
    SystemSpec("vanilla_default", "DeepSpeed-MoE (capacity 1.0)", "vanilla", drop_tokens=True),
    SystemSpec("vanilla_lossless", "DeepSpeed-MoE lossless", "vanilla", drop_tokens=False),
    SystemSpec("grace_grouping", "GRACE grouping", "grace", plan="grouping", policy="primary"),
    SystemSpec("grace_replication", "+ replication (WRR)", "grace", plan="replicated_wrr", policy="wrr"),
    SystemSpec("grace_tar", "+ TAR", "grace", plan="replicated_tar", policy="tar"),
    SystemSpec(
        "grace_hsc", "+ HSC (full GRACE)", "grace", plan="replicated_tar", policy="tar", hierarchical=True
    ),
)
SYSTEM_BY_NAME = {system.name: system for system in SYSTEMS}
BASELINE = "vanilla_lossless"


def select_systems(names: list[str] | None) -> tuple[SystemSpec, ...]:
    if not names:
        return SYSTEMS
    unknown = [name for name in names if name not in SYSTEM_BY_NAME]
    if unknown:
        raise ValueError(f"systems ({unknown}) must be among {', '.join(SYSTEM_BY_NAME)}")
    if BASELINE not in names:
        names = [BASELINE, *names]
    return tuple(system for system in SYSTEMS if system.name in names)


def build_plans(
    calibration: RoutingTrace, topology: Topology, systems: tuple[SystemSpec, ...]
) -> dict[str, GracePlan]:
    """The plans the GRACE systems need, all from the calibration trace (pure, deterministic)."""
    needed = {system.plan for system in systems if system.plan is not None}
    plans: dict[str, GracePlan] = {}
    if "grouping" in needed:
        plans["grouping"] = build_plan(
            calibration,
            topology=topology,
            policy="grace",
            replication={"enabled": False},
            routing_policy="primary",
        )
    if "replicated_wrr" in needed:
        plans["replicated_wrr"] = build_plan(
            calibration, topology=topology, policy="grace", routing_policy="wrr"
        )
    if "replicated_tar" in needed:
        plans["replicated_tar"] = build_plan(
            calibration, topology=topology, policy="grace", routing_policy="tar"
        )
    return plans
