"""GracePlan: where every expert instance lives and how tokens pick one.

Shape legend: L layers, E logical experts, R ranks (GPUs), S slots per rank (padded), I instances.

A LayerPlan is the placement of one MoE layer:
- ``slots[r]``: expert ids hosted by rank r, in local slot order (slot2expert per rank);
- ``slot_weights[r]``: the WRR weight of each of those instances (> 0);
- ``primary[e]``: the rank holding expert e's primary (grouping) instance; the others are replicas.

Plans are plain data: building them is the planners' job (pure functions), applying them is the
runtime's. JSON is the file format; ``content_hash`` identifies a plan across ranks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ds_grace.files import write_text_atomic
from ds_grace.topology import Topology

PLAN_FORMAT_VERSION = 1
RoutingPolicy = Literal["tar", "wrr", "primary"]


class PlanError(ValueError):
    """A plan is malformed or does not fit the topology it is used with."""


@dataclass(frozen=True)
class LayerPlan:
    slots: tuple[tuple[int, ...], ...]
    slot_weights: tuple[tuple[float, ...], ...]
    primary: tuple[int, ...]

    @classmethod
    def from_lists(
        cls,
        *,
        slots: list[list[int]],
        primary: list[int],
        slot_weights: list[list[float]] | None = None,
        where: str = "layer",
    ) -> LayerPlan:
        """A LayerPlan from plain lists, typed strictly: ids must be integers (a bool, "1" or 2.9 is a
        PlanError naming the field, never coerced), weights real numbers."""
        slot_rows = _rows(slots, f"{where}.slots")
        if slot_weights is None:
            slot_weights = [[1.0] * len(row) for row in slot_rows]
        weight_rows = _rows(slot_weights, f"{where}.slot_weights")
        return cls(
            slots=tuple(
                tuple(_integer(e, f"{where}.slots[{r}][{i}]") for i, e in enumerate(row))
                for r, row in enumerate(slot_rows)
            ),
            slot_weights=tuple(
                tuple(_real(w, f"{where}.slot_weights[{r}][{i}]") for i, w in enumerate(row))
                for r, row in enumerate(weight_rows)
            ),
            primary=tuple(
                _integer(rank, f"{where}.primary[{e}]")
                for e, rank in enumerate(_seq(primary, f"{where}.primary"))
            ),
        )

    @property
    def num_experts(self) -> int:
        return len(self.primary)

    @property
    def num_ranks(self) -> int:
        return len(self.slots)

    def instances(self, expert: int) -> tuple[int, ...]:
        """Ranks hosting `expert`, primary first, then replicas by rank."""
        hosts = [r for r, s in enumerate(self.slots) if expert in s and r != self.primary[expert]]
        return (self.primary[expert], *hosts)

    def instance_weights(self, expert: int) -> tuple[float, ...]:
        """WRR weight of each instance, in the order of `instances(expert)`."""
        return tuple(self.slot_weights[r][self.slots[r].index(expert)] for r in self.instances(expert))

    def log2phy(self) -> list[list[int]]:
        return [list(self.instances(e)) for e in range(self.num_experts)]

    def replica_count(self) -> int:
        return sum(len(s) for s in self.slots) - self.num_experts

    def validate(self, *, where: str = "layer") -> None:
        num_experts = self.num_experts
        if len(self.slot_weights) != len(self.slots):
            raise PlanError(
                f"{where}.slot_weights has {len(self.slot_weights)} ranks, slots has {len(self.slots)}"
            )
        seen = np.zeros(num_experts, dtype=bool)
        for rank, (experts, weights) in enumerate(zip(self.slots, self.slot_weights)):
            if len(experts) != len(weights):
                raise PlanError(
                    f"{where}.slot_weights[{rank}] has {len(weights)} entries, slots[{rank}] has {len(experts)}"
                )
            if len(set(experts)) != len(experts):
                raise PlanError(f"{where}.slots[{rank}] ({list(experts)}) hosts an expert twice")
            for e in experts:
                if not 0 <= e < num_experts:
                    raise PlanError(f"{where}.slots[{rank}] expert id ({e}) must be in [0, {num_experts})")
                seen[e] = True
            for w in weights:
                if not (w > 0 and np.isfinite(w)):
                    raise PlanError(f"{where}.slot_weights[{rank}] weight ({w}) must be finite and > 0")
        missing = np.flatnonzero(~seen).tolist()
        if missing:
            raise PlanError(f"{where}: experts {missing} have no instance; every expert needs >= 1")
        for e, r in enumerate(self.primary):
            if not 0 <= r < len(self.slots) or e not in self.slots[r]:
                raise PlanError(f"{where}.primary[{e}] ({r}) must be a rank whose slots hold expert {e}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "slots": [list(s) for s in self.slots],
            "slot_weights": [list(w) for w in self.slot_weights],
            "primary": list(self.primary),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "layer") -> LayerPlan:
        fields = _fields(data, where, required=("slots", "slot_weights", "primary"))
        return cls.from_lists(
            slots=fields["slots"], primary=fields["primary"], slot_weights=fields["slot_weights"], where=where
        )


@dataclass(frozen=True)
class GracePlan:
    topology: Topology
    layers: tuple[LayerPlan, ...]
    policy: str = "grace"
    trace_fingerprint: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts if self.layers else 0

    def validate(self) -> None:
        if not self.layers:
            raise PlanError("plan.layers is empty; a plan needs >= 1 MoE layer")
        for i, layer in enumerate(self.layers):
            if layer.num_ranks != self.topology.world_size:
                raise PlanError(
                    f"plan.layers[{i}] places experts on {layer.num_ranks} ranks but the plan's topology "
                    f"({self.topology}) has {self.topology.world_size}"
                )
            if layer.num_experts != self.layers[0].num_experts:
                raise PlanError(
                    f"plan.layers[{i}] has {layer.num_experts} experts but plan.layers[0] has "
                    f"{self.layers[0].num_experts}; every MoE layer of a plan has the same expert count"
                )
            layer.validate(where=f"plan.layers[{i}]")
        if not isinstance(self.policy, str):
            raise PlanError(f"plan.policy ({self.policy!r}) must be a string")
        if self.trace_fingerprint is not None and not isinstance(self.trace_fingerprint, str):
            raise PlanError(f"plan.trace_fingerprint ({self.trace_fingerprint!r}) must be a string or null")
        if not isinstance(self.meta, dict):
            raise PlanError(f"plan.meta ({self.meta!r}) must be a JSON object")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"plan.meta must be JSON-serialisable without NaN or infinity: {exc}") from None

    def check_compatible(
        self,
        *,
        topology: Topology,
        num_layers: int | None = None,
        num_experts: int | None = None,
        plan_name: str = "plan",
        model_name: str = "the model",
    ) -> None:
        """Raise PlanError unless this plan fits the model and cluster it is about to serve; the messages
        name the plan and the model as `plan_name` and `model_name` (e.g. their files)."""
        if topology != self.topology:
            raise PlanError(
                f"{plan_name} topology ({self.topology}) does not match the cluster topology ({topology}); "
                "re-plan for this cluster with `ds-grace plan`"
            )
        if num_layers is not None and num_layers != self.num_layers:
            raise PlanError(f"{plan_name} has {self.num_layers} MoE layers but {model_name} has {num_layers}")
        if num_experts is not None and num_experts != self.num_experts:
            raise PlanError(
                f"{plan_name} has {self.num_experts} experts per layer but {model_name} has {num_experts}"
            )

    def content_dict(self) -> dict[str, Any]:
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "topology": {"num_nodes": self.topology.num_nodes, "gpus_per_node": self.topology.gpus_per_node},
            "policy": self.policy,
            "trace_fingerprint": self.trace_fingerprint,
            "layers": [layer.to_dict() for layer in self.layers],
            "meta": self.meta,
        }

    @property
    def content_hash(self) -> str:
        """sha256 of every field (meta included) in canonical JSON, after strict typing."""
        canonical = json.dumps(self.content_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {**self.content_dict(), "content_hash": self.content_hash}

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GracePlan:
        """The plan a to_dict() wrote, checked strictly: every field is required and typed (nothing is
        coerced), unknown fields are errors, and content_hash must match the content."""
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != PLAN_FORMAT_VERSION or isinstance(version, bool):
            raise PlanError(f"plan.format_version ({version!r}) must be {PLAN_FORMAT_VERSION}")
        fields = _fields(data, "plan", required=(*_PLAN_FIELDS, "content_hash"))
        topo_fields = _fields(fields["topology"], "plan.topology", required=("num_nodes", "gpus_per_node"))
        topology = Topology(
            num_nodes=_integer(topo_fields["num_nodes"], "plan.topology.num_nodes"),
            gpus_per_node=_integer(topo_fields["gpus_per_node"], "plan.topology.gpus_per_node"),
        )
        layers = tuple(
            LayerPlan.from_dict(layer, where=f"plan.layers[{i}]")
            for i, layer in enumerate(_seq(fields["layers"], "plan.layers"))
        )
        plan = cls(
            topology=topology,
            layers=layers,
            policy=fields["policy"],
            trace_fingerprint=fields["trace_fingerprint"],
            meta=fields["meta"],
        )
        stored = fields["content_hash"]
        if stored != plan.content_hash:
            raise PlanError(
                f"plan.content_hash ({stored!r}) does not match its content ({plan.content_hash})"
            )
        return plan

    @classmethod
    def load(cls, path: str | Path) -> GracePlan:
        path = Path(path)
        try:
            data = json.loads(path.read_text(), parse_constant=_no_constant)
        except FileNotFoundError:
            raise PlanError(f"plan file ({path}) does not exist") from None
        except IsADirectoryError:
            raise PlanError(f"plan file ({path}) is a directory") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"plan file ({path}) cannot be read: {exc}") from None
        except (json.JSONDecodeError, ValueError) as exc:
            raise PlanError(f"plan file ({path}) is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except (PlanError, ValueError) as exc:
            raise PlanError(f"plan file ({path}): {exc}") from None

    def to_eplb(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Export in DeepSeek EPLB's form: (phy2log_LP, log2phy_LEI, logcnt_LE).

        Physical slot p = rank * S + local slot, with S the largest slot count of any rank in any
        layer; ranks with fewer slots are padded with -1 in phy2log. log2phy lists the physical
        slot ids of each expert's instances (primary first), padded with -1 to the largest count.
        """
        max_slots = max(len(s) for layer in self.layers for s in layer.slots)
        max_inst = max(len(layer.instances(e)) for layer in self.layers for e in range(layer.num_experts))
        num_ranks = self.topology.world_size
        phy2log = np.full((self.num_layers, num_ranks * max_slots), -1, dtype=np.int64)
        log2phy = np.full((self.num_layers, self.num_experts, max_inst), -1, dtype=np.int64)
        logcnt = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for li, layer in enumerate(self.layers):
            for rank, experts in enumerate(layer.slots):
                for slot, e in enumerate(experts):
                    phy2log[li, rank * max_slots + slot] = e
            for e in range(layer.num_experts):
                phys = [r * max_slots + layer.slots[r].index(e) for r in layer.instances(e)]
                log2phy[li, e, : len(phys)] = phys
                logcnt[li, e] = len(phys)
        return phy2log, log2phy, logcnt


