"""Memory of serving from a checkpoint folder: per rank, bytes held, bytes read from the files and peak RSS
growth during ds_grace.init_inference, against the rank's own share (dense tensors + its expert slots) and
the whole model.

    python benchmarks/bench_memory.py                # ~400 MB Mixtral-architecture checkpoint, 2 nodes x 2
    python benchmarks/bench_memory.py --headline     # ~7 GB checkpoint, GRACE on 4 ranks vs a reference

Every case runs 4 ranks as 2 nodes x 2 through the real launcher (``deepspeed --hostfile H --no_ssh
--node_rank I``, one launcher per node, both on this machine). Modes: ``grace`` and ``vanilla`` serve the
folder (sharded loading); ``grace-whole`` and ``vanilla-whole`` load the whole checkpoint in every rank
first (transformers from_pretrained) and pass the module, which is what serving a folder did before.

RSS growth is the peak resident set (VmHWM, reset through /proc/self/clear_refs right before the call)
minus the resident set before ``init_inference``; the process group is up and torch, deepspeed and the
model's transformers module are imported before the baseline is taken. Bytes read are the bytes of the
tensors and expert rows requested from the safetensors files (in the files' dtype).

The checkpoint is Mixtral's architecture in the published per-expert layout
(``block_sparse_moe.experts.{j}.w1/w2/w3.weight``), random weights from a seed, written tensor by tensor
into ~1 GB shards with ``model.safetensors.index.json``. The headline first computes the logits of a fixed
batch in a single process of its own (``load_whole_model``: one copy of the model, read with safetensors into
a transformers model), then serves the
folder with GRACE on 4 ranks and compares rank 0's logits; the checkpoint is deleted afterwards.
Results: ``benchmarks/results/bench_memory.json`` (``--headline`` adds its ``headline`` entry).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (str(REPO_ROOT),):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from ds_grace.cluster.node_launchers import LauncherNotFound, run_node_launchers  # noqa: E402
from ds_grace.files import write_text_atomic  # noqa: E402 - after the path set-up; light (no torch)

RESULTS = REPO_ROOT / "benchmarks" / "results" / "bench_memory.json"
MODES = ("grace", "vanilla", "grace-whole", "vanilla-whole")
TOPOLOGY = {"num_nodes": 2, "gpus_per_node": 2}
SMALL = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "vocab_size": 1024}
HEADLINE = {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 18, "vocab_size": 32000}
NUM_EXPERTS = 8
BATCH_SHAPE = (2, 16)
SHARD_BYTES = 1 << 30
MB = 1e6


# ---- the checkpoint ----


def mixtral_config(shape: dict[str, int]) -> Any:
    from ds_grace.models import tiny_config

    return tiny_config(
        "mixtral",
        **shape,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


def write_checkpoint(folder: Path, shape: dict[str, int], *, seed: int = 0) -> dict[str, Any]:
    """A random Mixtral-architecture checkpoint in the per-expert layout, written tensor by tensor."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = mixtral_config(shape)
    config.save_pretrained(folder)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)

    def weights(*size: int) -> torch.Tensor:
        return 0.02 * torch.randn(*size, generator=generator)

    def tensors():
        for name, meta in skeleton.state_dict().items():
            prefix = name.replace(".mlp.", ".block_sparse_moe.")
            if name.endswith("experts.gate_up_proj"):
                num_experts, rows, hidden = meta.shape
                base = prefix.removesuffix("gate_up_proj")
                for j in range(num_experts):
                    yield f"{base}{j}.w1.weight", weights(rows // 2, hidden)
                    yield f"{base}{j}.w3.weight", weights(rows // 2, hidden)
            elif name.endswith("experts.down_proj"):
                num_experts, hidden, inner = meta.shape
                base = prefix.removesuffix("down_proj")
                for j in range(num_experts):
                    yield f"{base}{j}.w2.weight", weights(hidden, inner)
            elif "norm" in name:
                yield prefix, torch.ones(meta.shape)
            else:
                yield prefix, weights(*meta.shape)

    shard: dict[str, torch.Tensor] = {}
    shard_files: list[tuple[str, list[str]]] = []
    total = 0

    def flush() -> None:
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name))
        shard_files.append((name, list(shard)))
        shard.clear()

    for key, value in tensors():
        shard[key] = value
        total += value.numel() * value.element_size()
        if sum(t.numel() * t.element_size() for t in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    weight_map = {key: name for name, keys in shard_files for key in keys}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"bytes": total, "shards": len(shard_files), "tensors": len(weight_map)}


def make_plan(path: Path, *, num_layers: int) -> None:
    """A GRACE plan for 2 x 2 from a synthetic skewed trace: grouping plus replicas."""
    from ds_grace.config import GraceConfig
    from ds_grace.planning.build import build_plan
    from ds_grace.topology import Topology
    from ds_grace.trace import synthetic

    trace = synthetic(num_layers=num_layers, num_experts=NUM_EXPERTS, top_k=2, num_tokens=4096, seed=5)
    build_plan(trace, topology=Topology(**TOPOLOGY), config=GraceConfig()).save(path)


