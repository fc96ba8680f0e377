"""The systems the benchmark compares, and the plans they serve.

Shape legend: T tokens on this rank, D hidden, K top-k, E experts, R ranks, G GPUs per node,
S expert slots per GPU.

Vanilla DeepSpeed-MoE (its own MOELayer):
- vanilla_default: contiguous placement, capacity-padded dense all_to_all_single over one flat EP
  group, DeepSpeed's default eval capacity (factor 1.0, min_capacity 4): routes over it dropped;
- vanilla_lossless: the same with drop_tokens=False (capacity = the EP group's largest expert count).
Sparse peers (what vLLM / SGLang / Tutel / DeepEP users run), rebuilt from this project's own sparse
all-to-all, so that only placement, instance choice and dispatch path differ from GRACE:
- peer_vllm: vLLM's EPLB as it builds it for models without expert groups: the global policy
  (num_groups = 1: replicate over all GPUs, pack copies onto GPUs by load), copies chosen by an
  even split regardless of locality, flat sparse dispatch;
- peer_sglang: SGLang's EPLB (the same global policy) with its static dispatch: the copy on the
  token's own GPU, else one on its node, else one of the others by weight; hierarchical dispatch
  with per-node dedup (DeepEP normal mode) or the flat/low-latency one, chosen per forward;
- peer_sparse: contiguous placement, flat sparse all-to-all (Tutel / Megatron-like);
- peer_deepep: contiguous placement, hierarchical sparse with per-node dedup (DeepEP-like);
- peer_eplb: EPLB's hierarchical policy with one expert per group, even split (WRR), flat sparse;
- peer_eplb_deepep: the same EPLB plan, even split, hierarchical sparse.
GRACE's ablation ladder (fixed paths) and full GRACE:
- grace_grouping: hierarchical grouping, one instance per expert, flat sparse all-to-all;
- grace_replication: + replicas of hot experts, weighted round-robin (WRR);
- grace_tar: + topology-aware routing (own GPU, then own node, then WRR), flat sparse;
- grace_hsc: + hierarchical sparse communication on every forward;
- grace: full GRACE as the default grace block serves it (GraceConfig()): the TAR plan, and flat or
  hierarchical chosen per layer and forward by the start-up cost model.
Fairness: every sparse system (peers, ladder and grace) runs the same sparse all-to-all code with the
same generic rules, set through the same grace block: rows packed once, one header round, own rows
overlapping the first round, the low-latency fixed buffer up to the config's default of 64 tokens
per rank with the primary copy on those forwards (grace.routing.low_latency_policy), and the
per-forward path choice on every system that has a hierarchical path, except the ladder's fixed-path
rungs. Memory: every replicated plan (EPLB peers, GRACE) has exactly S slots on every GPU
(default ceil(E / R) + 1); the contiguous peers and vanilla hold E / R. Every system replays the same
top-k ids and gate weights (the vanilla gate is DeepSpeed's capacity rule applied to the forced routing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ds_grace.config import GraceConfig
from ds_grace.moe.layer import RuntimeOptions
from ds_grace.planning.build import build_plan
from ds_grace.planning.plan import GracePlan
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace

DEFAULT_COMMUNICATION = GraceConfig().communication
DEFAULT_ROUTING = GraceConfig().routing
EXTRA_SLOTS_PER_GPU = 1
DispatchPath = Literal["flat", "hierarchical", "auto"]


def communication_block(path: DispatchPath) -> dict[str, Any]:
    """The grace.communication settings of a dispatch path: fixed flat, fixed hierarchical, or chosen
    per forward ("auto", the default block's)."""
    return {"path": path}


@dataclass(frozen=True)
class SystemSpec:
    name: str
    label: str
    kind: str  # "vanilla" or "grace" (this project's sparse runtime: peers, ladder, full GRACE)
    drop_tokens: bool = False  # vanilla
    plan: str | None = None  # sparse runtime: key into the workload's plans
    policy: str = "tar"  # instance choice
    path: DispatchPath = "flat"  # dispatch path: fixed, or chosen per forward ("auto")
    group: str = "ladder"  # "vanilla", "peer", "ladder" or "grace"

    @property
    def replicated(self) -> bool:
        return self.plan in REPLICATED_PLANS

    def grace_block(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The grace block (routing and communication) that serves this sparse system; full GRACE's is
        the default one. Every other setting (low-latency buffer and its primary-copy rule, dedup) is
        the default block's for every system."""
        communication: dict[str, Any] = {} if timeout_s is None else {"timeout_s": timeout_s}
        if self.group == "grace":
            return {"communication": communication}
        return {
            "routing": {"policy": self.policy},
            "communication": {**communication, **communication_block(self.path)},
        }

    def runtime_options(self, *, timeout_s: float) -> RuntimeOptions:
        config = GraceConfig.model_validate(self.grace_block(timeout_s=timeout_s))
        return RuntimeOptions.from_config(config)


SYSTEMS: tuple[SystemSpec, ...] = (
    SystemSpec("vanilla_default", "DeepSpeed-MoE (capacity 1.0)", "vanilla", drop_tokens=True, group="vanilla"),
    SystemSpec("vanilla_lossless", "DeepSpeed-MoE lossless", "vanilla", drop_tokens=False, group="vanilla"),
    SystemSpec("peer_vllm", "peer: vLLM (global EPLB, even split, flat)", "grace", plan="eplb_global",
               policy="wrr", group="peer"),
    SystemSpec("peer_sglang", "peer: SGLang (global EPLB, GPU/node-first, DeepEP)", "grace",
               plan="eplb_global", policy="tar", path="auto", group="peer"),
    SystemSpec("peer_sparse", "peer: sparse (Tutel-like)", "grace", plan="contiguous", policy="primary",
               group="peer"),
    SystemSpec("peer_deepep", "peer: DeepEP-like", "grace", plan="contiguous", policy="primary", path="auto",
               group="peer"),
    SystemSpec("peer_eplb", "peer: EPLB (hierarchical policy)", "grace", plan="eplb", policy="wrr",
               group="peer"),
    SystemSpec("peer_eplb_deepep", "peer: EPLB + DeepEP", "grace", plan="eplb", policy="wrr", path="auto",
               group="peer"),
    SystemSpec("grace_grouping", "GRACE grouping", "grace", plan="grouping", policy="primary"),
    SystemSpec("grace_replication", "+ replication (WRR)", "grace", plan="replicated_wrr", policy="wrr"),
    SystemSpec("grace_tar", "+ TAR", "grace", plan="replicated_tar", policy="tar"),
    SystemSpec("grace_hsc", "+ HSC (every forward)", "grace", plan="replicated_tar", policy="tar",
               path="hierarchical"),
    SystemSpec("grace", "GRACE (full, default block)", "grace", plan="replicated_tar", policy="tar",
               path="auto", group="grace"),
)  # fmt: skip
SYSTEM_BY_NAME = {system.name: system for system in SYSTEMS}
BASELINE = "vanilla_lossless"
PEERS = tuple(system.name for system in SYSTEMS if system.group == "peer")
# the peers a user would run today (vLLM, SGLang); the four earlier peers stay as references
NEW_PEERS = ("peer_vllm", "peer_sglang")
FULL_GRACE = "grace"
DEEPEP_LIKE = ("peer_deepep", "peer_eplb_deepep")
REPLICATED_PLANS = ("eplb", "eplb_global", "replicated_wrr", "replicated_tar")
# the slot sweep: GRACE and the two peers a user would pick between (DeepSpeed does not replicate)
SWEEP_SYSTEMS = ("peer_vllm", "peer_sglang", FULL_GRACE)


def select_systems(names: list[str] | None, *, baseline: bool = True) -> tuple[SystemSpec, ...]:
    """The named systems (all when none), in SYSTEMS order, with DeepSpeed lossless added unless not
    `baseline`."""
    if not names:
        return SYSTEMS
    unknown = [name for name in names if name not in SYSTEM_BY_NAME]
    if unknown:
        raise ValueError(f"systems ({unknown}) must be among {', '.join(SYSTEM_BY_NAME)}")
    if baseline and BASELINE not in names:
        names = [BASELINE, *names]
    return tuple(system for system in SYSTEMS if system.name in names)


def default_slots_per_gpu(num_experts: int, topology: Topology) -> int:
    """S of the main comparison: ceil(E / R) + EXTRA_SLOTS_PER_GPU (at most E / G: every node holds
    every expert beyond that)."""
    return min(
        -(-num_experts // topology.world_size) + EXTRA_SLOTS_PER_GPU, num_experts // topology.gpus_per_node
    )


def slot_range(num_experts: int, topology: Topology) -> list[int]:
    """The slot sweep's S: from ceil(E / R) (no replicas) to E / G (every node holds every expert)."""
    low = -(-num_experts // topology.world_size)
    return list(range(low, max(low, num_experts // topology.gpus_per_node) + 1))


def build_plans(
    calibration: RoutingTrace,
    topology: Topology,
    systems: tuple[SystemSpec, ...],
    *,
    slots_per_gpu: int | None = None,
) -> dict[str, GracePlan]:
    """The plans the sparse systems need, all from the calibration trace (pure, deterministic).

    Every option is explicit (not the planner's defaults): every replicated plan (EPLB, GRACE) has
    exactly `slots_per_gpu` slots on every GPU (default: default_slots_per_gpu), and GRACE's grouping
    is capped at that many, so that all use the same expert memory on every GPU.
    """
    needed = {system.plan for system in systems if system.plan is not None}
    num_experts = calibration.num_experts
    slots = default_slots_per_gpu(num_experts, topology) if slots_per_gpu is None else slots_per_gpu
    replication = {"enabled": True, "mode": "budget", "slots_per_gpu": slots}
    grouping = {"enabled": True, "ratio": "auto", "affinity": "intra", "max_experts_per_gpu": slots}
    plans: dict[str, GracePlan] = {}
    if "contiguous" in needed:
        plans["contiguous"] = build_plan(
            calibration, topology=topology, policy="contiguous", replication={"enabled": False}
        )
    # EPLB: the hierarchical policy with one expert per group (DeepSeek's reference on such models),
    # and the global policy vLLM and SGLang run for models without expert groups (num_groups = 1)
    for key, groups in (("eplb", None), ("eplb_global", 1)):
        if key in needed:
            plans[key] = build_plan(
                calibration, topology=topology, policy="eplb", replication=replication, routing_policy="wrr",
                eplb_num_groups=groups,
            )  # fmt: skip
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
