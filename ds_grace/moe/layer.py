"""GraceMoE: a drop-in deepspeed.moe.layer.MoE that serves one layer of a GracePlan.

Shape legend: T tokens, D hidden, K top-k, E experts, Q routes computed on this rank.

What DeepSpeed relies on stays in place: ``isinstance(m, MoE)``, the attributes ``deepspeed_moe``
(a MOELayer subclass), ``deepspeed_moe.gate`` (a TopKGate subclass with ``wg``),
``deepspeed_moe.experts.deepspeed_experts``, ``expert_group_name``, ``num_experts``,
``num_local_experts`` (this rank's slot count; ranks may differ), expert parameters tagged
``allreduce=False`` / ``group_name``, and ``forward`` returning ``(output, l_aux, exp_counts)``.

What changes: the gate never drops or pads (any token count, including zero); each route picks an
instance of its expert by the plan (TAR / WRR / primary, ds_grace.routing); tokens travel by the
sparse flat or hierarchical all-to-all (ds_grace.comm.all_to_all); each slot's expert runs once on
exactly its rows. For inference: the all-to-alls carry no gradient.
"""

from __future__ import annotations

import collections
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer, TopKGate
from torch import nn
from torch.nn import functional as F

from ds_grace.comm.all_to_all import DispatchExecutor, RowLayout, redistribute_expert_tensors
from ds_grace.comm.counters import TrafficCounters
from ds_grace.comm.groups import GraceGroups, create_grace_groups
from ds_grace.comm.path_model import PATH_MODES, PathModel, PathPolicy, calibrated_model
from ds_grace.comm.transport import Transport
from ds_grace.config import GraceConfig
from ds_grace.moe.experts import GraceExperts, copy_slot_modules
from ds_grace.moe.gate import GraceGate
from ds_grace.planning.plan import LayerPlan, RoutingPolicy
from ds_grace.routing import (
    RouteTable,
    check_topk_ids_async,
    choose_codes,
    id_range_error,
    screen_topk_ids,
    slot_stride,
)
from ds_grace.topology import Topology

_POLICIES = ("tar", "wrr", "primary")


@dataclass(frozen=True)
class RuntimeOptions:
    """The runtime part of the grace config (routing policy, communication path, timeout)."""

    policy: RoutingPolicy = "tar"
    # "flat", "hierarchical", or "auto": flat or hierarchical per forward by the start-up calibrated model
    path: str = "hierarchical"
    dedup: bool = True
    timeout_s: float = 300.0
    # low-latency buffer bound (tokens per rank); 0: off. A forward takes the low-latency path when
    # its caller promises every rank at most that many tokens (GraceMOELayer.forward_routed)
    low_latency_max_tokens: int = 0
    # instance choice on low-latency forwards (None: `policy`)
    low_latency_policy: RoutingPolicy | None = None

    def __post_init__(self) -> None:
        if self.policy not in _POLICIES:
            raise ValueError(f"grace.routing.policy ({self.policy!r}) must be one of {', '.join(_POLICIES)}")
        if self.low_latency_policy is not None and self.low_latency_policy not in _POLICIES:
            raise ValueError(
                f"grace.routing.low_latency_policy ({self.low_latency_policy!r}) must be null or one of "
                f"{', '.join(_POLICIES)}"
            )
        if self.path not in PATH_MODES:
            raise ValueError(
                f"grace.communication.path ({self.path!r}) must be one of {', '.join(PATH_MODES)}"
            )
        if self.path != "flat" and not self.dedup:
            raise ValueError(
                f"grace.communication.dedup (false) must be true when grace.communication.path is {self.path}"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"grace.communication.timeout_s ({self.timeout_s}) must be > 0")
        if self.low_latency_max_tokens < 0:
            raise ValueError(
                f"grace.communication.low_latency_max_tokens ({self.low_latency_max_tokens}) must be >= 0"
            )
        if not self.dedup and self.low_latency_max_tokens:
            raise ValueError(
                f"grace.communication.low_latency_max_tokens ({self.low_latency_max_tokens}) must be 0 when "
                "grace.communication.dedup is false"
            )

    @classmethod
    def from_config(cls, config: GraceConfig) -> RuntimeOptions:
        comm = config.communication
        return cls(
            policy=config.routing.policy,
            path=comm.path,
            dedup=comm.dedup,
            timeout_s=comm.timeout_s,
            low_latency_max_tokens=comm.low_latency_max_tokens if comm.dedup else 0,
            low_latency_policy=config.routing.low_latency_policy,
        )


