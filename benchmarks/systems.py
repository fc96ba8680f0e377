"""The systems the benchmark compares, and the plans they serve.

Shape legend: T tokens on this rank, D hidden, K top-k, E experts, R ranks, G GPUs per node.

Vanilla DeepSpeed-MoE (its own MOELayer):
- vanilla_default: contiguous placement, capacity-padded dense all_to_all_single over one flat EP
  group, DeepSpeed's default eval capacity (factor 1.0, min_capacity 4): routes over it dropped;
- vanilla_lossless: the same with drop_tokens=False (capacity = the EP group's largest expert count).
Sparse peers (what vLLM / SGLang / Tutel / DeepEP users run), rebuilt from this project's own sparse
all-to-all, so that only placement, instance choice and dispatch path differ from GRACE:
- peer_sparse: contiguous placement, flat sparse all-to-all (Tutel / Megatron-like);
- peer_deepep: contiguous placement, hierarchical sparse with per-node dedup (DeepEP-like);
- peer_eplb: EPLB replicas (load-only, ceil(E/R) + 1 slots per GPU), even split (WRR), flat sparse;
- peer_eplb_deepep: EPLB replicas, even split, hierarchical sparse (SGLang with DeepEP and EPLB).
GRACE's ablation ladder (fixed paths) and full GRACE:
- grace_grouping: hierarchical grouping, one instance per expert, flat sparse all-to-all;
- grace_replication: + replicas of hot experts (1 extra slot per GPU), weighted round-robin (WRR);
- grace_tar: + topology-aware routing (own GPU, then own node, then WRR), flat sparse;
- grace_hsc: + hierarchical sparse communication on every forward;
- grace: full GRACE as the default grace block serves it (RuntimeOptions.from_config(GraceConfig())):
  the TAR plan, and flat or hierarchical chosen per layer and forward by the start-up cost model.
Fairness: every GRACE-runtime system (peers, ladder and grace) runs the same sparse all-to-all code
with the same generic improvements (rows packed once, one header round, the low-latency fixed
buffer up to the config's default of 64 tokens per rank); the peers differ from GRACE only in
their plan, their instance choice and their fixed path. Memory: every replicated plan has
ceil(E/R) + 1 slots on every GPU. Every system replays the same top-k ids and gate weights
(the vanilla gate is DeepSpeed's capacity rule applied to the forced routing).
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_grace.config import GraceConfig
from ds_grace.moe.layer import RuntimeOptions
from ds_grace.planning.build import build_plan
from ds_grace.planning.plan import GracePlan
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace

DEFAULT_COMMUNICATION = GraceConfig().communication
DEFAULT_ROUTING = GraceConfig().routing
EXTRA_SLOTS_PER_GPU = 1


@dataclass(frozen=True)
class SystemSpec:
    name: str
    label: str
    kind: str  # "vanilla" or "grace" (this project's sparse runtime: peers, ladder, full GRACE)
    drop_tokens: bool = False  # vanilla
    plan: str | None = None  # sparse runtime: key into the workload's plans
    policy: str = "tar"  # instance choice
    hierarchical: bool = False  # hierarchical path (fixed unless adaptive_path)
    adaptive_path: bool = False  # flat or hierarchical per forward (full GRACE only)
    group: str = "ladder"  # "vanilla", "peer", "ladder" or "grace"

    def runtime_options(self, *, timeout_s: float) -> RuntimeOptions:
        if self.group == "grace":
            config = GraceConfig.model_validate({"communication": {"timeout_s": timeout_s}})
            return RuntimeOptions.from_config(config)
        return RuntimeOptions(
            policy=self.policy,  # type: ignore[arg-type]
            hierarchical=self.hierarchical,
            dedup=True,
            timeout_s=timeout_s,
            adaptive_path=self.adaptive_path,
            low_latency_max_tokens=DEFAULT_COMMUNICATION.low_latency_max_tokens,
        )


SYSTEMS: tuple[SystemSpec, ...] = (
    SystemSpec("vanilla_default", "DeepSpeed-MoE (capacity 1.0)", "vanilla", drop_tokens=True, group="vanilla"),
    SystemSpec("vanilla_lossless", "DeepSpeed-MoE lossless", "vanilla", drop_tokens=False, group="vanilla"),
    SystemSpec("peer_sparse", "peer: sparse (Tutel-like)", "grace", plan="contiguous", policy="primary",
               group="peer"),
    SystemSpec("peer_deepep", "peer: DeepEP-like", "grace", plan="contiguous", policy="primary",
               hierarchical=True, group="peer"),
    SystemSpec("peer_eplb", "peer: EPLB", "grace", plan="eplb", policy="wrr", group="peer"),
    SystemSpec("peer_eplb_deepep", "peer: EPLB + DeepEP", "grace", plan="eplb", policy="wrr", hierarchical=True,
               group="peer"),
    SystemSpec("grace_grouping", "GRACE grouping", "grace", plan="grouping", policy="primary"),
    SystemSpec("grace_replication", "+ replication (WRR)", "grace", plan="replicated_wrr", policy="wrr"),
    SystemSpec("grace_tar", "+ TAR", "grace", plan="replicated_tar", policy="tar"),
    SystemSpec("grace_hsc", "+ HSC (every forward)", "grace", plan="replicated_tar", policy="tar",
               hierarchical=True),
    SystemSpec("grace", "GRACE (full, default block)", "grace", plan="replicated_tar", policy="tar",
               hierarchical=True, adaptive_path=True, group="grace"),
)  # fmt: skip
SYSTEM_BY_NAME = {system.name: system for system in SYSTEMS}
BASELINE = "vanilla_lossless"
PEERS = tuple(system.name for system in SYSTEMS if system.group == "peer")
FULL_GRACE = "grace"
DEEPEP_LIKE = ("peer_deepep", "peer_eplb_deepep")


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
    """The plans the sparse systems need, all from the calibration trace (pure, deterministic).

    Every option is explicit (not the planner's defaults): replicated plans get EXTRA_SLOTS_PER_GPU
    replica slots per GPU, and GRACE's grouping is capped at the EPLB plan's ceil(E/R) + 1 slots
    per GPU, so that both use the same expert memory on every GPU.
    """
    needed = {system.plan for system in systems if system.plan is not None}
    num_experts, world = calibration.num_experts, topology.world_size
    slots_per_gpu = -(-num_experts // world) + EXTRA_SLOTS_PER_GPU
    replication = {"enabled": True, "mode": "budget", "extra_slots_per_gpu": EXTRA_SLOTS_PER_GPU}
    grouping = {"enabled": True, "ratio": "auto", "affinity": "intra", "max_experts_per_gpu": slots_per_gpu}
    plans: dict[str, GracePlan] = {}
    if "contiguous" in needed:
        plans["contiguous"] = build_plan(
            calibration, topology=topology, policy="contiguous", replication={"enabled": False}
        )
    if "eplb" in needed:
        plans["eplb"] = build_plan(
            calibration, topology=topology, policy="eplb", replication=replication, routing_policy="wrr"
        )
    if "grouping" in needed:
        plans["grouping"] = build_plan(
            calibration, topology=topology, policy="grace", grouping=grouping, replication={"enabled": False},
            routing_policy="primary",
        )  # fmt: skip
    for key, routing in (("replicated_wrr", "wrr"), ("replicated_tar", "tar")):
        if key in needed:
            plans[key] = build_plan(
                calibration, topology=topology, policy="grace", grouping=grouping, replication=replication,
                routing_policy=routing,
            )  # fmt: skip
    return plans
