"""One MoE layer in bf16: GraceMoE on every path against DeepSpeed's MOELayer and a minimal reference.

Shape legend: T tokens (per rank), D hidden, E experts, K top-k.

For an OLMoE-sized layer (D 2048, ffn 1024, E 64, K 8) and a Mixtral-sized one (D 4096, ffn 14336, E 8,
K 2), SwiGLU experts, and each token count (4, 64, 512, 4096, 16384 per rank):
- parity: every GraceMoE path and DeepSpeed's MOELayer (lossless: drop_tokens False, no noise, no RTS)
  against a single-process reference, max |y - y_ref| <= 3e-2 x max(1, max |y_ref|) (bf16, as
  `ds-grace selfcheck`); GraceMoE against DeepSpeed is recorded too;
- time per layer forward (median) of GraceMoE on each path it can take (flat and low-latency; hierarchical
  and auto on several nodes), DeepSpeed's MOELayer and the reference (gate -> routes sorted by expert
  -> each expert once on its rows -> weighted sum in token order);
- per forward: top-level aten ops; on CUDA also host syncs (torch.cuda.set_sync_debug_mode, counted),
  kernels launched and the GPU's idle share (torch.profiler);
- on CUDA: capture of the low-latency path in a CUDA graph, replays against eager.
On a CPU device the CUDA-only numbers are recorded as "not measured on cpu".

    python benchmarks/gpu/layer_check.py --device cuda --out DIR                  # one GPU (NCCL world of 1)
    python benchmarks/gpu/layer_check.py --device cpu --sizes tiny --out DIR      # CPU rehearsal (gloo)
    deepspeed --hostfile H benchmarks/gpu/layer_check.py --device cuda --out DIR  # the launcher's world

Rank 0 writes DIR/gpu_check.json and DIR/gpu_check.md. Exit status: 0 every check run passed; 1 a check
failed (parity, CUDA-graph capture or replay); 2 a step could not run (its error line names it) or the
time budget ran out before every measurement was taken.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from measures import NOT_ON_CPU, cuda_graph_replays, host_syncs, profile_forward, time_forward
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from ds_grace.comm.collectives import barrier, end_process, max_over_ranks, shutdown_distributed

RELATIVE_TOLERANCE = 3e-2
# the versions this check accepts; tested: see VERSIONS_TESTED and benchmarks/README.md
SUPPORTED = {
    "torch": ">=2.11,<2.14",
    "deepspeed": ">=0.19.8,<0.20",
    "pydantic": ">=2.5,<3",
    "transformers": ">=5.17,<6",
}
VERSIONS_TESTED = (
    "CPU rehearsal in CI: torch 2.13.0+cpu, deepspeed 0.19.8, pydantic 2.13, transformers 5.25 (Python 3.11); "
    "the GPU machine's torch 2.11 and transformers 5.17 are admitted by this check's own ranges only"
)
LOW_LATENCY_MAX_TOKENS = 512  # the low-latency path serves forwards of up to this many tokens per rank
GRAPH_TOKENS = (4, 64)  # decode-sized forwards captured in a CUDA graph
TOKENS = (4, 64, 512, 4096, 16384)
# timing and budget defaults per device: the CPU rehearsal runs every step, briefly
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cuda": {"warmup": 2, "iters": 20, "cell_budget_s": 0.5, "budget_s": 360.0},
    "cpu": {"warmup": 1, "iters": 3, "cell_budget_s": 0.05, "budget_s": 900.0},
}


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    experts: int
    k: int


SIZES: dict[str, dict[str, Shape]] = {
    "full": {"olmoe": Shape(2048, 1024, 64, 8), "mixtral": Shape(4096, 14336, 8, 2)},
    "tiny": {"olmoe": Shape(64, 32, 64, 8), "mixtral": Shape(64, 224, 8, 2)},
}


class StepFailed(Exception):
    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"step '{step}' failed: {message}")
        self.step = step


def swiglu_expert(hidden: int, ffn: int, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """An OLMoE / Mixtral expert, down(silu(gate(x)) * up(x)) with gate and up in one GEMM, in the form
    the transformers families' experts take here (GatedExpertMLP): GraceMoE stacks its slots and runs
    one grouped GEMM per matrix where the device allows (ds_grace.moe.grouped)."""
    from ds_grace.models.experts import GatedExpertMLP

    gate_up = torch.empty(2 * ffn, hidden, device=device, dtype=dtype)
    down = torch.empty(hidden, ffn, device=device, dtype=dtype)
    return GatedExpertMLP(gate_up_proj=gate_up, down_proj=down, act_fn=nn.SiLU())


class SortedReference(nn.Module):
    """The minimal single-process layer: gate -> routes sorted by expert -> each expert once on its rows
    -> weighted sum in token order, accumulated in fp32. One host read: the rows per expert."""

    def __init__(self, gate: nn.Module, experts: list[nn.Module]) -> None:
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(experts)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        routing = self.gate(x_TD)
        k = routing.topk_ids_TK.shape[1]
        expert_R = routing.topk_ids_TK.reshape(-1)
        order_R = torch.argsort(expert_R, stable=True)
        rows_per_expert = torch.bincount(expert_R, minlength=len(self.experts)).tolist()
        token_R = order_R // k
        blocks = x_TD.index_select(0, token_R).split(rows_per_expert)
        out_RD = torch.cat([expert(block) for expert, block in zip(self.experts, blocks)])
        weight_R = routing.topk_weights_TK.reshape(-1).index_select(0, order_R).float()
        y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        y_TD.index_add_(0, token_R, out_RD.float() * weight_R.unsqueeze(1))
        return y_TD.to(x_TD.dtype)


@dataclass
class World:
    device: torch.device
    size: int
    rank: int
    topology: Any  # ds_grace.topology.Topology


@dataclass
class Layers:
    reference: SortedReference
    deepspeed: nn.Module
    deepspeed_ep_size: int
    grace: dict[str, nn.Module]  # by requested path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--sizes", choices=tuple(SIZES), default="full", help="tiny: the CPU rehearsal's")
    parser.add_argument("--models", nargs="+", choices=("olmoe", "mixtral"), default=["olmoe", "mixtral"])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="tokens per rank")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards first (cuda 2, cpu 1)")
    parser.add_argument(
        "--iters", type=int, default=None, help="most timed forwards per variant and size (cuda 20, cpu 3)"
    )
    parser.add_argument(
        "--cell-budget-s",
        type=float,
        default=None,
        help="timed seconds per variant and size (cuda 0.5, cpu 0.05)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="seconds for all measurements (cuda 360, cpu 900)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    for name, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for tokens in args.tokens:
        if tokens < 1:
            parser.error(f"--tokens ({tokens}) must be >= 1")
    return args


def check_versions(device: str) -> dict[str, Any]:
    """Installed versions against SUPPORTED, and where each module comes from; raises on the first miss."""
    if device == "cuda" and not torch.cuda.is_available():
        raise StepFailed("device", "--device cuda but torch.cuda.is_available() is False (no GPU visible)")
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for name, spec in SUPPORTED.items():
        try:
            version = torch.__version__ if name == "torch" else importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise StepFailed("versions", f"{name} is not installed (needs {spec})") from None
        if not SpecifierSet(spec).contains(Version(version), prereleases=True):
            raise StepFailed("versions", f"{name} {version} is outside this check's range {spec}")
        versions[name] = version
    import deepspeed

    import ds_grace

    versions["module_files"] = {"ds_grace": ds_grace.__file__, "deepspeed": deepspeed.__file__}
    versions["tested"] = VERSIONS_TESTED
    return versions


def join_world(device_type: str, *, timeout_s: float = 300.0) -> World:
    """The launcher's world (env://) when RANK and WORLD_SIZE are set, else a world of this process.

    On CUDA the group is "cpu:gloo,cuda:nccl": device tensors travel by NCCL, host ones by gloo.
    """
    import deepspeed

    from ds_grace.config import GraceConfig

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if launched:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        with __import__("socket").socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout
        )
    if device.type == "cpu":
        # DeepSpeed's CPU backend compiles its shared-memory collective op on start-up (a C++ build of
        # minutes, redone wherever deepspeed is installed anew); this check's collectives go by gloo
        # (the module itself: the package's attribute `torch` is the torch package)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_init_required=False, verbose=False, timeout=timeout)
    size, rank = dist.get_world_size(), dist.get_rank()
    topology = GraceConfig().resolve_topology(world_size=size)
    return World(device=device, size=size, rank=rank, topology=topology)


def spread_plan(num_experts: int, world_size: int) -> Any:
    """ceil(E / ranks) slots per rank, filled with experts in order and wrapping round: DeepSpeed's
    contiguous placement when E divides evenly, two or more instances per expert when ranks outnumber E."""
    from ds_grace.planning.plan import LayerPlan

    per_rank = math.ceil(num_experts / world_size)
    slots = [[(rank * per_rank + j) % num_experts for j in range(per_rank)] for rank in range(world_size)]
    return LayerPlan.from_lists(slots=slots, primary=[e // per_rank for e in range(num_experts)])


def grace_paths(topology: Any) -> list[str]:
    """The paths GraceMoE can take on `topology`: on one node hierarchical is the flat hop itself, so it
    and auto (which chooses between the two per forward) are variants only across nodes."""
    return ["flat", "low-latency"] + (["hierarchical", "auto"] if topology.num_nodes > 1 else [])


def runtime_options(path: str) -> Any:
    from ds_grace.moe.layer import RuntimeOptions

    if path == "low-latency":
        return RuntimeOptions(path="flat", low_latency_max_tokens=LOW_LATENCY_MAX_TOKENS)
    return RuntimeOptions(path=path)


def seeded_(module: nn.Module, *, seed: int, device: torch.device) -> None:
    """Fill every parameter with N(0, 1 / fan_in) from `seed` (the same on every rank)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            values = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
            param.copy_(values / param.shape[-1] ** 0.5)


