"""``ds_grace.init_inference``: DeepSpeed inference whose MoE layers run GRACE-MoE (or vanilla DeepSpeed-MoE).

``init_inference(model, config=PATH_OR_DICT, **kwargs)`` mirrors ``deepspeed.init_inference`` and returns
DeepSpeed's InferenceEngine. Steps, in this order:

1. Local validation, before any collective (``ds_grace.preflight.preflight``, which `ds-grace check-config`
   runs too): the ds_config (DeepSpeed's part and the grace block), the topology against the world
   size, with grace enabled the plan (the file exists, or is built from grace.profile.trace, and fits the
   topology), the model (a supported family; a checkpoint folder must exist and name one) and the plan
   against the model's MoE layer count and expert count, and moe.ep_size.
2. torch.distributed is initialised if it is not yet: env:// under a launcher, else one local rank.
   Its first collective is the start-up handshake (``ds_grace.comm.collectives.check_ranks_agree``):
   every rank's fingerprint (``ds_grace.fingerprint``: settings, plan hash, topology, dtype, versions)
   must be the same, else every rank raises RankMismatchError naming the fields and each rank's value.
3. ``deepspeed.init_inference`` with the grace block split off.
4. MoE blocks are converted and their process groups wired:
   - grace enabled: every MoE layer becomes a GraceMoE holding this rank's expert instances of the plan.
     Transformers families keep their router in a RoutedMoEBlock and hand it the routing; models made of
     deepspeed.moe.layer.MoE get each layer replaced by ``GraceMoE.from_deepspeed``.
   - grace absent or ``enabled: false``: vanilla DeepSpeed-MoE. Models made of deepspeed.moe.layer.MoE go
     through ``ds_grace.vanilla.serve_vanilla``. Transformers families keep their router too, and hand
     the routing to a real DeepSpeed MoE layer (``ds_grace.vanilla_hf``): contiguous placement
     (rank r holds experts r*E/D ..), DeepSpeed's MOELayer with its capacity-padded dense all-to-all over
     the one flat expert-parallel group DeepSpeed's engine creates, and a gate that applies DeepSpeed's
     capacity rule to the model's own routing (lossless or capacity-dropping, per grace.vanilla). These
     blocks are converted before ``deepspeed.init_inference`` so that DeepSpeed sees MoE layers and creates
     the group, which is then wired into every layer.
5. A checkpoint folder (or, for deepspeed.moe.layer.MoE models, DeepSpeed's MoE checkpoint named by the
   ``checkpoint`` key) is served sharded: only headers are read in step 1 (and checked there); the model
   is a meta-device skeleton whose MoE blocks are converted before step 3, with only the dense tensors
   and this rank's expert slots read from the files (ds_grace.models.sharded_load,
   ds_grace.models.deepspeed_checkpoint), so DeepSpeed's engine moves only this rank's share.

The engine gets an attribute ``grace`` (a :class:`ServedMoE`): the mode, topology, plan, converted layers
and their counters. Heavy libraries (torch.distributed, deepspeed, transformers) are imported on use, so
``import ds_grace`` stays light.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ds_grace.cli import is_input_error
from ds_grace.comm.agreement import RankMismatchError
from ds_grace.comm.collectives import (
    check_ranks_agree,
    gather_objects_to_rank0,
    init_distributed,
    is_distributed,
    world,
)
from ds_grace.comm.counters import summed_traffic
from ds_grace.comm.rendezvous import join_startup
from ds_grace.comm.shared_memory import release_shared_memory_names
from ds_grace.config import GRACE_KEY, GraceConfig, GraceConfigError, load_ds_config, parse_grace_block
from ds_grace.fingerprint import launch_fingerprint, rank_identity, run_fingerprint
from ds_grace.log import format_bytes, rank_logger
from ds_grace.models.describe import ModelMoE, describe_moe

# re-exported: what a model holds is described in ds_grace.models.describe
from ds_grace.models.describe import MoEBlockInfo as MoEBlockInfo
from ds_grace.models.describe import check_checkpoint_folder as check_checkpoint_folder
from ds_grace.preflight import Checked, preflight, single_ep_size, world_from_env

# re-exported: the local checks moved to ds_grace.preflight (shared with `ds-grace check-config`)
from ds_grace.preflight import resolve_plan as resolve_plan
from ds_grace.preflight import validate_deepspeed_config as validate_deepspeed_config
from ds_grace.topology import Topology

# re-exported: callers import the vanilla transformers pieces from here too
from ds_grace.vanilla_hf import DeepSpeedRoutedExperts as DeepSpeedRoutedExperts
from ds_grace.vanilla_hf import RoutingGate as RoutingGate
from ds_grace.vanilla_hf import deepspeed_capacity_routes as deepspeed_capacity_routes

if TYPE_CHECKING:
    from ds_grace.comm.counters import TrafficCounters
    from ds_grace.models.deepspeed_checkpoint import DeepSpeedMoECheckpoint
    from ds_grace.models.sharded_load import LoadStats, ShardedCheckpoint
    from ds_grace.online import OnlineReplicator
    from ds_grace.planning.plan import GracePlan
    from ds_grace.vanilla import DroppedRouteCounter

ServingMode = Literal["grace", "vanilla"]


# ---- configuration ----


def split_config(
    config: str | os.PathLike[str] | Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], GraceConfig]:
    """(DeepSpeed part, GraceConfig) of `config` merged with keyword `overrides`, as deepspeed.init_inference
    merges them: a key given in both must have the same value. A "grace" override is the grace block."""
    ds_config, grace = load_ds_config({} if config is None else config)
    overrides = dict(overrides)
    if GRACE_KEY in overrides:
        if grace != GraceConfig(enabled=False):
            raise GraceConfigError(
                f'the grace block is given both in config and as the keyword argument "{GRACE_KEY}"'
            )
        grace = parse_grace_block(overrides.pop(GRACE_KEY))
    for key, value in overrides.items():
        if key in ds_config and ds_config[key] != value:
            raise GraceConfigError(
                f"{key} is given both in config ({ds_config[key]!r}) and as a keyword argument ({value!r})"
            )
        ds_config[key] = value
    return ds_config, grace


def _world() -> tuple[int, int]:
    """(world size, rank): torch.distributed's when initialised, else the launcher's environment, else (1, 0)."""
    return world() if is_distributed() else world_from_env()


# ---- what the engine exposes ----


@dataclass(frozen=True, eq=False)
class ServedMoE:
    """What init_inference set up; the engine holds it as ``engine.grace``.

    ``layers[i]`` serves MoE layer i: a GraceMoE (grace), or a deepspeed.moe.layer.MoE (vanilla).
    ``blocks`` are the RoutedMoEBlocks of a transformers model (empty for DeepSpeed MoE models).
    """

    mode: ServingMode
    family: str
    topology: Topology
    rank: int
    plan: GracePlan | None
    blocks: tuple[nn.Module, ...]
    layers: tuple[nn.Module, ...]
    dropped_routes: DroppedRouteCounter | None = None
    # grace.replication.online: steps after every forward of the engine; its .plan is the live plan
    online: OnlineReplicator | None = None
    # served from a checkpoint folder: this rank's bytes read and held (ds_grace.models.sharded_load)
    load: LoadStats | None = None

    @property
    def counters(self) -> tuple[TrafficCounters, ...]:
        """GRACE traffic counters per MoE layer (empty in vanilla mode)."""
        return tuple(layer.comm_counters for layer in self.layers if hasattr(layer, "comm_counters"))

    def traffic(self, *, total: bool = False) -> dict[str, Any]:
        """Snapshots of this rank's traffic counters, by MoE layer ("layer0", ...); with total=True, every
        layer's summed over all ranks (a collective: call it on every rank), see ``summed_traffic``."""
        snapshots = {f"layer{i}": counters.snapshot() for i, counters in enumerate(self.counters)}
        return summed_traffic(list(snapshots.values())) if total else snapshots

    def stats(self) -> dict[str, int]:
        """This rank's MoE totals since the last reset: traffic counters summed over layers (grace), or
        routes and dropped routes (vanilla)."""
        if self.mode == "grace":
            totals: dict[str, int] = {}
            for counters in self.counters:
                for name, value in counters.total().as_dict().items():
                    totals[name] = totals.get(name, 0) + value
            return totals
        stats = [s for layer in self.dropped_routes.stats for s in layer] if self.dropped_routes else []
        return {"routes": sum(s.routes for s in stats), "dropped_routes": sum(s.dropped for s in stats)}

    def reset_counters(self) -> None:
        for counters in self.counters:
            counters.reset()
        if self.dropped_routes is not None:
            self.dropped_routes.reset()


