"""OnlineReplicator: replication that follows the load while serving (monitor, re-plan, migrate).

Shape legend: L MoE layers, E logical experts, R expert-parallel ranks, W intervals in the window.

Call ``step()`` on every rank once after every forward pass. Every ``interval`` steps, at a
boundary between two forwards, all ranks run the same sequence:
1. wait for the replica transfers started at the previous boundary (they overlapped the forwards);
2. one all-gather of each rank's fields: its expert counts of the interval (L x E), its computed
   routes per layer, the hashes of its live and pending plans; the counts are summed into the
   window (the last ``window`` intervals), identical on every rank;
3. a pending migration whose bytes have all arrived goes live now, on every rank (its hash was
   gathered in 2: a mismatch raises PlanMismatchError on every rank, nothing switches); layers swap
   their plan and slots, dropped replicas are freed;
4. with no migration pending, a layer whose predicted balancedness on the window is below
   ``threshold`` is re-planned (primaries fixed, few replicas moved); with ``regroup``, primaries may
   move too: each rank's first ``sample_tokens`` routed tokens per layer of the interval ride in the
   gather of 2, so every rank holds the same window of routing, and ``ds_grace.online.regroup`` takes
   the moves that pay most per byte within ``max_bytes_per_interval``; every rank's decision (the new
   plan's hash, or "none") is checked across ranks before any byte moves, so a rank that alone
   decides differently is a PlanMismatchError on every rank, not a hang;
5. the next chunks of a pending migration, up to ``max_bytes_per_interval`` in total, start
   point-to-point into staging buffers beside the live experts (``source: "peer"``), or, with
   ``source: "disk"`` and a model served from a checkpoint folder, each destination reads them from
   the checkpoint files (no transfer). Every migration record says which (``source``) and how many
   bytes (``bytes_from_peers``, ``bytes_read_from_disk``; ``rank_bytes_read_from_disk`` is this rank's).
Outputs never change: a token's experts and gate weights are the gate's, only the instance that
computes them moves, and every instance is a byte-exact copy.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ds_grace.comm.groups import GraceGroups
from ds_grace.comm.migration import (
    HASH_WORDS,
    NO_PLAN_HASH,
    Chunk,
    TransferBatch,
    check_same_hash,
    gather_fields,
    hash_words,
    raise_on_hash_mismatch,
    start_transfers,
)
from ds_grace.comm.schedule import value_counts
from ds_grace.config import (
    GraceConfig,
    GroupingConfig,
    OnlineReplicationConfig,
    ReplicationConfig,
    RoutingConfig,
)
from ds_grace.log import format_bytes, logger
from ds_grace.moe.layer import GraceMoE
from ds_grace.online.regroup import regroup
from ds_grace.online.replan import ReplanResult, predicted_balancedness, replan
from ds_grace.online.schedule import ReplicaCopy, cross_node_bytes, freed_replicas, next_chunks, plan_copies
from ds_grace.planning.plan import GracePlan
from ds_grace.trace import RoutingTrace

if TYPE_CHECKING:
    from ds_grace.models.deepspeed_checkpoint import DeepSpeedMoECheckpoint
    from ds_grace.models.sharded_load import ShardedCheckpoint

Replanner = Callable[[GracePlan, np.ndarray], ReplanResult]


def module_bytes(module: nn.Module) -> torch.Tensor:
    """The flat uint8 image of a module's state (state_dict order)."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in module.state_dict().values()]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def module_from_bytes(template: nn.Module, image: torch.Tensor) -> nn.Module:
    """A fresh copy of `template` whose state is `image` (as made by module_bytes)."""
    template_state = template.state_dict()
    needed = sum(t.numel() * t.element_size() for t in template_state.values())
    if needed != image.numel():
        raise ValueError(f"replica image has {image.numel()} bytes; the expert's state needs {needed}")
    module = copy.deepcopy(template)
    state, offset = {}, 0
    for name, tensor in template_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        raw = image[offset : offset + nbytes].to(tensor.device)
        state[name] = raw.view(tensor.dtype).view(tensor.shape)
        offset += nbytes
    module.load_state_dict(state)
    return module


