"""The "grace" block of ds_config.json: schema, validation and loading.

Modelled on DeepSpeed's own pydantic config models (unknown keys forbidden). Every validation
error names the full field path, the offending value and the rule, e.g.
``grace.grouping.ratio (1.7) must be in [0, 1]``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ds_grace.topology import Topology

GRACE_KEY = "grace"
MAX_TIMEOUT_S = 86400.0  # a day: longer is a hang, and far larger values overflow the timeout types


class GraceConfigError(ValueError):
    """A grace block (or the ds_config holding it) is invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, validate_default=True, allow_inf_nan=False
    )


Auto = Literal["auto"]


class TopologyConfig(_Section):
    num_nodes: int | Auto = Field("auto", description='Nodes in the expert-parallel group, or "auto".')
    gpus_per_node: int | Auto = Field("auto", description='Ranks per node, or "auto" (launcher LOCAL_SIZE).')

    @field_validator("num_nodes", "gpus_per_node")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError('must be an integer >= 1 or "auto"')
        return value


class ProfileConfig(_Section):
    trace: str | None = Field(None, description="RoutingTrace file to plan from when no plan is given.")
    tokens: int = Field(8192, ge=1, description="Calibration tokens to record when profiling.")


class GroupingConfig(_Section):
    enabled: bool = True
    ratio: float | Auto = Field("auto", description='GPU-level size slack r in [0, 1], or "auto" (knee).')
    affinity: Literal["intra", "intra+inter"] = "intra"
    max_experts_per_gpu: int | None = Field(None, ge=1, description="Memory cap: expert slots per GPU.")

    @field_validator("ratio", mode="before")
    @classmethod
    def _ratio(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0.0 <= value <= 1.0:
            raise ValueError("must be in [0, 1]")
        return value


class OnlineReplicationConfig(_Section):
    enabled: bool = False
    interval: int = Field(64, ge=1, description="Forward passes between load aggregations.")
    threshold: float = Field(0.85, gt=0.0, le=1.0, description="Re-plan when balancedness falls below.")
    window: int = Field(4, ge=1, description="Intervals of history the re-planner looks at.")
    max_bytes_per_interval: int | None = Field(None, ge=0, description="Cap on replica bytes moved.")
    source: Literal["peer", "disk"] = Field(
        "peer", description="Where a replica moving in comes from: a live copy on a peer, or the checkpoint."
    )
    regroup: bool = Field(
        False,
        description="Move primaries too: every interval, moves scored on the routing sampled in the window "
        "and taken by gain per byte within max_bytes_per_interval (ds_grace/online/regroup.py).",
    )
    sample_tokens: int = Field(
        256, ge=1, description="With regroup: routed tokens per layer each rank keeps per interval."
    )


class ReplicationConfig(_Section):
    enabled: bool = True
    mode: Literal["paper", "budget"] = "budget"
    extra_slots_per_gpu: int = Field(
        1,
        ge=0,
        description="Budget mode: slots per GPU = ceil(E / GPUs) + this (when slots_per_gpu is unset).",
    )
    slots_per_gpu: int | None = Field(
        None,
        ge=1,
        description="Budget mode: exactly this many expert slots on every GPU (grace and eplb), all used; "
        "must be in [ceil(E / GPUs), E]. Unset: ceil(E / GPUs) + extra_slots_per_gpu.",
    )
    robust: bool = Field(
        True,
        description="Budget mode, per-token traces: plan for traffic the trace did not record (recent loads and "
        "locality swaps where the sample drifts, shrunk loads, replica room, experts spread inside nodes; "
        "see ds_grace/planning/robust.py).",
    )
    online: OnlineReplicationConfig = OnlineReplicationConfig()


class RoutingConfig(_Section):
    policy: Literal["tar", "wrr", "primary"] = "tar"
    low_latency_policy: Literal["tar", "wrr", "primary"] | None = Field(
        "primary",
        description="Instance choice on forwards that go by the low-latency buffer (at most "
        "communication.low_latency_max_tokens tokens per rank); null: `policy`. At so few rows an expert "
        "copy costs a read of its weights whatever its rows, and the buffer's size does not depend on "
        "the choice, so one copy per expert is fastest.",
    )


_REPLACED_COMMUNICATION_KEYS = {
    "hierarchical": "grace.communication.path (flat | hierarchical | auto)",
    "adaptive_path": "grace.communication.path: auto",
}


class CommunicationConfig(_Section):
    path: Literal["flat", "hierarchical", "auto"] = Field(
        "auto",
        description="flat: one all-to-all, a token once per GPU; hierarchical: across nodes once per node, "
        "then inside the node; auto: flat or hierarchical per layer and forward, by a start-up cost model.",
    )
    dedup: bool = True
    timeout_s: float = Field(
        300.0, gt=0.0, le=MAX_TIMEOUT_S, description="Collective timeout; a lost rank fails fast."
    )
    low_latency_max_tokens: int = Field(
        64,
        ge=0,
        le=4096,
        description="Bound of the low-latency path (static buffers, no host read): forwards whose caller "
        "promises at most this many tokens per rank (a decode step) take it; 0: off. Applies with dedup "
        "(the default becomes 0 when dedup is false).",
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key, replacement in _REPLACED_COMMUNICATION_KEYS.items():
                if key in data:
                    raise _Contradiction(
                        f"grace.communication.{key} ({json.dumps(data[key])}) is no longer a field: use {replacement}"
                    )
        return data


class PlanConfig(_Section):
    path: str | None = Field(None, description="A saved GracePlan (JSON) to serve with.")


class VanillaConfig(_Section):
    """How the vanilla DeepSpeed-MoE comparison runs (used when grace.enabled is false)."""

    drop_tokens: bool = Field(False, description="DeepSpeed's capacity-based dropping (lossy) or lossless.")
    eval_capacity_factor: float = Field(1.0, gt=0.0, description="DeepSpeed's capacity factor at eval.")
    min_capacity: int = Field(4, ge=0)


class GraceConfig(_Section):
    enabled: bool = True
    topology: TopologyConfig = TopologyConfig()
    profile: ProfileConfig = ProfileConfig()
    grouping: GroupingConfig = GroupingConfig()
    replication: ReplicationConfig = ReplicationConfig()
    routing: RoutingConfig = RoutingConfig()
    communication: CommunicationConfig = CommunicationConfig()
    plan: PlanConfig = PlanConfig()
    vanilla: VanillaConfig = VanillaConfig()

    @model_validator(mode="after")
    def _contradictions(self) -> GraceConfig:
        if self.communication.path != "flat" and not self.communication.dedup:
            raise _Contradiction(
                f"grace.communication.dedup (false) must be true when grace.communication.path is "
                f"{self.communication.path}: the hierarchical path sends each token once per node by construction"
            )
        comm = self.communication
        if (
            not comm.dedup
            and comm.low_latency_max_tokens
            and "low_latency_max_tokens" in comm.model_fields_set
        ):
            raise _Contradiction(
                f"grace.communication.low_latency_max_tokens ({comm.low_latency_max_tokens}) must be 0 when "
                "grace.communication.dedup is false: the fixed buffers hold each token once per rank"
            )
        if self.replication.online.enabled and not self.replication.enabled:
            raise _Contradiction(
                "grace.replication.online.enabled (true) requires grace.replication.enabled to be true"
            )
        if not self.grouping.enabled and self.grouping.ratio != "auto":
            raise _Contradiction(
                f"grace.grouping.ratio ({self.grouping.ratio}) is set but grace.grouping.enabled is false"
            )
        if (
            self.replication.mode == "budget"
            and self.replication.enabled
            and self.replication.extra_slots_per_gpu == 0
        ):
            raise _Contradiction(
                "grace.replication.extra_slots_per_gpu (0) must be >= 1 in budget mode while replication "
                "is enabled; set grace.replication.enabled to false for no replicas"
            )
        if self.replication.slots_per_gpu is not None and (
            self.replication.mode != "budget" or not self.replication.enabled
        ):
            raise _Contradiction(
                f"grace.replication.slots_per_gpu ({self.replication.slots_per_gpu}) is set but replication "
                f"{'is disabled' if not self.replication.enabled else 'mode is ' + repr(self.replication.mode)}; "
                "it applies to enabled replication in mode 'budget'"
            )
        return self

    def resolve_topology(self, *, world_size: int, env: Mapping[str, str] | None = None) -> Topology:
        """Fill "auto" fields from the launcher environment and check them against world_size.

        DeepSpeed's launcher exports LOCAL_SIZE (ranks on this node) and CROSS_SIZE (nodes).
        """
        env = os.environ if env is None else env
        gpus = self.topology.gpus_per_node
        nodes = self.topology.num_nodes
        if gpus == "auto":
            if "LOCAL_SIZE" in env:
                gpus = _positive_env(env, "LOCAL_SIZE")
            elif nodes != "auto":
                gpus = world_size // nodes if world_size % nodes == 0 else 0
            else:
                gpus = world_size
        if nodes == "auto":
            nodes = (
                _positive_env(env, "CROSS_SIZE")
                if "CROSS_SIZE" in env
                else (world_size // gpus if gpus else 0)
            )
        if nodes * gpus != world_size:
            raise GraceConfigError(
                f"grace.topology.num_nodes ({self.topology.num_nodes} -> {nodes}) x "
                f"grace.topology.gpus_per_node ({self.topology.gpus_per_node} -> {gpus}) must equal the "
                f"expert-parallel world size ({world_size})"
            )
        return Topology(num_nodes=nodes, gpus_per_node=gpus)


def _positive_env(env: Mapping[str, str], name: str) -> int:
    text = env[name]
    if not text.isdigit() or int(text) < 1:
        raise GraceConfigError(
            f"environment variable {name} ({text!r}) must be an integer >= 1 (it resolves grace.topology "
            '"auto" fields)'
        )
    return int(text)


class _Contradiction(ValueError):
    """Raised inside model validation; its message is already complete."""


def _format_error(error: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error["loc"] if not str(part).startswith(("function-", "literal["))]
    loc = [part for part in loc if part not in ("int", "float", "str", "bool", "dict")]
    path = ".".join([GRACE_KEY, *loc]) if loc else GRACE_KEY
    value = error.get("input")
    shown = json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
    ctx_error = error.get("ctx", {}).get("error")
    if isinstance(ctx_error, _Contradiction):
        return str(ctx_error)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path} ({shown}) is not a known field"
    if kind == "missing":
        return f"{path} is required"
    message = str(ctx_error) if ctx_error is not None else error["msg"]
    message = message.removeprefix("Value error, ")
    if message.startswith("Input should be"):
        message = "must be" + message[len("Input should be") :]
    return f"{path} ({shown}) {message}"


def _join_errors(exc: ValidationError) -> str:
    """One message per field; alternatives of a union are joined with "or"."""
    by_field: dict[str, list[str]] = {}
    for err in exc.errors():
        message = _format_error(err)
        head, sep, rule = message.partition(") ")
        key = head + sep if sep else message
        rules = by_field.setdefault(key, [])
        if rule and rule not in rules:
            rules.append(rule)
    return "; ".join(key + " or ".join(rules) if rules else key for key, rules in sorted(by_field.items()))


def parse_grace_block(block: Any) -> GraceConfig:
    if block is None:
        return GraceConfig(enabled=False)
    if not isinstance(block, Mapping):
        raise GraceConfigError(f"grace ({block!r}) must be a JSON object")
    try:
        return GraceConfig.model_validate(dict(block))
    except ValidationError as exc:
        raise GraceConfigError(_join_errors(exc)) from None


def load_ds_config(
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
) -> tuple[dict[str, Any], GraceConfig]:
    """Split a ds_config into (DeepSpeed config without "grace", validated GraceConfig).

    A config with no "grace" block gives GraceConfig(enabled=False): vanilla DeepSpeed-MoE.
    """
    if isinstance(path_or_dict, Mapping):
        ds_config = copy.deepcopy(dict(path_or_dict))
    else:
        path = Path(path_or_dict)
        try:
            ds_config = json.loads(path.read_text())
        except FileNotFoundError:
            raise GraceConfigError(f"ds_config file ({path}) does not exist") from None
        except IsADirectoryError:
            raise GraceConfigError(f"ds_config file ({path}) is a directory, not a JSON file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise GraceConfigError(f"ds_config file ({path}) cannot be read: {exc}") from None
        except json.JSONDecodeError as exc:
            raise GraceConfigError(f"ds_config file ({path}) is not valid JSON: {exc}") from None
        if not isinstance(ds_config, dict):
            raise GraceConfigError(f"ds_config file ({path}) must hold a JSON object")
    grace = parse_grace_block(ds_config.pop(GRACE_KEY, None))
    return ds_config, grace
