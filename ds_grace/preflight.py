"""The checks every rank runs locally before any collective: one function for init_inference and check-config.

``preflight(ds_config, grace, world_size=, rank=, describe_model=)`` checks, in this order, and raises the
first error (GraceConfigError, PlanError, TraceError, CheckpointError or ModelAdapterError) with the field,
file, value and rule:

1. the DeepSpeed part: a valid DeepSpeed inference config (unknown keys refused), a dtype DeepSpeed serves
   on this accelerator (fp32/bf16 on CPU), no kernel injection, tensor_parallel.tp_size 1;
2. the world (size >= 1, rank inside it) and the topology the grace block resolves to for it;
3. with grace enabled, the files the config names: grace.plan.path (a valid plan for this topology) or
   grace.profile.trace (a readable trace, planned from here); one of them is required;
4. the model, through ``describe_model(dtype)`` (a callable returning its ModelMoE; it loads a checkpoint
   folder in `dtype`): the plan against its MoE layer and expert counts, the memory cap per GPU;
5. moe.ep_size against the world size (or the DeepSpeed MoE model's own ep_size).

Without ``describe_model`` (check-config without --model) step 4 is skipped and step 5 checks the rule for
a checkpoint-folder model (a transformers family): its experts are spread over every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ds_grace.config import GraceConfig, GraceConfigError
from ds_grace.topology import Topology

if TYPE_CHECKING:
    from ds_grace.models.describe import ModelMoE
    from ds_grace.planning.plan import GracePlan
    from ds_grace.trace import ExpertLoads, RoutingTrace

_CPU_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class Checked:
    """What preflight resolved: the DeepSpeed config to hand DeepSpeed (moe.ep_size set), its dtype, the
    topology, the plan (grace enabled) and the model's MoE layers (when a model was given)."""

    ds_config: dict[str, Any]
    grace: GraceConfig
    dtype: torch.dtype
    world_size: int
    rank: int
    topology: Topology
    plan: GracePlan | None
    moe: ModelMoE | None


def preflight(
    ds_config: Mapping[str, Any],
    grace: GraceConfig,
    *,
    world_size: int,
    rank: int,
    describe_model: Callable[[torch.dtype], ModelMoE] | None = None,
    model_name: str = "the model",
    env: Mapping[str, str] | None = None,
) -> Checked:
    """Run every local check (see the module doc); no communication. Errors name the model `model_name`
    (e.g. its checkpoint folder)."""
    dtype = validate_deepspeed_config(ds_config)
    if world_size < 1 or not 0 <= rank < world_size:
        raise GraceConfigError(
            f"rank ({rank}) must be in [0, world size {world_size}) and the world size >= 1"
        )
    topology = grace.resolve_topology(world_size=world_size, env=env)
    source = _plan_source(grace, topology=topology) if grace.enabled else None
    moe = describe_model(dtype) if describe_model is not None else None
    plan = None
    if source is not None:
        plan = _plan_for_model(grace, source, topology=topology, moe=moe, model_name=model_name)
    checked_ds = _with_expert_parallel_size(ds_config, grace=grace, moe=moe, world_size=world_size)
    return Checked(
        ds_config=checked_ds,
        grace=grace,
        dtype=dtype,
        world_size=world_size,
        rank=rank,
        topology=topology,
        plan=plan,
        moe=moe,
    )


def world_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(world size, rank) from the launcher's WORLD_SIZE and RANK (1 and 0 when unset), checked."""
    env = os.environ if env is None else env
    values = []
    for name, default in (("WORLD_SIZE", 1), ("RANK", 0)):
        text = env.get(name)
        if text is None:
            values.append(default)
            continue
        if not text.isdigit():
            raise GraceConfigError(f"environment variable {name} ({text!r}) must be a non-negative integer")
        values.append(int(text))
    world_size, rank = values
    if world_size < 1 or rank >= world_size:
        raise GraceConfigError(f"environment RANK ({rank}) must be in [0, WORLD_SIZE={world_size})")
    return world_size, rank