class GraceMOELayer(MOELayer):
    """DeepSpeed's MOELayer with GRACE routing and sparse dispatch/combine.

    Like DeepSpeed's, ``forward`` leaves the gate's ``l_aux`` and ``exp_counts`` on the module
    (MoE.forward returns them); all dispatch state lives in the frozen DispatchMeta of one call.
    """

    def __init__(
        self,
        gate: GraceGate,
        experts: GraceExperts,
        *,
        layer_plan: LayerPlan,
        topology: Topology,
        ep_index: int,
        expert_group_name: str,
        options: RuntimeOptions,
    ) -> None:
        super().__init__(gate, experts, expert_group_name, topology.world_size, experts.num_local_experts)
        self.layer_plan = layer_plan
        self.topology = topology
        self.ep_index = ep_index
        self.options = options
        self.comm_counters = TrafficCounters()
        self.grace_groups: GraceGroups | None = None
        self._tables = self._cpu_tables(layer_plan)
        self.route_observer: Callable[[torch.Tensor], None] | None = None
        self.path_policy = PathPolicy(options.path, topology=topology, model=self._path_model)
        self.transport: Transport | None = None  # None: the sparse all-to-all of torch.distributed
        self._executor: DispatchExecutor | None = None
        # forwards of DeepSpeed's forward() (a decode loop sets it): every rank holds at most this many
        # tokens, so the low-latency path runs (set_low_latency_tokens); None: the normal paths
        self.low_latency_tokens: int | None = None
        self.last_path: str | None = None  # "low-latency", "flat" or "hierarchical": the last forward's
        self.path_counts: collections.Counter[str] = collections.Counter()  # forwards per path, for the log

    @property
    def last_path_costs_s(self) -> tuple[float, float] | None:
        """The corrected (flat, hierarchical) seconds the last adaptive choice was made on."""
        return self.path_policy.last_corrected_s

    def _path_model(self) -> PathModel:
        return calibrated_model(self.groups())  # collective on first use, cached per EP group

    def swap_layer_plan(self, layer_plan: LayerPlan, experts: GraceExperts) -> None:
        """Serve `layer_plan` with `experts` (this rank's slots under it) from the next forward on.

        Every rank must swap between the same two forwards (ds_grace.online decides when).
        """
        self.experts = experts
        self.num_local_experts = experts.num_local_experts
        self.layer_plan = layer_plan
        self._tables = self._cpu_tables(layer_plan)
        self._executor = None

    def set_grace_groups(self, groups: GraceGroups) -> None:
        if groups.topology != self.topology or groups.ep_index != self.ep_index:
            raise ValueError(
                f"groups (topology {groups.topology}, ep_index {groups.ep_index}) do not match this layer "
                f"(topology {self.topology}, ep_index {self.ep_index})"
            )
        self.grace_groups = groups
        self._executor = None

    def set_transport(self, transport: Transport | None) -> None:
        """Carry the rounds by `transport` (None: torch.distributed's sparse all-to-all)."""
        self.transport = transport
        self._executor = None

    def _set_ep_group(self, ep_group: Any) -> None:
        # DeepSpeed's own wiring hook: kept for its bookkeeping; GRACE traffic uses grace_groups.
        self.ep_group = ep_group

    def groups(self) -> GraceGroups:
        """This layer's groups; created (collectively, cached) on first use if none were set."""
        groups = self.grace_groups
        if groups is None:
            groups = _create_groups(self.topology, timeout_s=self.options.timeout_s)
            self.set_grace_groups(groups)
        return groups

    def executor(self) -> DispatchExecutor:
        """The dispatch executor of the current plan and groups (created on first use)."""
        if self._executor is None:
            self._executor = DispatchExecutor(
                groups=self.groups(), slot_stride=slot_stride(self.layer_plan),
                num_local_slots=self.num_local_experts, counters=self.comm_counters, transport=self.transport,
            )  # fmt: skip
        return self._executor

    def _cpu_tables(self, layer_plan: LayerPlan) -> dict[tuple[torch.device, str], RouteTable]:
        cpu = torch.device("cpu")
        policies = {self.options.policy, self.options.low_latency_policy or self.options.policy}
        return {(cpu, policy): RouteTable.build(layer_plan, self.topology, policy) for policy in policies}

    def route_table(self, device: torch.device, *, low_latency: bool = False) -> RouteTable:
        """The instance-choice table on `device`: the routing policy's, or (low_latency) the one for
        low-latency forwards."""
        policy = (self.options.low_latency_policy if low_latency else None) or self.options.policy
        if (device, policy) not in self._tables:
            self._tables[(device, policy)] = self._tables[(torch.device("cpu"), policy)].to(device)
        return self._tables[(device, policy)]

    def forward(self, *input: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden_states = input[0]
        used_token = input[1] if len(input) > 1 else None
        x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
        routing = self.gate(x_TD, used_token)
        self.l_aux, self.exp_counts = routing.l_aux, routing.exp_counts_E
        y_TD = self.forward_routed(x_TD, routing.topk_ids_TK, routing.topk_weights_TK)
        return y_TD.reshape(hidden_states.shape)

    def forward_routed(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        *,
        route_offset: int = 0,
        low_latency_tokens: int | None = None,
    ) -> torch.Tensor:
        """y_TD = sum_k topk_weights_TK[:, k] * expert[topk_ids_TK[:, k]](x_TD), over the plan's instances.

        Ids of -1 mark routes not taken. Collective: every rank of the EP group must call it
        (with its own tokens, possibly none). route_offset shifts the instance-choice sequence.

        low_latency_tokens (default: the layer's ``low_latency_tokens``) is the caller's promise that
        no rank of the EP group holds more tokens this forward: then the low-latency path runs
        (static buffers of that many rows per peer, no host read), and every rank must pass the same
        value. It must be in [1, grace.communication.low_latency_max_tokens]; a rank holding more
        tokens raises before any collective. None: the normal paths (one header round).
        """
        rows_per_peer = self.low_latency_tokens if low_latency_tokens is None else low_latency_tokens
        self._check_inputs(x_TD, topk_ids_TK, topk_weights_TK, rows_per_peer=rows_per_peer)
        ids_TK = topk_ids_TK.to(x_TD.device)
        if rows_per_peer is None:  # the ids' range travels in the header round: every rank checks it there
            ids_TK, id_range_2 = screen_topk_ids(ids_TK, self.layer_plan.num_experts, name="topk_ids_TK")
        elif self.route_observer is not None:
            self.route_observer(topk_ids_TK)
        table = self.route_table(x_TD.device, low_latency=rows_per_peer is not None)
        code_TK = choose_codes(table, ids_TK, origin_rank=self.ep_index, route_offset=route_offset)
        layout = RowLayout(k=int(code_TK.shape[1]), hidden=int(x_TD.shape[1]), dtype=x_TD.dtype)
        rows_TW = layout.pack(x_TD, code_TK, topk_weights_TK.to(x_TD.device, torch.float32))
        executor = self.executor()
        if rows_per_peer is None:
            return self._forward_normal(executor, rows_TW, code_TK, id_range_2, topk_ids_TK, layout=layout)
        x_VD, meta = executor.dispatch_low_latency(rows_TW, rows_per_peer=rows_per_peer, layout=layout)
        self.last_path = "low-latency"
        self.path_counts[self.last_path] += 1
        assert meta.slot_VK is not None and meta.weight_VK is not None  # a low-latency meta
        return executor.combine_low_latency(
            self.experts.forward_routes(x_VD, meta.slot_VK, meta.weight_VK), meta
        )

    def _forward_normal(
        self,
        executor: DispatchExecutor,
        rows_TW: torch.Tensor,
        code_TK: torch.Tensor,
        id_range_2: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        *,
        layout: RowLayout,
    ) -> torch.Tensor:
        """The header round (every rank's ids checked from it), the path chosen from it, dispatch, the
        experts (once each), combine; the route observer sees the ids once they are known valid."""
        policy = self.path_policy
        start = time.perf_counter()
        first_stages = ()
        if not self.options.dedup:
            rows_TW, code_TK, split = executor.split_routes(rows_TW, layout=layout)
            first_stages = (split,)
        columns = (
            (lambda member_TR: policy.header_columns(member_TR, self.ep_index)) if policy.adaptive else None
        )
        header = executor.exchange_header(code_TK, id_range_2, columns, hierarchical=policy.mode != "flat")
        error = id_range_error(header.id_ranges(), self.layer_plan.num_experts, name="topk_ids_TK")
        if error is not None:  # every rank read the same ranges: all raise here, none waits
            raise error
        path = policy.decide(
            header.extra(),
            dispatch_row_bytes=layout.width,
            combine_row_bytes=layout.hidden * layout.dtype.itemsize,
        )
        x_QD, meta = executor.dispatch(
            rows_TW, path=path, header=header, layout=layout, first_stages=first_stages
        )
        experts_start = time.perf_counter()
        expert_out_QD = self.experts(x_QD, meta.slot_splits, slot_Q=meta.route_slot_Q)
        experts_s = time.perf_counter() - experts_start
        y_TD = executor.combine(expert_out_QD, meta)
        self.last_path = path
        self.path_counts[path] += 1
        policy.observe(path, measured_s=time.perf_counter() - start - experts_s)
        if self.route_observer is not None:
            self.route_observer(topk_ids_TK)
        return y_TD

    def _check_inputs(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        *,
        rows_per_peer: int | None,
    ) -> None:
        """Every check before the first collective: shapes and the low-latency promise (with the ids
        on that path; on the normal paths the header round carries their range, ``screen_topk_ids``)."""
        if x_TD.dim() != 2:
            raise ValueError(f"x_TD (shape {tuple(x_TD.shape)}) must be 2-D [tokens, hidden]")
        if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"topk_ids_TK (shape {tuple(topk_ids_TK.shape)}) must be [tokens={x_TD.shape[0]}, k]"
            )
        if topk_weights_TK.shape != topk_ids_TK.shape:
            raise ValueError(
                f"topk_weights_TK (shape {tuple(topk_weights_TK.shape)}) must match topk_ids_TK "
                f"({tuple(topk_ids_TK.shape)})"
            )
        if rows_per_peer is None:
            return
        bound = self.options.low_latency_max_tokens
        if not 1 <= rows_per_peer <= bound:
            raise ValueError(
                f"low_latency_tokens ({rows_per_peer}) must be in [1, grace.communication.low_latency_max_tokens="
                f"{bound}] (0 turns the low-latency path off)"
            )
        if x_TD.shape[0] > rows_per_peer:
            raise ValueError(
                f"this rank holds {x_TD.shape[0]} tokens but the forward was promised low_latency_tokens="
                f"{rows_per_peer} per rank: call it without the promise (normal path) or with a larger bound"
            )
        check_topk_ids_async(topk_ids_TK, self.layer_plan.num_experts, name="topk_ids_TK")