_PLAN_FIELDS = ("format_version", "topology", "policy", "trace_fingerprint", "layers", "meta")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _fields(data: Any, where: str, *, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise PlanError(f"{where} ({type(data).__name__}) must be a JSON object")
    missing = [name for name in required if name not in data]
    if missing:
        raise PlanError(f"{where} lacks the field(s) {missing}")
    unknown = sorted(str(name) for name in data if name not in required)
    if unknown:
        raise PlanError(f"{where} has unknown field(s) {unknown}")
    return data


def _seq(value: Any, where: str) -> list[Any] | tuple[Any, ...]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise PlanError(f"{where} ({value!r}) must be a list")
    return value


def _rows(value: Any, where: str) -> list[list[Any] | tuple[Any, ...]]:
    return [_seq(row, f"{where}[{r}]") for r, row in enumerate(_seq(value, where))]


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PlanError(f"{where} ({value!r}) must be an integer")
    return int(value)


def _real(value: Any, where: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PlanError(f"{where} ({value!r}) must be a number")
    return float(value)


def instance_table(layer: LayerPlan) -> tuple[np.ndarray, np.ndarray]:
    """(inst_rank_EI, inst_weight_EI): every expert's instances in the order of ``LayerPlan.instances``
    (primary first, then replicas by rank) and their WRR weights; padding: rank -1, weight 0."""
    num_ranks, num_experts = layer.num_ranks, layer.num_experts
    weight_RE = np.zeros((num_ranks, num_experts), dtype=np.float64)
    for rank, (experts, weights) in enumerate(zip(layer.slots, layer.slot_weights)):
        weight_RE[rank, list(experts)] = weights
    hosts_RE = weight_RE > 0
    primary_E = np.asarray(layer.primary, dtype=np.int64)
    rank_R = np.arange(num_ranks)
    # sort key per (rank, expert): the primary first (-1), replicas by rank, non-hosts last
    key_RE = np.where(hosts_RE, rank_R[:, None], num_ranks)
    key_RE = np.where(rank_R[:, None] == primary_E[None, :], -1, key_RE)
    max_inst = int(hosts_RE.sum(axis=0).max())
    order_EI = np.argsort(key_RE.T, axis=1, kind="stable")[:, :max_inst]
    valid_EI = np.take_along_axis(key_RE.T, order_EI, axis=1) < num_ranks
    inst_rank_EI = np.where(valid_EI, order_EI, -1)
    inst_weight_EI = np.where(valid_EI, np.take_along_axis(weight_RE.T, order_EI, axis=1), 0.0)
    return inst_rank_EI, inst_weight_EI


def route_table(layer: LayerPlan, topology: Topology, policy: RoutingPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Candidate instances per (origin rank, expert) and their cumulative choice probabilities.

    Returns (cand_rank_REI, cand_cdf_REI): for a token on origin rank g that chose expert e, the
    instance on rank cand_rank_REI[g, e, j] is used with probability cdf[j] - cdf[j-1]. Padding
    entries have rank -1 and cdf 1.0 (never chosen). Policies:
    - "tar": own rank if it hosts e; else instances on g's node by WRR weight; else all by weight;
    - "wrr": all instances by WRR weight, ignoring locality;
    - "primary": always the primary instance (no replica is used).
    Built with array ops over all (origin, expert, instance) triples (G = origin ranks).
    """
    if policy not in ("tar", "wrr", "primary"):
        raise ValueError(f"grace.routing.policy ({policy!r}) must be one of 'tar', 'wrr', 'primary'")
    num_ranks = topology.world_size
    inst_rank_EI, inst_weight_EI = instance_table(layer)
    valid_EI = inst_rank_EI >= 0
    shape = (num_ranks, *inst_rank_EI.shape)
    rank_GEI = np.broadcast_to(inst_rank_EI, shape)
    if policy == "primary":
        chosen_GEI = np.broadcast_to(np.arange(inst_rank_EI.shape[1]) == 0, shape)
    elif policy == "wrr":
        chosen_GEI = np.broadcast_to(valid_EI, shape)
    else:
        origin_G = np.arange(num_ranks)[:, None, None]
        own_GEI = rank_GEI == origin_G
        node_of_EI = np.where(valid_EI, inst_rank_EI // topology.gpus_per_node, -1)
        local_GEI = node_of_EI[None] == origin_G // topology.gpus_per_node
        chosen_GEI = np.where(
            own_GEI.any(axis=2, keepdims=True),
            own_GEI,
            np.where(local_GEI.any(axis=2, keepdims=True), local_GEI, valid_EI[None]),
        )
    # chosen instances first, in instance order; the own-rank instance alone weighs 1.0
    order_GEI = np.argsort(~chosen_GEI, axis=2, kind="stable")
    kept_GEI = np.take_along_axis(chosen_GEI, order_GEI, axis=2)
    weight_GEI = np.where(
        kept_GEI, np.take_along_axis(np.broadcast_to(inst_weight_EI, shape), order_GEI, axis=2), 0.0
    )
    total_GE1 = np.cumsum(weight_GEI, axis=2)[:, :, -1:]
    cand_cdf = np.cumsum(weight_GEI / total_GE1, axis=2)
    last_GEI = np.arange(shape[2]) >= kept_GEI.sum(axis=2, keepdims=True) - 1
    cand_cdf = np.where(last_GEI, 1.0, cand_cdf)
    cand_rank = np.where(kept_GEI, np.take_along_axis(rank_GEI, order_GEI, axis=2), -1)
    return cand_rank.astype(np.int64), cand_cdf
