"""Drift replay: a plan fitted on one trace serves another, with online re-planning (pure, no ranks).

Shape legend: L MoE layers, E experts, T tokens.

The served trace's tokens are streamed in recorded order, ``tokens_per_forward`` per forward and
``interval`` forwards per interval (interval i holds tokens [i x F x I, (i + 1) x F x I) of every
layer). At each interval the live plan is scored on the interval's tokens (cross-node copies per
token and balancedness, ``evaluate_plan``), then re-planned on the window of the last ``window``
intervals (``ds_grace.online.regroup``; mode "regroup" may move primaries, "replicas" moves replicas
only, "off" keeps the first plan); the new plan serves from the next interval on. Beside it, on the
same intervals: EPLB re-planned on the same windows (no byte cap; interval 0: EPLB fitted on the
profile) and a GRACE plan fitted on the whole served trace (what a re-profile would give).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ds_grace.config import GraceConfig
from ds_grace.online.regroup import regroup
from ds_grace.planning.build import build_plan
from ds_grace.planning.metrics import evaluate_plan
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace

OnlineMode = Literal["regroup", "replicas", "off"]
ONLINE_MODES: tuple[str, ...] = ("regroup", "replicas", "off")


@dataclass(frozen=True)
class DriftSpec:
    tokens_per_forward: int = 16
    interval: int = 1  # forwards per interval
    window: int = 4  # intervals of history the re-planner sees
    online: OnlineMode = "regroup"
    max_bytes_per_interval: int | None = None
    expert_nbytes: int = 1

    def __post_init__(self) -> None:
        for name in ("tokens_per_forward", "interval", "window", "expert_nbytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
        if self.online not in ONLINE_MODES:
            raise ValueError(f"online ({self.online!r}) must be one of {', '.join(ONLINE_MODES)}")
        budget = self.max_bytes_per_interval
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"max_bytes_per_interval ({budget!r}) must be an integer >= 0 or None")


def token_slice(trace: RoutingTrace, start: int, stop: int) -> RoutingTrace | None:
    """Rows [start, stop) of every layer (None when some layer has no row there)."""
    ids = [layer[start:stop] for layer in trace.topk_ids]
    if any(len(layer) == 0 for layer in ids):
        return None
    return RoutingTrace(topk_ids=tuple(ids), num_experts=trace.num_experts)


def replay_drift(
    plan_on: RoutingTrace,
    serve: RoutingTrace,
    *,
    topology: Topology,
    spec: DriftSpec,
    config: GraceConfig | None = None,
) -> list[dict[str, Any]]:
    """One row per interval: interval, copies, balancedness, eplb_replanned_balancedness,
    fitted_copies, bytes_moved (bytes the re-plan before this interval moved), moves."""
    cfg = GraceConfig() if config is None else config
    if (plan_on.num_layers, plan_on.num_experts) != (serve.num_layers, serve.num_experts):
        raise ValueError(
            f"--plan-on ({plan_on.num_layers} layers x {plan_on.num_experts} experts) and --serve "
            f"({serve.num_layers} x {serve.num_experts}) must have the same layers and experts"
        )
    live = build_plan(plan_on, topology=topology, config=cfg)
    eplb = build_plan(plan_on, topology=topology, config=cfg, policy="eplb")
    fitted = build_plan(serve, topology=topology, config=cfg)
    per_interval = spec.tokens_per_forward * spec.interval
    rows: list[dict[str, Any]] = []
    bytes_moved, moves = 0, 0
    index = 0
    while (tokens := token_slice(serve, index * per_interval, (index + 1) * per_interval)) is not None:
        now = evaluate_plan(tokens, live, routing_policy=cfg.routing.policy)
        rows.append(
            {
                "interval": index,
                "copies": now["cross_node_copies_per_token"],
                "balancedness": now["balancedness"],
                "eplb_replanned_balancedness": evaluate_plan(tokens, eplb)["balancedness"],
                "fitted_copies": evaluate_plan(tokens, fitted)["cross_node_copies_per_token"],
                "bytes_moved": bytes_moved,
                "moves": moves,
            }
        )
        start = max(0, index + 1 - spec.window) * per_interval
        window = token_slice(serve, start, (index + 1) * per_interval)
        assert window is not None
        eplb = build_plan(window, topology=topology, config=cfg, policy="eplb")
        bytes_moved, moves = 0, 0
        if spec.online != "off":
            result = regroup(
                live,
                window,
                config=cfg,
                expert_nbytes=spec.expert_nbytes,
                max_bytes=spec.max_bytes_per_interval,
                regroup_primaries=spec.online == "regroup",
                batch_tokens=spec.tokens_per_forward,
            )
            if result.plan is not None:
                live, bytes_moved, moves = result.plan, result.bytes_moved, len(result.moves)
        index += 1
    return rows