class OnlineReplicator:
    """Online replication for the GraceMoE layers of one model on this rank (see module doc)."""

    def __init__(
        self,
        layers: Sequence[GraceMoE],
        *,
        config: OnlineReplicationConfig,
        replication: ReplicationConfig | None = None,
        max_experts_per_gpu: int | None = None,
        plan: GracePlan | None = None,
        groups: GraceGroups | None = None,
        checkpoint: ShardedCheckpoint | DeepSpeedMoECheckpoint | None = None,
    ) -> None:
        if config.source == "disk" and checkpoint is None:
            raise ValueError(
                'grace.replication.online.source ("disk") needs the model served from a checkpoint folder'
            )
        if not layers:
            raise ValueError("layers is empty; online replication needs >= 1 GraceMoE layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, GraceMoE):
                raise ValueError(f"layers[{i}] ({type(layer).__name__}) must be a GraceMoE")
        self.layers = tuple(layers)
        first = self.layers[0].deepspeed_moe
        self.topology = first.topology
        self.policy = first.options.policy
        live_layers = tuple(layer.layer_plan for layer in self.layers)
        if plan is None:
            plan = GracePlan(topology=self.topology, layers=live_layers, policy="online")
        elif plan.layers != live_layers:
            raise ValueError("plan.layers differ from the layers' served plans")
        self.config = config
        self.checkpoint = checkpoint
        self.replication = replication if replication is not None else ReplicationConfig()
        self.max_experts_per_gpu = max_experts_per_gpu
        self.groups = groups if groups is not None else first.groups()
        self.ep_index = self.groups.ep_index
        self.num_layers, self.num_experts = len(self.layers), plan.num_experts
        self.replanner: Replanner = self._default_replanner
        self._plan = plan
        self._step = 0
        self._counts_LE: torch.Tensor = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        self._window: deque[np.ndarray] = deque(maxlen=config.window)
        # regroup: this interval's first sample_tokens routed tokens per layer (-1: none), and the window's
        self.top_k = int(first.gate.k) if config.regroup else 0
        self._sample_LTK = torch.full(
            (self.num_layers, config.sample_tokens, self.top_k), -1, dtype=torch.int64
        )
        self._sampled_L = [0] * self.num_layers
        self._sample_window: deque[np.ndarray] = deque(maxlen=config.window)
        self._routes_seen = [0] * self.num_layers
        self._pending: dict[str, Any] | None = None
        self._in_flight: TransferBatch | None = None
        self._intervals: list[dict[str, Any]] = []
        self._migrations: list[dict[str, Any]] = []
        self._blocked_replans = 0
        for index, layer in enumerate(self.layers):
            layer.set_route_observer(self._observer(index))

    @classmethod
    def from_config(
        cls, layers: Sequence[GraceMoE], grace: GraceConfig, **kwargs: Any
    ) -> OnlineReplicator | None:
        """The replicator grace.replication.online asks for, or None when it is disabled."""
        if not (grace.replication.enabled and grace.replication.online.enabled):
            return None
        return cls(
            layers,
            config=grace.replication.online,
            replication=grace.replication,
            max_experts_per_gpu=grace.grouping.max_experts_per_gpu,
            **kwargs,
        )

    @classmethod
    def from_served(
        cls,
        served: Any,
        grace: GraceConfig,
        *,
        checkpoint: ShardedCheckpoint | DeepSpeedMoECheckpoint | None = None,
    ) -> OnlineReplicator | None:
        """For what init_inference set up (``engine.grace``: its GraceMoE ``layers`` and ``plan``), and
        the checkpoint folder it was served from (needed for grace.replication.online.source "disk")."""
        layers = [layer for layer in served.layers if isinstance(layer, GraceMoE)]
        if len(layers) != len(served.layers):
            raise ValueError("engine.grace.layers must all be GraceMoE (online replication needs grace mode)")
        return cls.from_config(layers, grace, plan=served.plan, checkpoint=checkpoint)

    # ---- monitor ----

    def _observer(self, index: int) -> Callable[[torch.Tensor], None]:
        """The layer's route observer: counts and samples stay on the ids' device (no host read per
        forward); the boundary reads them once per interval, for its all-gather."""

        def observe(topk_ids_TK: torch.Tensor) -> None:
            self._on_device(topk_ids_TK.device)
            ids = topk_ids_TK.reshape(-1).long()
            no_route = self.num_experts  # -1 routes go to a bucket past the experts
            counts_E1 = value_counts(torch.where(ids >= 0, ids, no_route), self.num_experts + 1)
            self._counts_LE[index] += counts_E1[: self.num_experts]
            room = self.config.sample_tokens - self._sampled_L[index] if self.config.regroup else 0
            if room > 0:  # shapes only: the first rows of the forward, as they are (-1 routes included)
                rows = topk_ids_TK[:room]
                start = self._sampled_L[index]
                self._sample_LTK[index, start : start + rows.shape[0]] = rows
                self._sampled_L[index] += rows.shape[0]

        return observe

    def _on_device(self, device: torch.device) -> None:
        """Keep the interval's counts and samples on `device` (moved there once, when the layers are)."""
        if self._counts_LE.device != device:
            self._counts_LE = self._counts_LE.to(device)
            self._sample_LTK = self._sample_LTK.to(device)

    @property
    def plan(self) -> GracePlan:
        """The plan live on this rank now."""
        return self._plan

    @property
    def migrating(self) -> bool:
        return self._pending is not None

    def window_loads(self) -> np.ndarray:
        """loads_LE summed over the window (identical on every rank)."""
        if not self._window:
            return np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        return np.sum(np.stack(self._window), axis=0)

    # ---- the boundary ----

    def step(self) -> None:
        """Count one forward pass; at every `interval`-th, run the boundary (collective)."""
        self._step += 1
        if self._step % self.config.interval == 0:
            self._boundary()

    def _boundary(self) -> None:
        begin = time.perf_counter()
        stall_s = self._in_flight.wait() if self._in_flight is not None else 0.0
        if self._pending is not None and self._in_flight is not None:
            self._pending["transfer_s"] += time.perf_counter() - self._in_flight.started_at
        self._in_flight = None
        fields_RF = gather_fields(self._local_fields(), groups=self.groups)
        ne = self.num_layers * self.num_experts
        counts_LE = fields_RF[:, :ne].sum(dim=0).reshape(self.num_layers, self.num_experts).numpy()
        routes_RL = fields_RF[:, ne : ne + self.num_layers].numpy()
        live_words = fields_RF[:, ne + self.num_layers : ne + self.num_layers + HASH_WORDS]
        pending_words = fields_RF[
            :, ne + self.num_layers + HASH_WORDS : ne + self.num_layers + 2 * HASH_WORDS
        ]
        raise_on_hash_mismatch(live_words, what=f"step {self._step}: live plan")
        self._window.append(counts_LE)
        if self.config.regroup:
            sample_RF = fields_RF[:, ne + self.num_layers + 2 * HASH_WORDS :]
            self._sample_window.append(sample_RF.numpy().reshape(-1, *self._sample_LTK.shape))
        record: dict[str, Any] = {
            "step": self._step,
            "balancedness": self._balancedness(counts_LE),
            "measured_balancedness": [
                float(col.mean() / col.max()) if col.max() > 0 else 1.0
                for col in routes_RL.T.astype(np.float64)
            ],
            "bytes_moved": 0,
            "switched": False,
        }
        if self._pending is not None and self._pending["cursor"] == self._pending["total_bytes"]:
            raise_on_hash_mismatch(pending_words, what=f"step {self._step}: switch")
            self._pending["stall_s"] += stall_s
            self._switch()
            record["switched"] = True
        elif self._pending is not None:
            self._pending["stall_s"] += stall_s
        if self._pending is None:
            self._maybe_replan()
        if self._pending is not None:
            record["bytes_moved"] = self._send_next()
        record["window_balancedness"] = self._balancedness(self.window_loads())
        record["plan_hash"] = self._plan.content_hash
        record["boundary_s"] = time.perf_counter() - begin
        self._intervals.append(record)

    def _local_fields(self) -> torch.Tensor:
        counts = self._counts_LE.reshape(-1).to("cpu", copy=True)  # the interval's one read
        self._counts_LE.zero_()
        routes = []
        for index, layer in enumerate(self.layers):
            total = sum(layer.comm_counters.expert_rows)
            seen = self._routes_seen[index]
            routes.append(total - seen if total >= seen else total)  # counters may have been reset
            self._routes_seen[index] = total
        pending = self._pending["plan"].content_hash if self._pending is not None else None
        sample = self._sample_LTK.reshape(-1).to("cpu", copy=True)
        self._sample_LTK.fill_(-1)
        self._sampled_L = [0] * self.num_layers
        return torch.cat(
            [
                counts,
                torch.tensor(routes, dtype=torch.int64),
                hash_words(self._plan.content_hash),
                hash_words(pending) if pending is not None else torch.zeros(HASH_WORDS, dtype=torch.int64),
                sample,
            ]
        )

    def _balancedness(self, loads_LE: np.ndarray) -> list[float]:
        return [
            predicted_balancedness(loads_LE[i], layer, self.topology, self.policy)
            for i, layer in enumerate(self._plan.layers)
        ]

    # ---- re-planning ----

    def window_routing(self) -> RoutingTrace:
        """The routing every rank sampled in the window (regroup), identical on every rank: per layer,
        the sampled tokens of every interval and rank whose routes were all taken."""
        rows = [[] for _ in range(self.num_layers)]
        for sample_RLTK in self._sample_window:
            for index in range(self.num_layers):
                ids_TK = sample_RLTK[:, index].reshape(-1, self.top_k)
                rows[index].append(ids_TK[(ids_TK >= 0).all(axis=1)])
        return RoutingTrace(
            topk_ids=tuple(np.concatenate(r) if r else np.zeros((0, self.top_k), np.int64) for r in rows),
            num_experts=self.num_experts,
        )

    def tokens_per_forward(self) -> int:
        """Tokens of all ranks per forward in the window, on the average (the scale at which the
        re-grouping scores balance: a forward waits for its busiest GPU)."""
        routes = sum(float(counts_LE[0].sum()) for counts_LE in self._window)
        forwards = len(self._window) * self.config.interval
        return max(1, round(routes / max(1, self.top_k) / max(1, forwards)))

    def _regroup(self, plan: GracePlan, loads_LE: np.ndarray) -> ReplanResult:
        window = self.window_routing()
        if any(len(ids) == 0 for ids in window.topk_ids):
            before = tuple(self._balancedness(loads_LE))
            return ReplanResult(None, (), before, before)
        grace = GraceConfig(
            grouping=GroupingConfig(max_experts_per_gpu=self.max_experts_per_gpu),
            replication=self.replication,
            routing=RoutingConfig(policy=self.policy),
        )
        result = regroup(
            plan,
            window,
            config=grace,
            expert_nbytes=max(self._expert_nbytes()),
            max_bytes=self.config.max_bytes_per_interval,
            batch_tokens=self.tokens_per_forward(),
        )
        before = tuple(self._balancedness(loads_LE))
        if result.plan is None:
            return ReplanResult(None, (), before, before)
        after = tuple(
            predicted_balancedness(loads_LE[i], layer, self.topology, self.policy)
            for i, layer in enumerate(result.plan.layers)
        )
        return ReplanResult(result.plan, tuple(sorted(m.layer for m in result.moves)), before, after)

    def _default_replanner(self, plan: GracePlan, loads_LE: np.ndarray) -> ReplanResult:
        if self.config.regroup:
            return self._regroup(plan, loads_LE)
        return replan(
            plan,
            loads_LE,
            threshold=self.config.threshold,
            policy=self.policy,
            mode=self.replication.mode,
            max_experts_per_gpu=self.max_experts_per_gpu,
        )

    def _maybe_replan(self) -> None:
        result = self.replanner(self._plan, self.window_loads())
        # every rank's decision is compared, "no re-plan" included, so that no rank re-plans alone
        decided = result.plan.content_hash if result.plan is not None else NO_PLAN_HASH
        check_same_hash(decided, groups=self.groups, what=f"step {self._step}: re-plan")
        if result.plan is None:
            return
        if self.config.max_bytes_per_interval == 0:
            self._blocked_replans += 1
            return
        copies = plan_copies(self._plan, result.plan, expert_nbytes=self._expert_nbytes())
        staging = {c.key: torch.empty(c.nbytes, dtype=torch.uint8) for c in copies if c.dst == self.ep_index}
        self._pending = {
            "plan": result.plan,
            "result": result,
            "copies": copies,
            "staging": staging,
            "cursor": 0,
            "total_bytes": sum(c.nbytes for c in copies),
            "decided_at_step": self._step,
            "intervals": 0,
            "cross_node_bytes": 0,
            "disk_bytes_read": 0,  # by this rank, from the checkpoint files
            "disk_images": {},
            "transfer_s": 0.0,
            "stall_s": 0.0,
        }

    def _expert_nbytes(self) -> list[int]:
        sizes = []
        for index, layer in enumerate(self.layers):
            modules = list(layer.deepspeed_moe.experts.deepspeed_experts)
            if not modules:
                raise ValueError(
                    f"layer {index} has no expert slot on EP rank {self.ep_index} to size replicas by"
                )
            sizes.append(int(module_bytes(modules[0]).numel()))
        return sizes

    # ---- migration ----

    def _send_next(self) -> int:
        pending = self._pending
        assert pending is not None
        chunks, pending["cursor"] = next_chunks(
            pending["copies"], cursor=pending["cursor"], budget=self.config.max_bytes_per_interval
        )
        pending["intervals"] += 1
        if self.config.source == "disk":
            self._read_from_disk(chunks)
            return sum(c.nbytes for c in chunks)
        sources = {c.key: module_bytes(self._live_module(*c.key)) for c in chunks if c.src == self.ep_index}
        self._in_flight = start_transfers(
            chunks, source_bytes=sources, staging_bytes=pending["staging"], groups=self.groups
        )
        moved = sum(c.nbytes for c in chunks)
        pending["cross_node_bytes"] += cross_node_bytes(chunks, self.topology)
        return moved

    def _read_from_disk(self, chunks: Sequence[Chunk]) -> None:
        """Fill this rank's staging bytes of `chunks` from the checkpoint files (no transfer)."""
        pending = self._pending
        assert pending is not None and self.checkpoint is not None
        begin, read_before = time.perf_counter(), self.checkpoint.bytes_read
        images: dict[tuple[int, int], torch.Tensor] = pending["disk_images"]
        for chunk in chunks:
            if chunk.dst != self.ep_index:
                continue
            if chunk.key not in images:
                layer_index, expert = chunk.key
                like = self.layers[layer_index].deepspeed_moe.experts.deepspeed_experts[0]
                images[chunk.key] = module_bytes(self.checkpoint.read_expert(layer_index, expert, like=like))
            image = images[chunk.key]
            pending["staging"][chunk.key][chunk.start : chunk.stop].copy_(image[chunk.start : chunk.stop])
            if chunk.stop == image.numel():
                del images[chunk.key]
        pending["disk_bytes_read"] += self.checkpoint.bytes_read - read_before
        pending["transfer_s"] += time.perf_counter() - begin

    def _live_module(self, layer_index: int, expert: int) -> nn.Module:
        layer = self.layers[layer_index]
        slots = layer.layer_plan.slots[self.ep_index]
        return layer.deepspeed_moe.experts.deepspeed_experts[slots.index(expert)]

    def _switch(self) -> None:
        pending = self._pending
        assert pending is not None
        begin = time.perf_counter()
        target: GracePlan = pending["plan"]
        result: ReplanResult = pending["result"]
        freed = freed_replicas(self._plan, target)
        for index in result.layers:
            layer = self.layers[index]
            live_slots = layer.layer_plan.slots[self.ep_index]
            live_modules = list(layer.deepspeed_moe.experts.deepspeed_experts)
            template = live_modules[0]
            modules = []
            for e in target.layers[index].slots[self.ep_index]:
                if e in live_slots:
                    modules.append(live_modules[live_slots.index(e)])
                else:
                    modules.append(module_from_bytes(template, pending["staging"].pop((index, e))))
            layer.swap_layer_plan(target.layers[index], modules)
        primaries_moved = sum(
            a != b
            for i in result.layers
            for a, b in zip(self._plan.layers[i].primary, target.layers[i].primary)
        )
        self._plan = target
        copies: list[ReplicaCopy] = pending["copies"]
        self._migrations.append(
            {
                "decided_at_step": pending["decided_at_step"],
                "switched_at_step": self._step,
                "layers": list(result.layers),
                "replicas_added": len(copies),
                "primaries_moved": primaries_moved,
                "replicas_freed": len(freed),
                "bytes_moved": pending["total_bytes"],
                "source": self.config.source,
                "bytes_from_peers": pending["total_bytes"] if self.config.source == "peer" else 0,
                "bytes_read_from_disk": pending["total_bytes"] if self.config.source == "disk" else 0,
                "rank_bytes_read_from_disk": pending["disk_bytes_read"],
                "cross_node_bytes": pending["cross_node_bytes"],
                "transfer_intervals": pending["intervals"],
                "transfer_s": pending["transfer_s"],
                "stall_s": pending["stall_s"] + time.perf_counter() - begin,
                "balancedness_before": [result.balancedness_before[i] for i in result.layers],
                "balancedness_predicted": [result.balancedness_after[i] for i in result.layers],
                "plan_hash": target.content_hash,
            }
        )
        migration = self._migrations[-1]
        moved = ", ".join(f"layer {c.layer} expert {c.expert} rank {c.src} -> {c.dst}" for c in copies[:8])
        logger.info(
            "online re-plan at step %d (decided at %d): %d expert copies (%s%s), %d primaries moved, %d replicas "
            "freed, %s moved (%s across nodes) from %s",
            self._step, migration["decided_at_step"], len(copies), moved, ", ..." if len(copies) > 8 else "",
            primaries_moved, len(freed), format_bytes(migration["bytes_moved"]),
            format_bytes(migration["cross_node_bytes"]),
            self.config.source,
        )  # fmt: skip
        self._pending = None

    # ---- reporting ----

    def metrics(self) -> dict[str, Any]:
        """Plain data: per-interval balancedness and bytes, every migration's cost, totals."""
        return {
            "step": self._step,
            "interval": self.config.interval,
            "threshold": self.config.threshold,
            "plan_hash": self._plan.content_hash,
            "migrating": self.migrating,
            "replans": len(self._migrations) + int(self.migrating),
            "blocked_replans": self._blocked_replans,
            "bytes_moved_total": sum(r["bytes_moved"] for r in self._intervals),
            "intervals": [dict(r) for r in self._intervals],
            "migrations": [dict(m) for m in self._migrations],
        }

    def close(self) -> None:
        """Finish transfers in flight and detach the load monitor from the layers."""
        if self._in_flight is not None:
            self._in_flight.wait()
            self._in_flight = None
        for layer in self.layers:
            layer.set_route_observer(None)