def own_share(folder: Path, slots_by_layer: list[list[int]]) -> dict[str, int]:
    """Dense bytes + this rank's slots' bytes, from the safetensors headers (fp32 files served in fp32)."""
    from ds_grace.models.sharded_load import list_tensors

    tensors = list_tensors(folder)
    dense = sum(info.nbytes for key, info in tensors.items() if ".experts." not in key)
    expert = 0
    for layer, slots in enumerate(slots_by_layer):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.0."
        expert += len(slots) * sum(info.nbytes for key, info in tensors.items() if key.startswith(prefix))
    return {"own_share_bytes": dense + expert, "whole_model_bytes": sum(i.nbytes for i in tensors.values())}


def batch() -> Any:
    import torch

    return torch.randint(3, 1000, BATCH_SHAPE, generator=torch.Generator().manual_seed(9))


# ---- what each rank runs ----


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rank_main(args: argparse.Namespace) -> int:
    import torch
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401 - imported before the baseline
    from deepspeed.inference.engine import InferenceEngine  # noqa: F401

    import ds_grace
    from ds_grace.comm.collectives import gather_objects_to_rank0, init_distributed, world
    from ds_grace.models import load_checkpoint
    from ds_grace.models.sharded_load import contiguous_experts, held_bytes
    from ds_grace.planning.plan import GracePlan

    torch.set_num_threads(1)
    init_distributed(timeout_s=600.0)
    world_size, rank = world()
    grace = args.mode.startswith("grace")
    block: dict[str, Any] = {"topology": TOPOLOGY, "communication": {"timeout_s": 600}}
    config = {
        "dtype": "fp32",
        "grace": {**block, "plan": {"path": args.plan}} if grace else {"enabled": False},
    }
    if grace:
        slots = [list(layer.slots[rank]) for layer in GracePlan.load(args.plan).layers]
    else:
        layers = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
        slots = [list(contiguous_experts(NUM_EXPERTS, ep_rank=rank, ep_size=world_size))] * layers
    share = own_share(Path(args.model), slots)
    gc.collect()
    rss_before_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    begin = time.perf_counter()
    model: Any = (
        load_checkpoint(args.model, dtype=torch.float32) if args.mode.endswith("whole") else args.model
    )
    engine = ds_grace.init_inference(model, config=config)
    seconds = time.perf_counter() - begin
    peak_kb = _status_kb("VmHWM")
    del model
    load = engine.grace.load
    result = {
        "rank": rank,
        "mode": args.mode,
        "held_bytes": held_bytes(engine.module),
        "bytes_read": load.bytes_read if load is not None else share["whole_model_bytes"],
        "rss_growth_bytes": (peak_kb - rss_before_kb) * 1024,
        "init_inference_s": round(seconds, 2),
        "slots": sum(len(s) for s in slots),
        **share,
    }
    logits = None
    if args.logits_out:
        with torch.no_grad():
            logits = engine.module(batch()).logits
    results = gather_objects_to_rank0(result)
    if rank == 0:
        write_text_atomic(args.out, json.dumps(results))
        if logits is not None:
            torch.save(logits, args.logits_out)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    return 0