# ---- 1. DeepSpeed's part ----


def validate_deepspeed_config(ds_config: Mapping[str, Any]) -> torch.dtype:
    """Check the DeepSpeed part of the config locally; returns the dtype DeepSpeed will serve in."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.inference.config import DeepSpeedInferenceConfig
    from pydantic import ValidationError

    try:
        parsed = DeepSpeedInferenceConfig(**ds_config)
    except (ValidationError, TypeError, ValueError) as exc:
        raise GraceConfigError(f"ds_config is not a valid DeepSpeed inference config: {exc}") from None
    if get_accelerator().device_name() == "cpu" and parsed.dtype not in _CPU_DTYPES:
        shown = repr(ds_config["dtype"]) if "dtype" in ds_config else "unset, DeepSpeed's default fp16"
        raise GraceConfigError(
            f"dtype ({shown}) must be fp32 or bf16 on CPU: DeepSpeed inference refuses fp16 there"
        )
    if parsed.replace_with_kernel_inject or parsed.injection_policy:
        raise GraceConfigError(
            "replace_with_kernel_inject / injection_policy must be unset: kernel injection replaces the "
            "blocks ds_grace serves (MoE layers are converted by ds_grace, dense layers stay as they are)"
        )
    if parsed.tensor_parallel.tp_size != 1:
        raise GraceConfigError(
            f"tensor_parallel.tp_size ({parsed.tensor_parallel.tp_size}) must be 1: ds_grace serves expert "
            "parallelism over every rank, with dense layers replicated"
        )
    return parsed.dtype


# ---- 3. and 4. the plan ----


def _plan_name(grace: GraceConfig) -> str:
    """The plan as errors name it: its file, or the trace it is built from."""
    if grace.plan.path is not None:
        return f"plan {grace.plan.path}"
    return f"the plan built from grace.profile.trace ({grace.profile.trace})"


def _plan_source(grace: GraceConfig, *, topology: Topology) -> GracePlan | RoutingTrace | ExpertLoads:
    """The plan file (checked against the topology) or the trace named by the config."""
    from ds_grace.planning.plan import GracePlan
    from ds_grace.trace import load_trace

    if grace.plan.path is not None:
        plan = GracePlan.load(grace.plan.path)
        plan.check_compatible(topology=topology, plan_name=_plan_name(grace))
        return plan
    if grace.profile.trace is not None:
        return load_trace(grace.profile.trace)
    raise GraceConfigError(
        "grace.plan.path and grace.profile.trace are both unset: GRACE needs a plan. Record routing with "
        "`ds-grace profile --model DIR --data TEXT_FILE --tokens N --out trace.npz`, then plan with "
        "`ds-grace plan --trace trace.npz --nodes N --gpus-per-node G --out plan.json` and set "
        "grace.plan.path to plan.json (or set "
        "grace.profile.trace to plan at start-up); set grace.enabled to false for vanilla DeepSpeed-MoE"
    )


def _plan_for_model(
    grace: GraceConfig,
    source: GracePlan | RoutingTrace | ExpertLoads,
    *,
    topology: Topology,
    moe: ModelMoE | None,
    model_name: str = "the model",
) -> GracePlan:
    from ds_grace.planning.build import build_plan
    from ds_grace.planning.plan import GracePlan, PlanError
    from ds_grace.trace import TraceError

    if isinstance(source, GracePlan):
        plan = source
    else:
        if moe is not None and (source.num_layers != moe.num_layers or source.num_experts != moe.num_experts):
            raise TraceError(
                f"grace.profile.trace ({grace.profile.trace}) records {source.num_layers} MoE layers of "
                f"{source.num_experts} experts but {model_name} has {moe.num_layers} of {moe.num_experts}"
            )
        plan = build_plan(source, topology=topology, policy="grace", config=grace)
    if moe is not None:
        plan.check_compatible(
            topology=topology,
            num_layers=moe.num_layers,
            num_experts=moe.num_experts,
            plan_name=_plan_name(grace),
            model_name=model_name,
        )
    else:
        plan.check_compatible(topology=topology, plan_name=_plan_name(grace))
    fitted_for = plan.meta.get("routing_policy")
    # "primary" uses no replica weight, so it serves any plan; tar and wrr need the weights fitted for them
    if fitted_for is not None and grace.routing.policy != "primary" and fitted_for != grace.routing.policy:
        raise PlanError(
            f"grace.plan.path ({grace.plan.path}) was fitted for routing policy {fitted_for!r} "
            f"(plan meta.routing_policy) but grace.routing.policy is {grace.routing.policy!r}: set "
            f"grace.routing.policy to {fitted_for!r} or plan again for {grace.routing.policy!r}"
        )
    cap = grace.grouping.max_experts_per_gpu
    if cap is not None:
        for index, layer in enumerate(plan.layers):
            for rank, slots in enumerate(layer.slots):
                if len(slots) > cap:
                    raise PlanError(
                        f"plan.layers[{index}] gives rank {rank} {len(slots)} expert slots but "
                        f"grace.grouping.max_experts_per_gpu is {cap}"
                    )
    return plan


def resolve_plan(
    grace: GraceConfig, *, topology: Topology, moe: ModelMoE, model_name: str = "the model"
) -> GracePlan:
    """The plan to serve with: grace.plan.path, else built from grace.profile.trace; checked against the
    topology and the model. Pure and local: every rank computes the same plan."""
    return _plan_for_model(
        grace, _plan_source(grace, topology=topology), topology=topology, moe=moe, model_name=model_name
    )


# ---- 5. moe.ep_size ----


def _check_moe_ep_size(ds_config: Mapping[str, Any], *, expected: int, why: str) -> dict[str, Any]:
    """ds_config with moe.ep_size set to `expected`; a different explicit value is an error."""
    config = dict(ds_config)
    moe = config.get("moe")
    if moe is None or isinstance(moe, bool):
        config["moe"] = {"enabled": True, "ep_size": expected}
        return config
    if not isinstance(moe, Mapping):
        raise GraceConfigError(f"moe ({moe!r}) must be a JSON object")
    if "ep_size" in moe and moe["ep_size"] != expected:
        raise GraceConfigError(f"moe.ep_size ({moe['ep_size']}) must be {expected}: {why}")
    config["moe"] = {**moe, "ep_size": expected}
    return config


def _with_expert_parallel_size(
    ds_config: Mapping[str, Any], *, grace: GraceConfig, moe: ModelMoE | None, world_size: int
) -> dict[str, Any]:
    """ds_config with the moe.ep_size DeepSpeed's engine must build its groups for, checked locally."""
    if moe is not None and moe.family == "deepspeed_moe":
        ep_size = single_ep_size(moe)
        if grace.enabled and ep_size not in (1, world_size):
            raise GraceConfigError(
                f"DeepSpeed MoE layers with ep_size {ep_size} cannot be served by GRACE: ep_size must be 1 "
                f"(every rank holds all experts) or the world size ({world_size})"
            )
        return _check_moe_ep_size(ds_config, expected=ep_size, why="the model's MoE layers use it")
    if grace.enabled:
        return _check_moe_ep_size(
            ds_config, expected=world_size, why="GRACE spreads the experts over every rank"
        )
    if moe is not None and moe.num_experts % world_size != 0:
        raise GraceConfigError(
            f"vanilla DeepSpeed-MoE places num_experts / world_size experts on every rank: the model's "
            f"num_experts ({moe.num_experts}) must be divisible by the world size ({world_size})"
        )
    return _check_moe_ep_size(
        ds_config, expected=world_size, why="vanilla DeepSpeed-MoE spreads the experts over every rank"
    )


def single_ep_size(moe: ModelMoE) -> int:
    sizes = sorted({block.ep_size for block in moe.blocks})
    if len(sizes) != 1:
        raise GraceConfigError(f"the model's MoE layers must share one ep_size, found {sizes}")
    return sizes[0]