def build_layers(shape: Shape, world: World, *, seed: int) -> Layers:
    """Full expert list (same on every rank), DeepSpeed's lossless MoE over it, GraceMoE per path, reference."""
    from deepspeed.moe.layer import MoE

    from ds_grace.moe.gate import GraceGate
    from ds_grace.moe.layer import GraceMoE

    device, dtype = world.device, torch.bfloat16
    experts: list[nn.Module] = []
    for e in range(shape.experts):
        expert = swiglu_expert(shape.hidden, shape.ffn, device=device, dtype=dtype)
        seeded_(expert, seed=seed * 1000 + e, device=device)
        experts.append(expert.eval())
    ep_size = world.size if shape.experts % world.size == 0 else 1
    moe = MoE(
        shape.hidden, experts[0], num_experts=shape.experts, ep_size=ep_size, k=shape.k,
        drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False, min_capacity=0, eval_capacity_factor=1.0,
    )  # fmt: skip
    moe.set_deepspeed_parallelism()
    moe = moe.to(device).eval()
    local = moe.deepspeed_moe.experts.deepspeed_experts
    first = (world.rank % ep_size) * len(local)
    gate_generator = torch.Generator(device=device).manual_seed(seed)
    skew_E1 = torch.linspace(1.5, 0.0, shape.experts, device=device).unsqueeze(1) / shape.hidden**0.5
    with torch.no_grad():
        for i, module in enumerate(local):
            module.load_state_dict(experts[first + i].state_dict())
        gate = torch.randn(shape.experts, shape.hidden, generator=gate_generator, device=device)
        moe.deepspeed_moe.gate.wg.weight.copy_(gate / shape.hidden**0.5 + skew_E1)  # some experts favoured
    plan = spread_plan(shape.experts, world.topology.world_size)
    grace = {
        path: GraceMoE.from_deepspeed(
            moe, layer_plan=plan, topology=world.topology, options=runtime_options(path)
        ).eval()
        for path in grace_paths(world.topology)
    }
    reference = SortedReference(GraceGate.from_deepspeed(moe.deepspeed_moe.gate), experts).eval()
    return Layers(reference=reference, deepspeed=moe, deepspeed_ep_size=ep_size, grace=grace)