def load_whole_model(folder: Path) -> Any:
    """The whole checkpoint in one transformers model, one copy: each tensor is read from its shard
    (safetensors.safe_open, independent of ds_grace's loader) straight into the model's tensors, the
    per-expert w1/w3/w2 into the fused [E, 2I, D] / [E, D, I] ones (transformers from_pretrained peaks
    near two copies here: it fuses the experts after reading them)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = {name: torch.empty(shape) for name, shape in shapes.items()}
    inner = config.intermediate_size
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(folder / shard), framework="pt") as handle:
            for key in handle.keys():
                name = key.replace(".block_sparse_moe.", ".mlp.")
                parts = name.split(".")
                if "experts" not in parts:
                    state[name].copy_(handle.get_tensor(key))
                    continue
                at = parts.index("experts")
                base, expert, which = ".".join(parts[: at + 1]), int(parts[at + 1]), parts[at + 2]
                if which == "w2":
                    state[f"{base}.down_proj"][expert].copy_(handle.get_tensor(key))
                else:  # gate rows (w1) first, then up rows (w3)
                    rows = slice(0, inner) if which == "w1" else slice(inner, 2 * inner)
                    state[f"{base}.gate_up_proj"][expert, rows].copy_(handle.get_tensor(key))
    model.load_state_dict(state, assign=True)
    return model.eval()


def reference_main(args: argparse.Namespace) -> int:
    """Single-process logits of the fixed batch, the whole model in one transformers model."""
    import torch

    torch.set_num_threads(2)
    begin = time.perf_counter()
    model = load_whole_model(Path(args.model))
    with torch.no_grad():
        logits = model(batch()).logits
    torch.save(logits, args.out)
    print(
        json.dumps(
            {"seconds": round(time.perf_counter() - begin, 1), "peak_rss_bytes": _status_kb("VmHWM") * 1024}
        )
    )
    return 0


# ---- the launches ----


def launch(mode: str, *, model: Path, plan: Path, workdir: Path, logits: bool = False) -> list[dict]:
    """Run rank_main on 2 nodes x 2 through the deepspeed launcher (one launcher per node, no ssh)."""
    out = workdir / f"{mode}.json"
    out.unlink(missing_ok=True)
    extra = ["--logits-out", str(workdir / f"{mode}.logits.pt")] if logits else []
    script = [str(Path(__file__).resolve()), "rank", "--model", str(model), "--plan", str(plan)]
    script += ["--mode", mode, "--out", str(out), *extra]
    try:
        run = run_node_launchers(
            node_scripts=[script, script],
            ranks_per_node=2,
            workdir=workdir,
            timeout_s=1800,
            env={"PYTHONPATH": str(REPO_ROOT)},
            log_prefix=f"{mode}.",
        )
    except LauncherNotFound as exc:
        raise SystemExit(f"bench_memory: {exc}") from None
    if run.exit_codes != [0, 0] or not out.is_file():
        tails = [text[-3000:] for text in run.outputs]
        raise SystemExit(f"bench_memory: {mode} launch failed ({run.exit_codes}):\n" + "\n".join(tails))
    return json.loads(out.read_text())


def summarize(rows: list[dict]) -> dict[str, Any]:
    by_rank = sorted(rows, key=lambda r: r["rank"])
    for row in by_rank:
        share = row["own_share_bytes"]
        row["held_over_share"] = round(row["held_bytes"] / share, 4)
        row["read_over_share"] = round(row["bytes_read"] / share, 4)
        row["rss_growth_over_share"] = round(row["rss_growth_bytes"] / share, 3)
        row["rss_target_bytes"] = int(1.5 * share + 150 * MB)
        row["rss_within_target"] = row["rss_growth_bytes"] <= row["rss_target_bytes"]
    return {"ranks": by_rank}


def run_small(workdir: Path) -> dict[str, Any]:
    model = workdir / "mixtral-400mb"
    written = write_checkpoint(model, SMALL)
    plan = workdir / "plan.json"
    make_plan(plan, num_layers=SMALL["num_hidden_layers"])
    results: dict[str, Any] = {"checkpoint": {**SMALL, "num_experts": NUM_EXPERTS, **written}, "modes": {}}
    for mode in MODES:
        print(f"bench_memory: {mode} ...", flush=True)
        results["modes"][mode] = summarize(launch(mode, model=model, plan=plan, workdir=workdir))
    return results


def run_headline(workdir: Path) -> dict[str, Any]:
    import torch

    model = Path("/tmp/ds_grace_headline_7gb")
    try:
        begin = time.perf_counter()
        written = write_checkpoint(model, HEADLINE)
        write_s = time.perf_counter() - begin
        print(f"bench_memory: wrote {written['bytes'] / 1e9:.2f} GB in {write_s:.0f} s", flush=True)
        reference_out = workdir / "reference.logits.pt"
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "reference", "--model", str(model), "--out",
             str(reference_out)],
            check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
        reference = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"bench_memory: reference {reference}", flush=True)
        plan = workdir / "plan.headline.json"
        make_plan(plan, num_layers=HEADLINE["num_hidden_layers"])
        rows = launch("grace", model=model, plan=plan, workdir=workdir, logits=True)
        want = torch.load(reference_out)
        got = torch.load(workdir / "grace.logits.pt")
        diff = float((got - want).abs().max())
    finally:
        shutil.rmtree(model, ignore_errors=True)
    return {
        "checkpoint": {**HEADLINE, "num_experts": NUM_EXPERTS, **written, "write_s": round(write_s, 1)},
        "reference": {
            "how": "one process, one copy: load_whole_model + the transformers forward",
            **reference,
        },
        "grace": summarize(rows),
        "logits_max_abs_diff": diff,
        "logits_shape": list(want.shape),
        "logits_parity_1e-5": diff <= 1e-5,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="run", choices=("run", "rank", "reference"))
    parser.add_argument("--headline", action="store_true", help="the ~7 GB case instead of the 400 MB one")
    parser.add_argument("--workdir", default="/tmp/ds_grace_bench_memory")
    parser.add_argument("--model")
    parser.add_argument("--plan")
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--out")
    parser.add_argument("--logits-out")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "rank":
        code = rank_main(args)
        from ds_grace.comm.collectives import end_process

        end_process(code)  # past the interpreter's teardown (see there)
    if args.role == "reference":
        return reference_main(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.headline:
        results["headline"] = run_headline(workdir)
    else:
        results.update(run_small(workdir))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS, json.dumps(results, indent=1) + "\n")
    print(f"bench_memory: wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