class GraceMoE(MoE):
    """One MoE layer served by GRACE on this rank (EP index ``ep_index``) of `topology`."""

    def __init__(
        self,
        *,
        gate: GraceGate,
        slot_modules: Sequence[nn.Module],
        layer_plan: LayerPlan,
        topology: Topology,
        ep_index: int,
        options: RuntimeOptions | None = None,
        residual: tuple[nn.Module, nn.Linear] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        _check_plan(layer_plan, topology, num_experts=gate.num_experts)
        if not 0 <= ep_index < topology.world_size:
            raise ValueError(f"ep_index ({ep_index}) must be in [0, {topology.world_size})")
        slots = layer_plan.slots[ep_index]
        if len(slot_modules) != len(slots):
            raise ValueError(
                f"slot_modules has {len(slot_modules)} modules but the plan gives EP rank {ep_index} "
                f"{len(slots)} slots ({list(slots)})"
            )
        options = options if options is not None else RuntimeOptions()
        self.use_residual = residual is not None
        self.enable_expert_tensor_parallelism = False
        self.ep_size = topology.world_size
        self.expert_group_name = f"ep_size_{self.ep_size}"
        self.num_experts = layer_plan.num_experts
        self.num_local_experts = len(slots)
        experts = GraceExperts(slot_modules, slot2expert=slots, expert_group_name=self.expert_group_name)
        self.deepspeed_moe = GraceMOELayer(
            gate,
            experts,
            layer_plan=layer_plan,
            topology=topology,
            ep_index=ep_index,
            expert_group_name=self.expert_group_name,
            options=options,
        )
        if residual is not None:
            self.mlp, self.coefficient = residual

    @classmethod
    def from_experts(
        cls,
        experts: Sequence[nn.Module],
        *,
        hidden_size: int,
        k: int,
        layer_plan: LayerPlan,
        topology: Topology,
        ep_index: int | None = None,
        gate_weight: torch.Tensor | None = None,
        options: RuntimeOptions | None = None,
    ) -> GraceMoE:
        """From the full list of E logical experts (every rank passes the same list).

        Each slot of this rank gets its own deep copy of its expert. gate_weight ([E, hidden],
        optional) initialises the gate; forward_routed does not use the gate.
        """
        if len(experts) != layer_plan.num_experts:
            raise ValueError(
                f"experts has {len(experts)} modules but the plan has {layer_plan.num_experts} experts"
            )
        ep_index = resolve_ep_index(ep_index, topology)
        gate = GraceGate(hidden_size, layer_plan.num_experts, k)
        if gate_weight is not None:
            if tuple(gate_weight.shape) != (layer_plan.num_experts, hidden_size):
                raise ValueError(
                    f"gate_weight (shape {tuple(gate_weight.shape)}) must be [num_experts={layer_plan.num_experts}, "
                    f"hidden_size={hidden_size}]"
                )
            gate.wg.to(device=gate_weight.device, dtype=gate_weight.dtype)
            with torch.no_grad():
                gate.wg.weight.copy_(gate_weight)
        _check_plan(layer_plan, topology, num_experts=len(experts))
        slot_modules = copy_slot_modules(experts, layer_plan.slots[ep_index])
        return cls(
            gate=gate,
            slot_modules=slot_modules,
            layer_plan=layer_plan,
            topology=topology,
            ep_index=ep_index,
            options=options,
        )

    @classmethod
    def from_deepspeed(
        cls,
        moe: MoE,
        *,
        layer_plan: LayerPlan,
        topology: Topology,
        ep_index: int | None = None,
        options: RuntimeOptions | None = None,
        ep_rank_lists: Sequence[Sequence[int]] | None = None,
    ) -> GraceMoE:
        """From a DeepSpeed MoE layer: same gate weights and k, same expert weights.

        With moe.ep_size == 1 every rank holds all experts and copies its slots locally. With
        moe.ep_size == topology.world_size (experts spread contiguously, DeepSpeed's placement)
        the expert weights move to the ranks that need them in one all-to-all: then this is
        collective and creates the GRACE groups.
        """
        source_gate = moe.deepspeed_moe.gate
        if not isinstance(source_gate, TopKGate):
            raise ValueError(f"moe.deepspeed_moe.gate ({type(source_gate).__name__}) must be a TopKGate")
        if moe.enable_expert_tensor_parallelism:
            raise ValueError("moe.enable_expert_tensor_parallelism (True) is not supported by GraceMoE")
        _check_plan(layer_plan, topology, num_experts=moe.num_experts)
        options = options if options is not None else RuntimeOptions()
        ep_index = resolve_ep_index(ep_index, topology)
        local = list(moe.deepspeed_moe.experts.deepspeed_experts)
        slots = layer_plan.slots[ep_index]
        groups = None
        if moe.ep_size == 1:
            slot_modules = copy_slot_modules(local, slots)
        elif moe.ep_size == topology.world_size:
            groups = _create_groups(topology, timeout_s=options.timeout_s, ep_rank_lists=ep_rank_lists)
            if groups.ep_index != ep_index:
                raise ValueError(
                    f"ep_index ({ep_index}) differs from this rank's EP index ({groups.ep_index})"
                )
            slot_modules = _fetch_slot_modules(local, layer_plan=layer_plan, groups=groups)
        else:
            raise ValueError(
                f"moe.ep_size ({moe.ep_size}) must be 1 or the topology's world size ({topology.world_size})"
            )
        residual = None
        if moe.use_residual:
            residual = (copy.deepcopy(moe.mlp), copy.deepcopy(moe.coefficient))
        layer = cls(
            gate=GraceGate.from_deepspeed(source_gate),
            slot_modules=slot_modules,
            layer_plan=layer_plan,
            topology=topology,
            ep_index=ep_index,
            options=options,
            residual=residual,
        )
        if groups is not None:
            layer.set_grace_groups(groups)
        return layer

    @property
    def comm_counters(self) -> TrafficCounters:
        return self.deepspeed_moe.comm_counters

    @property
    def path_counts(self) -> collections.Counter[str]:
        """Forwards by all-to-all path ("low-latency", "flat", "hierarchical") since the layer was built."""
        return self.deepspeed_moe.path_counts

    @property
    def layer_plan(self) -> LayerPlan:
        return self.deepspeed_moe.layer_plan

    def set_grace_groups(self, groups: GraceGroups) -> None:
        self.deepspeed_moe.set_grace_groups(groups)

    def set_low_latency_tokens(self, tokens: int | None) -> None:
        """Promise that every rank holds at most `tokens` tokens on the following forwards (a decode
        loop's batch bound): they take the low-latency path. None: back to the normal paths."""
        if tokens is not None and not 1 <= tokens <= self.deepspeed_moe.options.low_latency_max_tokens:
            raise ValueError(
                f"low_latency_tokens ({tokens}) must be in [1, grace.communication.low_latency_max_tokens="
                f"{self.deepspeed_moe.options.low_latency_max_tokens}]"
            )
        self.deepspeed_moe.low_latency_tokens = tokens

    def set_route_observer(self, observer: Callable[[torch.Tensor], None] | None) -> None:
        """Call observer(topk_ids_TK) on every forward's routing (the online load monitor's hook)."""
        self.deepspeed_moe.route_observer = observer

    def swap_layer_plan(self, layer_plan: LayerPlan, slot_modules: Sequence[nn.Module]) -> None:
        """Switch to `layer_plan` with `slot_modules` (one per slot of this rank under it), between
        forwards; modules no longer referenced are freed. Primaries may move (online re-grouping): the
        routing tables are rebuilt from `layer_plan`."""
        layer = self.deepspeed_moe
        _check_plan(layer_plan, layer.topology, num_experts=self.num_experts)
        slots = layer_plan.slots[layer.ep_index]
        if len(slot_modules) != len(slots):
            raise ValueError(
                f"slot_modules has {len(slot_modules)} modules but the plan gives EP rank {layer.ep_index} "
                f"{len(slots)} slots ({list(slots)})"
            )
        experts = GraceExperts(slot_modules, slot2expert=slots, expert_group_name=self.expert_group_name)
        layer.swap_layer_plan(layer_plan, experts)
        self.num_local_experts = len(slots)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's wiring entry point: creates (collectively) and sets the GRACE groups."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_ (True) is not supported by GraceMoE")
        layer = self.deepspeed_moe
        layer.set_grace_groups(_create_groups(layer.topology, timeout_s=layer.options.timeout_s))

    def forward_routed(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        *,
        route_offset: int = 0,
        low_latency_tokens: int | None = None,
    ) -> torch.Tensor:
        """The layer's output for an already computed routing (see GraceMOELayer.forward_routed)."""
        y_TD = self.deepspeed_moe.forward_routed(
            x_TD,
            topk_ids_TK,
            topk_weights_TK,
            route_offset=route_offset,
            low_latency_tokens=low_latency_tokens,
        )
        if self.use_residual:
            y_TD = self._mix_residual(x_TD, y_TD)
        return y_TD

    def _mix_residual(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        mlp_out = self.mlp(x_TD)
        if isinstance(mlp_out, tuple):
            mlp_out = mlp_out[0]
        coef = F.softmax(self.coefficient(x_TD), dim=-1)
        return y_TD * coef[..., 0:1] + mlp_out * coef[..., 1:]


def resolve_ep_index(ep_index: int | None, topology: Topology) -> int:
    """This process's expert-parallel index: given, or from torch.distributed.

    Without an explicit index the EP groups are taken to be DeepSpeed's default: consecutive
    blocks of topology.world_size global ranks, so the index is rank % world_size.
    """
    if ep_index is not None:
        if not 0 <= ep_index < topology.world_size:
            raise ValueError(f"ep_index ({ep_index}) must be in [0, {topology.world_size})")
        return int(ep_index)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world % topology.world_size != 0:
            raise ValueError(
                f"ep_index is required: the world size ({world}) is not a multiple of the topology's "
                f"({topology}) {topology.world_size} ranks"
            )
        return dist.get_rank() % topology.world_size
    if topology.world_size == 1:
        return 0
    raise ValueError(f"ep_index is required when torch.distributed is not initialised (topology {topology})")


def _create_groups(
    topology: Topology, *, timeout_s: float, ep_rank_lists: Sequence[Sequence[int]] | None = None
) -> GraceGroups:
    """GRACE groups for `topology` (collective) over `ep_rank_lists`, by default DeepSpeed's EP groups."""
    if ep_rank_lists is None:
        ep_rank_lists = _ds_ep_rank_lists(topology)
    return create_grace_groups(topology, timeout_s=timeout_s, ep_rank_lists=ep_rank_lists)


def _ds_ep_rank_lists(topology: Topology) -> list[list[int]] | None:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world, ep = dist.get_world_size(), topology.world_size
    if world % ep != 0:
        raise ValueError(
            f"the world size ({world}) must be a multiple of the topology's {ep} ranks ({topology})"
        )
    return [list(range(start, start + ep)) for start in range(0, world, ep)]


def _check_plan(layer_plan: LayerPlan, topology: Topology, *, num_experts: int) -> None:
    layer_plan.validate(where="layer_plan")
    if layer_plan.num_ranks != topology.world_size:
        raise ValueError(
            f"layer_plan places experts on {layer_plan.num_ranks} ranks but the topology ({topology}) has "
            f"{topology.world_size}"
        )
    if layer_plan.num_experts != num_experts:
        raise ValueError(f"layer_plan has {layer_plan.num_experts} experts but the layer has {num_experts}")


def _flat_state(module: nn.Module) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
    state = module.state_dict()
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:
        raise ValueError(
            f"expert tensors must share one dtype to be moved between ranks; found {sorted(map(str, dtypes))}"
        )
    shapes = [(name, t.shape) for name, t in state.items()]
    return torch.cat([t.reshape(-1) for t in state.values()]), shapes


def _fetch_slot_modules(
    local: list[nn.Module], *, layer_plan: LayerPlan, groups: GraceGroups
) -> list[nn.Module]:
    """Copy this rank's slot experts from DeepSpeed's contiguous placement (one all-to-all)."""
    num_local = len(local)
    me = groups.ep_index
    owned: dict[int, torch.Tensor] = {}
    shapes: list[tuple[str, torch.Size]] = []
    for i, module in enumerate(local):
        owned[me * num_local + i], shapes = _flat_state(module)
    sample = owned[me * num_local]
    received = redistribute_expert_tensors(
        owned,
        owner_of_expert=[e // num_local for e in range(layer_plan.num_experts)],
        needed_by_rank=layer_plan.slots,
        numel=sample.numel(),
        dtype=sample.dtype,
        device=sample.device,
        groups=groups,
    )
    slot_modules = []
    for e in layer_plan.slots[me]:
        module = copy.deepcopy(local[0])
        chunks = received[e].split([shape.numel() for _, shape in shapes])
        module.load_state_dict({name: chunk.view(shape) for (name, shape), chunk in zip(shapes, chunks)})
        slot_modules.append(module)
    return slot_modules