# ---- init_inference ----


def _load_model(
    model: nn.Module | str | os.PathLike[str], dtype: torch.dtype
) -> tuple[nn.Module, ShardedCheckpoint | None]:
    """(module, None) for a module; for a folder, its meta-device skeleton and the ShardedCheckpoint that
    fills it with this rank's share once the placement is known (nothing but headers is read here)."""
    if isinstance(model, nn.Module):
        return model, None
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model ({type(model).__name__}) must be an nn.Module or a checkpoint folder path")
    from ds_grace.models.sharded_load import ShardedCheckpoint

    check_checkpoint_folder(model)
    checkpoint = ShardedCheckpoint.open(model, dtype=dtype)
    return checkpoint.model, checkpoint


def init_inference(
    model: nn.Module | str | os.PathLike[str],
    config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    agree_on: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """deepspeed.init_inference with GRACE-MoE: see the module docstring. `model` is a module or a local
    checkpoint folder (loaded in the config's dtype); `config` a ds_config path or dict whose optional
    "grace" block selects GRACE (absent or enabled=false: vanilla DeepSpeed-MoE); `kwargs` are merged into
    the DeepSpeed part as deepspeed.init_inference merges them. `agree_on` ({field: JSON-able value}, such
    as a launch script's prompts and generation settings) joins the start-up fingerprint: every rank must
    pass the same. Returns the InferenceEngine, with ``engine.grace`` (a ServedMoE)."""
    startup = join_startup()  # under a launcher: a rank failing before the handshake stops the others
    try:
        ds_config, grace = split_config(config, kwargs)
        world_size, rank = _world()
        start = check_before_start(model, ds_config, grace, world_size=world_size, rank=rank)
    except Exception as exc:
        if startup is not None:
            startup.fail(exc, input_error=is_input_error(exc))
            startup.leave()
        raise
    checked, module, checkpoint, ds_config = start.checked, start.module, start.checkpoint, start.ds_config
    moe, plan, topology = checked.moe, checked.plan, checked.topology
    module.eval()
    log = rank_logger(rank)
    if plan is not None:
        log.info(
            "plan %s: %s on %s, %d MoE layers x %d experts, %d replicas, content hash %s",
            grace.plan.path or f"built from {grace.profile.trace}", plan.policy, plan.topology,
            plan.num_layers, plan.num_experts, sum(layer.replica_count() for layer in plan.layers),
            plan.content_hash[:16],
        )  # fmt: skip

    if startup is not None:
        startup.wait_ready()
    init_distributed(timeout_s=grace.communication.timeout_s)
    # the first collective: every rank's settings, plan, layout and versions must agree before any MoE one
    try:
        check_ranks_agree(
            {**run_fingerprint(checked), **launch_fingerprint(agree_on)}, rank_identity(checked)
        )
    except RankMismatchError:  # raised after the all-gather: every rank has started
        release_shared_memory_names([rank], os.environ)
        raise
    finally:
        if startup is not None:
            startup.close()
    release_shared_memory_names([rank], os.environ)  # every rank has started: the handshake was collective
    log.info("start-up handshake passed: %d ranks agree on settings, plan, layout and versions", world_size)
    if plan is not None:
        engine = _serve_grace(
            module, ds_config, grace=grace, plan=plan, moe=moe, rank=rank, checkpoint=checkpoint
        )
    else:
        engine = _serve_vanilla(
            module, ds_config, grace=grace, moe=moe, topology=topology, rank=rank, checkpoint=checkpoint
        )
    _generate_in_step(engine, world_size=topology.world_size)
    log_start(engine.grace, log)
    return engine


def log_start(served: ServedMoE, log: logging.Logger) -> None:
    """Log what the ranks read (one gather when served from a folder) and, at exit, each layer's paths."""
    if served.load is not None:
        read = gather_objects_to_rank0(served.load.bytes_read)
        if read:
            shown = ", ".join(f"rank {r} {format_bytes(n)}" for r, n in enumerate(read))
            log.info("%s served on %s; checkpoint bytes read: %s", served.mode, served.topology, shown)
    if served.mode == "grace":
        atexit.register(log_path_summary, served, log)


def log_path_summary(served: ServedMoE, log: logging.Logger) -> None:
    """One line per MoE layer: forwards by all-to-all path (low-latency, flat, hierarchical) on this rank."""
    for index, layer in enumerate(served.layers):
        counts = getattr(layer, "path_counts", None)
        if counts:
            shown = ", ".join(f"{path} {count}" for path, count in sorted(counts.items()))
            log.info("layer %d all-to-all paths over %d forwards: %s", index, sum(counts.values()), shown)


def _generate_in_step(engine: Any, *, world_size: int) -> None:
    """``engine.generate`` keeps every rank stepping until every rank's batch is done (transformers'
    ``synced_gpus``): each forward runs MoE collectives, so a rank whose sequences all ended, or whose
    max_new_tokens came first, runs dummy steps until the last rank stops. Pass synced_gpus=False to
    opt out (only safe when every rank stops at the same step)."""
    generate = getattr(engine, "generate", None)
    if generate is None or world_size == 1:
        return

    def generate_in_step(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("synced_gpus", True)
        return generate(*args, **kwargs)

    engine.generate = generate_in_step


@dataclass(frozen=True, eq=False)
class StartChecks:
    """What check_before_start resolved: preflight's result, the module (a meta-device skeleton for a
    folder), the checkpoint its share is read from, and the DeepSpeed part to hand DeepSpeed."""

    checked: Checked
    module: nn.Module
    checkpoint: ShardedCheckpoint | DeepSpeedMoECheckpoint | None
    ds_config: dict[str, Any]


def check_before_start(
    model: nn.Module | str | os.PathLike[str],
    ds_config: Mapping[str, Any],
    grace: GraceConfig,
    *,
    world_size: int,
    rank: int,
) -> StartChecks:
    """Every local check init_inference runs before its first collective, shared with `ds-grace
    check-config --model`: preflight (config, files, plan against the model), then the checkpoint's own
    checks. A folder is opened as a skeleton: only headers are read."""
    loaded: list[tuple[nn.Module, ShardedCheckpoint | None]] = []

    def describe_model(dtype: torch.dtype) -> ModelMoE:
        loaded.append(_load_model(model, dtype))
        return describe_moe(loaded[0][0])

    model_name = "the model" if isinstance(model, nn.Module) else f"the checkpoint {os.fspath(model)}"
    checked = preflight(
        ds_config,
        grace,
        world_size=world_size,
        rank=rank,
        describe_model=describe_model,
        model_name=model_name,
    )
    module, sharded = loaded[0]
    checkpoint, served_ds_config = _checked_checkpoint(
        sharded, module, checked.ds_config, grace=grace, plan=checked.plan, moe=checked.moe
    )
    return StartChecks(checked=checked, module=module, checkpoint=checkpoint, ds_config=served_ds_config)


def _checked_checkpoint(
    checkpoint: ShardedCheckpoint | None,
    module: nn.Module,
    ds_config: dict[str, Any],
    *,
    grace: GraceConfig,
    plan: GracePlan | None,
    moe: ModelMoE,
) -> tuple[ShardedCheckpoint | DeepSpeedMoECheckpoint | None, dict[str, Any]]:
    """The checkpoint to serve from (a folder's, or DeepSpeed's MoE checkpoint named by ds_config's
    "checkpoint" for deepspeed.moe.layer.MoE models, which is then taken out of the DeepSpeed part),
    checked against the plan or the model and the grace block; local, before any collective."""
    if checkpoint is None and moe.family == "deepspeed_moe":
        checkpoint = _deepspeed_checkpoint(module, ds_config)
        if checkpoint is not None:
            ds_config = {key: value for key, value in ds_config.items() if key != "checkpoint"}
    if checkpoint is not None:
        source = f"the plan ({grace.plan.path or grace.profile.trace})" if plan else "the model"
        checkpoint.check_num_experts(plan.num_experts if plan else moe.num_experts, source=source)
    online = grace.replication.online
    if grace.enabled and grace.replication.enabled and online.enabled and online.source == "disk":
        if checkpoint is None:
            raise GraceConfigError(
                'grace.replication.online.source ("disk") reads replicas from the checkpoint: serve a '
                "checkpoint folder, not an nn.Module"
            )
    return checkpoint, ds_config


def _deepspeed_checkpoint(module: nn.Module, ds_config: Mapping[str, Any]) -> DeepSpeedMoECheckpoint | None:
    """DeepSpeed's MoE checkpoint folder named by ds_config's "checkpoint" (as deepspeed.init_inference takes
    it), opened and checked against the model; None when there is none (ds_grace then reads the experts)."""
    from ds_grace.models.deepspeed_checkpoint import DeepSpeedMoECheckpoint, is_deepspeed_moe_checkpoint

    path = ds_config.get("checkpoint")
    if path is None:
        return None
    if not is_deepspeed_moe_checkpoint(path):
        from ds_grace.models import CheckpointError

        raise CheckpointError(
            f"checkpoint ({path!r}) must be a folder DeepSpeed's save_checkpoint wrote (holding 'latest' or "
            "mp_rank_00_model_states.pt) for a model of deepspeed.moe.layer.MoE layers"
        )
    return DeepSpeedMoECheckpoint.open(path, model=module)


def _serve_grace(
    module: nn.Module,
    ds_config: dict[str, Any],
    *,
    grace: GraceConfig,
    plan: GracePlan,
    moe: ModelMoE,
    rank: int,
    checkpoint: ShardedCheckpoint | None = None,
) -> Any:
    import deepspeed

    from ds_grace.comm.groups import create_grace_groups
    from ds_grace.moe.layer import GraceMoE, RuntimeOptions

    topology = plan.topology
    options = RuntimeOptions.from_config(grace)
    blocks: list[nn.Module] = []
    load_stats = None

    def make_routed_experts(layer_index: int, experts: list[nn.Module]) -> nn.Module:
        info = moe.blocks[layer_index]
        layer = GraceMoE.from_experts(
            experts,
            hidden_size=info.hidden_size,
            k=info.top_k,
            layer_plan=plan.layers[layer_index],
            topology=topology,
            ep_index=rank,
            options=options,
        )
        return layer.to(next(experts[0].parameters()).device)

    if _is_deepspeed_checkpoint(checkpoint):  # each rank reads only its slots' expert files
        layers = checkpoint.grace_layers(plan=plan, rank=rank, options=options, device=_served_device())
        load_stats = checkpoint.stats
    elif checkpoint is not None:  # converted before DeepSpeed sees the model: it moves only its share
        from ds_grace.models.sharded_load import load_converted

        blocks, load_stats = load_converted(
            checkpoint,
            make_routed_experts=make_routed_experts,
            slots_of_layer=lambda index: plan.layers[index].slots[rank],
            device=_served_device(),
            progress=rank == 0,
        )
    engine = deepspeed.init_inference(module, config=ds_config)
    served = engine.module
    ep_rank_lists = [list(range(topology.world_size))]
    groups = create_grace_groups(topology, timeout_s=options.timeout_s, ep_rank_lists=ep_rank_lists)
    if checkpoint is not None:
        if not _is_deepspeed_checkpoint(checkpoint):  # DeepSpeed checkpoints' layers were made above
            layers = [block.routed_experts for block in blocks]
    elif moe.family == "deepspeed_moe":
        layers = []
        for index, info in enumerate(moe.blocks):
            parent_name, _, attribute = info.name.rpartition(".")
            parent = served.get_submodule(parent_name)
            layer = GraceMoE.from_deepspeed(
                getattr(parent, attribute),
                layer_plan=plan.layers[index],
                topology=topology,
                ep_index=rank,
                options=options,
                ep_rank_lists=ep_rank_lists,
            )
            setattr(parent, attribute, layer)
            layers.append(layer)
    else:
        from ds_grace.models import convert_moe_blocks

        blocks = convert_moe_blocks(served, make_routed_experts=make_routed_experts)
        layers = [block.routed_experts for block in blocks]
    for layer in layers:
        layer.set_grace_groups(groups)
    served = ServedMoE(
        mode="grace",
        family=moe.family,
        topology=topology,
        rank=rank,
        plan=plan,
        blocks=tuple(blocks),
        layers=tuple(layers),
        load=load_stats,
    )
    from ds_grace.online import OnlineReplicator

    online = OnlineReplicator.from_served(served, grace, checkpoint=checkpoint)
    if online is not None:
        # every rank runs the same forwards in lockstep, so stepping on each forward keeps them aligned
        engine.module.register_forward_hook(lambda *_: online.step())
    engine.grace = replace(served, online=online)
    return engine


def _serve_vanilla(
    module: nn.Module,
    ds_config: dict[str, Any],
    *,
    grace: GraceConfig,
    moe: ModelMoE,
    topology: Topology,
    rank: int,
    checkpoint: ShardedCheckpoint | None = None,
) -> Any:
    from ds_grace.comm.deepspeed_groups import moe_layers
    from ds_grace.vanilla import DroppedRouteCounter, serve_vanilla

    blocks: list[nn.Module] = []
    load_stats = None
    if _is_deepspeed_checkpoint(checkpoint):
        from ds_grace.comm.deepspeed_groups import expert_parallel_rank

        ep_rank = expert_parallel_rank(rank, single_ep_size(moe))
        checkpoint.load_local_experts(ep_rank=ep_rank, device=_served_device())
        load_stats = checkpoint.stats
    elif moe.family != "deepspeed_moe":
        from ds_grace.models import convert_moe_blocks

        def make_routed_experts(layer_index: int, experts: list[nn.Module]) -> nn.Module:
            info = moe.blocks[layer_index]
            return DeepSpeedRoutedExperts.contiguous(
                experts,
                ep_rank=rank,
                ep_size=topology.world_size,
                hidden_size=info.hidden_size,
                k=info.top_k,
                vanilla=grace.vanilla,
            )

        if checkpoint is None:
            blocks = convert_moe_blocks(module, make_routed_experts=make_routed_experts)
        else:
            from ds_grace.models.sharded_load import contiguous_experts, load_converted

            blocks, load_stats = load_converted(
                checkpoint,
                make_routed_experts=make_routed_experts,
                slots_of_layer=lambda index: contiguous_experts(
                    moe.blocks[index].num_experts, ep_rank=rank, ep_size=topology.world_size
                ),
                device=_served_device(),
                progress=rank == 0,
            )
    engine = serve_vanilla(module, ds_config, grace.vanilla)
    layers = tuple(layer for _, layer in moe_layers(engine.module))
    engine.grace = ServedMoE(
        mode="vanilla",
        family=moe.family,
        topology=topology,
        rank=rank,
        plan=None,
        blocks=tuple(blocks),
        layers=layers,
        dropped_routes=DroppedRouteCounter(engine),
        load=load_stats,
    )
    return engine


def _is_deepspeed_checkpoint(checkpoint: object) -> bool:
    from ds_grace.models.deepspeed_checkpoint import DeepSpeedMoECheckpoint

    return isinstance(checkpoint, DeepSpeedMoECheckpoint)


def _served_device() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()