def output(layer: nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = layer(x_TD)
    return y[0] if isinstance(y, tuple) else y


def taken_path(layer: nn.Module) -> str | None:
    """The path the last forward took, as the layer reports it."""
    return getattr(layer.deepspeed_moe, "last_path", None)


def grouped_slots(layer: nn.Module, x_TD: torch.Tensor) -> bool | None:
    """Whether GraceMoE's slots are stacked for grouped GEMMs on x_TD's device and dtype (None: not a
    GraceMoE). On a GPU every forward then runs them grouped; on the CPU the normal paths do so up to
    ds_grace.moe.grouped.CPU_GROUPED_MAX_ROWS_PER_SLOT rows per slot."""
    experts = getattr(getattr(layer, "deepspeed_moe", None), "experts", None)
    stacked = getattr(experts, "stacked_slots", None)
    return None if stacked is None else stacked(x_TD) is not None


def tolerance(y_ref_TD: torch.Tensor) -> float:
    return RELATIVE_TOLERANCE * max(1.0, float(y_ref_TD.float().abs().max()))


def make_input(tokens: int, hidden: int, *, world: World, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=world.device).manual_seed(seed * 1_000_003 + tokens * 131 + world.rank)
    x_TD = torch.randn(tokens, hidden, generator=generator, device=world.device, dtype=torch.float32)
    return x_TD.to(torch.bfloat16)


def variants_at(layers: Layers, tokens: int) -> dict[str, nn.Module]:
    """Every layer to run at `tokens` per rank: the low-latency path only up to its bound."""
    grace = {
        f"grace:{path}": layer
        for path, layer in layers.grace.items()
        if path != "low-latency" or tokens <= LOW_LATENCY_MAX_TOKENS
    }
    if "grace:low-latency" in grace:  # every rank holds `tokens`: the promise the low-latency path needs
        grace["grace:low-latency"].set_low_latency_tokens(tokens)
    return {**grace, "deepspeed": layers.deepspeed, "reference": layers.reference}


def run_step(step: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """function(*args, **kwargs); any error becomes StepFailed naming `step`."""
    try:
        return function(*args, **kwargs)
    except StepFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised with the step's name
        raise StepFailed(step, f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc


def parity_rows(
    cell: dict[str, Any], outputs: dict[str, torch.Tensor], paths: dict[str, str | None]
) -> list[dict[str, Any]]:
    """Each variant against the reference, each GraceMoE path against DeepSpeed (worst rank)."""
    rows = []
    bound = max_over_ranks(tolerance(outputs["reference"]))
    for name, y_TD in outputs.items():
        against = ["reference"] if name == "deepspeed" else ["reference", "deepspeed"]
        for other in against if name != "reference" else []:
            diff = max_over_ranks(float((y_TD.float() - outputs[other].float()).abs().max()))
            rows.append({
                **cell, "variant": name, "path": paths[name], "against": other, "max_abs_diff": diff,
                "tolerance": bound, "status": "passed" if diff <= bound else "failed",
            })  # fmt: skip
    return rows


def counts(forward: Any, *, device: torch.device, errors: list[str], where: str) -> dict[str, Any]:
    """Host syncs and profiler counts of one forward; an error is recorded, not raised (every rank runs
    the same forwards either way, so the ranks stay in step)."""
    found: dict[str, Any] = {}
    for name, measure in (("host_syncs", host_syncs), ("profile", profile_forward)):
        try:
            value = measure(forward, device=device)
        except Exception as exc:  # noqa: BLE001 - recorded in the report and in the exit status
            message = f"step 'counts {where}' failed: {name}: {type(exc).__name__}: {exc}".splitlines()[0]
            errors.append(message)
            value = {"host_syncs": message} if name == "host_syncs" else {"aten_ops": message}
        found.update(value if isinstance(value, dict) else {name: value})
    return found


def measure_cell(
    args: argparse.Namespace, layers: Layers, world: World, *, model: str, shape: Shape, tokens: int,
    errors: list[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """Parity, times and counts of every variant at `tokens` per rank."""
    cell = {"model": model, "tokens": tokens}
    x_TD = make_input(tokens, shape.hidden, world=world, seed=args.seed)
    variants = variants_at(layers, tokens)
    outputs, paths = {}, {}
    for name, layer in variants.items():
        step = f"parity {model} {tokens} {name}"
        if name == "grace:low-latency":
            run_step(step, output, layer, x_TD)  # a first forward sizes the low-latency buffer
        outputs[name] = run_step(step, output, layer, x_TD)
        paths[name] = taken_path(layer) if name.startswith("grace:") else name
    parity = parity_rows(cell, outputs, paths)
    del outputs
    timing = []
    for name, layer in variants.items():
        where = f"{model} {tokens} {name}"

        def forward(layer: nn.Module = layer) -> torch.Tensor:
            return output(layer, x_TD)

        measured = run_step(
            f"timing {where}", time_forward, forward, device=world.device, warmup=args.warmup,
            max_iters=args.iters, budget_s=args.cell_budget_s,
        )  # fmt: skip
        row = {
            **cell,
            "variant": name,
            "path": paths[name],
            "grouped_slots": grouped_slots(layer, x_TD),
            "median_ms": measured.median_ms,
            "iters": measured.iters,
        }
        timing.append({**row, **counts(forward, device=world.device, errors=errors, where=where)})
    reference_ms = next(r["median_ms"] for r in timing if r["variant"] == "reference")
    for row in timing:
        row["reference_over_variant"] = reference_ms / row["median_ms"]
    return parity, timing


def graph_check(
    layer: nn.Module, world: World, *, model: str, shape: Shape, seed: int
) -> list[dict[str, Any]]:
    """CUDA-graph capture and replays of the low-latency path at decode sizes (not run on the CPU)."""
    rows = []
    for tokens in GRAPH_TOKENS:
        cell = {"model": model, "tokens": tokens, "variant": "grace:low-latency"}
        if world.device.type != "cuda":
            rows.append({**cell, "status": NOT_ON_CPU})
            continue
        inputs = [make_input(tokens, shape.hidden, world=world, seed=seed + i) for i in range(1, 4)]
        result = cuda_graph_replays(
            lambda x_TD: output(layer, x_TD),
            inputs,
            tolerance=tolerance,
            warmup=2,
            max_iters=20,
            budget_s=0.5,
        )
        rows.append({**cell, "path": taken_path(layer), **result})
    return rows


def out_of_time(deadline: float) -> bool:
    """True on every rank once any rank is past `deadline` (one decision for all)."""
    return max_over_ranks(float(time.monotonic() > deadline)) > 0


def measure_all(args: argparse.Namespace, world: World, report: dict[str, Any], *, deadline: float) -> None:
    low_latency_layers: dict[str, tuple[nn.Module, Shape]] = {}
    for model in args.models:
        shape = SIZES[args.sizes][model]
        if out_of_time(deadline):
            report["not_measured"].append(f"{model}: every size (time budget)")
            continue
        layers = run_step(f"build {model}", build_layers, shape, world, seed=args.seed)
        report["deepspeed_ep_size"][model] = layers.deepspeed_ep_size
        for tokens in args.tokens:
            if out_of_time(deadline):
                report["not_measured"].append(f"{model} {tokens} tokens (time budget)")
                continue
            parity, timing = measure_cell(
                args, layers, world, model=model, shape=shape, tokens=tokens, errors=report["errors"]
            )
            report["parity"] += parity
            report["timing"] += timing
        low_latency_layers[model] = (layers.grace["low-latency"], shape)
        del layers
        if world.device.type == "cuda":
            torch.cuda.empty_cache()
    for model, (layer, shape) in low_latency_layers.items():  # last: a failed capture may spoil the stream
        if world.device.type == "cuda" and out_of_time(deadline):
            report["not_measured"].append(f"{model} CUDA graph (time budget)")
            continue
        report["cuda_graph"] += run_step(
            f"cuda graph {model}", graph_check, layer, world, model=model, shape=shape, seed=args.seed
        )


def exit_status(report: dict[str, Any]) -> int:
    """1 when a check failed, else 2 when a step failed or measurements are missing, else 0."""
    failed = [r for r in report["parity"] + report["cuda_graph"] if r.get("status") == "failed"]
    report["failed"] = [
        f"{r['model']} {r['tokens']} {r['variant']}"
        + (f" vs {r['against']}" if "against" in r else " CUDA graph")
        for r in failed
    ]
    if failed:
        return 1
    return 2 if report["errors"] or report["not_measured"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "gpu_check", "device": args.device, "sizes": args.sizes,
        "models": {m: asdict(SIZES[args.sizes][m]) for m in args.models}, "tokens": args.tokens,
        "low_latency_max_tokens": LOW_LATENCY_MAX_TOKENS, "relative_tolerance": RELATIVE_TOLERANCE,
        "deepspeed_ep_size": {}, "parity": [], "timing": [], "cuda_graph": [], "not_measured": [], "errors": [],
    }  # fmt: skip
    rank = 0
    try:
        report["versions"] = run_step("versions", check_versions, args.device)
        world = run_step("distributed", join_world, args.device)
        rank = world.rank
        report.update(
            world_size=world.size, topology=str(world.topology),
            gpu=torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else platform.processor(),
        )  # fmt: skip
        measure_all(args, world, report, deadline=started + args.budget_s)
    except StepFailed as exc:
        report["errors"].append(str(exc))
    status = exit_status(report)
    report["wall_s"] = time.monotonic() - started
    report["status"] = {0: "passed", 1: "failed", 2: "incomplete"}[status]
    if rank == 0:
        from report_table import write_report

        write_report(report, args.out)
        for line in report["errors"]:
            print(f"error: {line}", file=sys.stderr)
        for line in report["failed"]:
            print(f"check failed: {line}", file=sys.stderr)
    if dist.is_available() and dist.is_initialized() and not report["errors"]:
        barrier()
        shutdown_distributed()
    return status


if __name__ == "__main__":
    end_process(main())  # a rank: past the interpreter's teardown (see ds_grace.comm.collectives)
