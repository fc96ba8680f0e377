"""Traffic counters of one MoE layer: rows and bytes per stage, inside and across nodes.

Stages, in the order they run:
- "sizes": the row-count exchange that precedes the payload (one message per peer);
- hierarchical: "dispatch.stage1" (cross-node, to the peer GPU of each remote node),
  "dispatch.stage2" (inside the node), "combine.stage2", "combine.stage1";
- flat: "dispatch", "combine".
A row is one token's hidden vector (plus its route metadata in dispatch); bytes count the payload
as sent. Rows a rank sends to itself never touch a link and are not counted. "expert_rows" counts,
per local slot, the routes the rank's experts computed (its live expert load).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ds_grace.topology import Topology

# device tensors of routes per slot kept before they are added up into one (no host read either way)
PENDING_ROWS_FOLD = 64


@dataclass
class StageTraffic:
    rows_sent_intra: int = 0
    rows_sent_inter: int = 0
    rows_recv_intra: int = 0
    rows_recv_inter: int = 0
    bytes_sent_intra: int = 0
    bytes_sent_inter: int = 0
    bytes_recv_intra: int = 0
    bytes_recv_inter: int = 0

    def add(self, other: StageTraffic) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class TrafficCounters:
    """Accumulates over forwards until ``reset()``; ``snapshot()`` gives plain data."""

    stages: dict[str, StageTraffic] = field(default_factory=dict)
    forwards: int = 0
    _expert_rows: list[int] = field(default_factory=list)
    # rows per slot still on the device (low-latency forwards): read when someone asks, not per forward
    _pending_rows: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def expert_rows(self) -> list[int]:
        """Routes computed per local slot since the last reset."""
        pending, self._pending_rows = self._pending_rows, []
        for rows_S in pending:
            self.record_expert_rows(rows_S.tolist())
        return self._expert_rows

    def record_exchange(
        self,
        stage: str,
        *,
        send_rows: Sequence[int],
        recv_rows: Sequence[int],
        peer_ep_ranks: Sequence[int],
        ep_index: int,
        topology: Topology,
        bytes_per_row: int,
    ) -> None:
        """Add one all-to-all: send_rows[i] / recv_rows[i] rows to / from EP rank peer_ep_ranks[i]."""
        traffic = self.stages.setdefault(stage, StageTraffic())
        my_node = topology.node_of(ep_index)
        for sent, received, peer in zip(send_rows, recv_rows, peer_ep_ranks):
            if peer == ep_index:
                continue
            scope = "intra" if topology.node_of(peer) == my_node else "inter"
            for direction, rows in (("sent", sent), ("recv", received)):
                name = f"{direction}_{scope}"
                setattr(traffic, f"rows_{name}", getattr(traffic, f"rows_{name}") + int(rows))
                setattr(
                    traffic, f"bytes_{name}", getattr(traffic, f"bytes_{name}") + int(rows) * bytes_per_row
                )

    def record_expert_rows(self, rows_per_slot: Sequence[int] | torch.Tensor) -> None:
        """Add routes computed per slot: host integers, or a device tensor read only when asked for
        (every PENDING_ROWS_FOLD of them are added up on the device, so a long decode that never asks
        holds a bounded number)."""
        if isinstance(rows_per_slot, torch.Tensor):
            self._pending_rows.append(rows_per_slot.detach())
            if len(self._pending_rows) >= PENDING_ROWS_FOLD:
                self._pending_rows = [torch.stack(self._pending_rows).sum(0)]
            return
        if len(self._expert_rows) < len(rows_per_slot):
            self._expert_rows.extend([0] * (len(rows_per_slot) - len(self._expert_rows)))
        for slot, rows in enumerate(rows_per_slot):
            self._expert_rows[slot] += int(rows)

    def total(self, *, include_sizes: bool = False) -> StageTraffic:
        out = StageTraffic()
        for name, traffic in self.stages.items():
            if include_sizes or name != "sizes":
                out.add(traffic)
        return out

    def reset(self) -> None:
        self.stages.clear()
        self._expert_rows.clear()
        self._pending_rows.clear()
        self.forwards = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "forwards": self.forwards,
            "stages": {name: traffic.as_dict() for name, traffic in self.stages.items()},
            "expert_rows": list(self.expert_rows),
            "total": self.total().as_dict(),
        }


def iter_counters(module: nn.Module) -> Iterator[tuple[str, TrafficCounters]]:
    """(module name, counters) of every submodule that owns GRACE traffic counters."""
    seen: set[int] = set()
    for name, sub in module.named_modules():
        counters = getattr(sub, "comm_counters", None)
        if isinstance(counters, TrafficCounters) and id(counters) not in seen:
            seen.add(id(counters))
            yield name, counters


def collect_counters(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Snapshots of all GRACE layers under `module`, keyed by module name."""
    return {name: counters.snapshot() for name, counters in iter_counters(module)}


def reset_counters(module: nn.Module) -> None:
    for _, counters in iter_counters(module):
        counters.reset()


def summed_traffic(snapshots: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Traffic of every layer in `snapshots` (``TrafficCounters.snapshot()``s) summed over the layers and
    over every rank (one all-gather; this rank alone without a process group). Collective: every rank
    calls it. Returns {"ranks", "stages": {stage: StageTraffic fields}, "total": the stages but "sizes"}."""
    import torch.distributed as dist

    local: dict[str, StageTraffic] = {}
    for snapshot in snapshots:
        for stage, fields in snapshot["stages"].items():
            local.setdefault(stage, StageTraffic()).add(StageTraffic(**fields))
    per_rank = [{stage: traffic.as_dict() for stage, traffic in local.items()}]
    if dist.is_available() and dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {stage: traffic.as_dict() for stage, traffic in local.items()})
    stages: dict[str, StageTraffic] = {}
    for rank_stages in per_rank:
        for stage, fields in rank_stages.items():
            stages.setdefault(stage, StageTraffic()).add(StageTraffic(**fields))
    total = StageTraffic()
    for stage, traffic in stages.items():
        if stage != "sizes":
            total.add(traffic)
    return {
        "ranks": len(per_rank),
        "stages": {stage: traffic.as_dict() for stage, traffic in sorted(stages.items())},
        "total": total.as_dict(),
    }
