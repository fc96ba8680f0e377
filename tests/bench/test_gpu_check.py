"""The GPU check rehearsed on the CPU: benchmarks/gpu/layer_check.py end to end (gloo, world of 1), its
measuring helpers, its reference layer, its exit status, and the shape of check.sh and wheelhouse.sh."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
GPU_DIR = REPO_ROOT / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU_DIR))

import layer_check  # noqa: E402
import measures  # noqa: E402
from measures import NOT_ON_CPU  # noqa: E402

from ds_grace.moe.gate import GraceGate  # noqa: E402
from ds_grace.online.replay import reference_output  # noqa: E402

TINY_TOKENS = ["4", "64", "512", "1024"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, str(GPU_DIR / "layer_check.py"), "--device", "cpu", "--sizes", "tiny"]
    command += ["--out", str(out), "--tokens", *TINY_TOKENS, "--warmup", "0", "--iters", "1"]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    report_path = out / "gpu_check.json"
    assert report_path.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    return run, json.loads(report_path.read_text()), out


def test_cpu_rehearsal_passes_parity_on_every_path(rehearsal):
    run, report, _ = rehearsal
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert report["status"] == "passed" and report["world_size"] == 1 and report["errors"] == []
    assert report["not_measured"] == [] and report["failed"] == []
    # DeepSpeed's shared-memory op is not compiled (nor loaded): a world of gloo ranks needs none
    assert "shm_comm_op built" not in run.stdout + run.stderr
    for model in ("olmoe", "mixtral"):
        for tokens in map(int, TINY_TOKENS):
            rows = [r for r in report["parity"] if r["model"] == model and r["tokens"] == tokens]
            seen = {(r["variant"], r["against"]) for r in rows}
            expected = {("deepspeed", "reference")}
            paths = ["flat"] + (  # one node: hierarchical is the flat hop, not a variant of its own
                ["low-latency"] if tokens <= layer_check.LOW_LATENCY_MAX_TOKENS else []
            )
            for path in paths:
                expected |= {(f"grace:{path}", "reference"), (f"grace:{path}", "deepspeed")}
            assert seen == expected, (model, tokens, seen)
            assert all(r["status"] == "passed" and r["max_abs_diff"] <= r["tolerance"] for r in rows)
            # each GraceMoE variant took the path it stands for
            assert all(
                r["path"] == r["variant"].split(":")[1] for r in rows if r["variant"].startswith("grace:")
            )


def test_cpu_rehearsal_times_and_counts_every_variant(rehearsal):
    _, report, out = rehearsal
    variants = {(r["model"], r["tokens"], r["variant"]) for r in report["timing"]}
    assert len(variants) == len(report["timing"])
    for row in report["timing"]:
        assert row["median_ms"] > 0 and row["iters"] == 1 and row["reference_over_variant"] > 0
        assert isinstance(row["aten_ops"], int) and row["aten_ops"] > 0
        # the experts take the transformers families' form: stacked for grouped GEMMs (bf16 on the CPU)
        assert row["grouped_slots"] is (True if row["variant"].startswith("grace:") else None), row
        for cuda_only in ("host_syncs", "kernels", "launch_calls", "memcpy_memset", "gpu_idle_share"):
            assert row[cuda_only] == NOT_ON_CPU, (cuda_only, row)
    assert {(r["model"], r["variant"]) for r in report["timing"] if r["tokens"] == 4} == {
        (m, v) for m in ("olmoe", "mixtral")
        for v in ("grace:flat", "grace:low-latency", "deepspeed", "reference")
    }  # fmt: skip
    graph = [(r["model"], r["tokens"], r["status"]) for r in report["cuda_graph"]]
    assert graph == [(m, t, NOT_ON_CPU) for m in ("olmoe", "mixtral") for t in layer_check.GRAPH_TOKENS]
    table = (out / "gpu_check.md").read_text()
    assert "**passed**" in table and table.count("| grace:low-latency |") == 2 * 3 + 2 * len(
        layer_check.GRAPH_TOKENS
    )
    assert report["versions"]["module_files"]["ds_grace"].startswith(str(REPO_ROOT))


def test_cuda_without_a_gpu_is_a_named_failed_step(tmp_path):
    command = [sys.executable, str(GPU_DIR / "layer_check.py"), "--device", "cuda", "--out", str(tmp_path)]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "error: step 'device' failed: --device cuda but torch.cuda.is_available() is False" in run.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["status"] == "incomplete" and report["parity"] == []


def _parity(variant: str, status: str) -> dict:
    return {"model": "olmoe", "tokens": 4, "variant": variant, "against": "reference", "status": status}


@pytest.mark.parametrize(
    ("parity", "graph", "errors", "not_measured", "status"),
    [
        ([_parity("grace:flat", "passed")], [{"status": NOT_ON_CPU}], [], [], 0),
        ([_parity("grace:flat", "failed")], [], [], [], 1),
        (
            [_parity("grace:flat", "passed")],
            [{"model": "olmoe", "tokens": 4, "variant": "x", "status": "failed"}],
            [],
            [],
            1,
        ),
        ([_parity("grace:flat", "failed")], [], ["step 'x' failed: y"], [], 1),
        ([_parity("grace:flat", "passed")], [], ["step 'x' failed: y"], [], 2),
        ([_parity("grace:flat", "passed")], [], [], ["mixtral 4 tokens (time budget)"], 2),
    ],
)
def test_exit_status(parity, graph, errors, not_measured, status):
    report = {"parity": parity, "cuda_graph": graph, "errors": errors, "not_measured": not_measured}
    assert layer_check.exit_status(report) == status
    assert bool(report["failed"]) == (status == 1)


def test_parity_rows_flag_a_wrong_output():
    torch.manual_seed(0)
    reference = torch.randn(8, 16)
    outputs = {"reference": reference, "deepspeed": reference.clone(), "grace:flat": reference + 0.5}
    paths = {"reference": "reference", "deepspeed": "deepspeed", "grace:flat": "flat"}
    rows = layer_check.parity_rows({"model": "m", "tokens": 8}, outputs, paths)
    status = {(r["variant"], r["against"]): r["status"] for r in rows}
    assert status == {
        ("deepspeed", "reference"): "passed",
        ("grace:flat", "reference"): "failed",
        ("grace:flat", "deepspeed"): "failed",
    }
    bound = layer_check.RELATIVE_TOLERANCE * max(1.0, float(reference.abs().max()))
    assert all(r["tolerance"] == pytest.approx(bound) for r in rows)


@pytest.mark.parametrize(("experts", "k", "tokens"), [(8, 2, 37), (16, 4, 5), (6, 1, 0)])
def test_sorted_reference_equals_the_per_expert_reference(experts, k, tokens):
    torch.manual_seed(experts * 10 + k)
    hidden = 12
    modules = [
        layer_check.swiglu_expert(hidden, 20, device=torch.device("cpu"), dtype=torch.float32)
        for _ in range(experts)
    ]
    for seed, module in enumerate(modules):
        layer_check.seeded_(module, seed=seed, device=torch.device("cpu"))
    gate = GraceGate(hidden, experts, k)
    x_TD = torch.randn(tokens, hidden)
    with torch.no_grad():
        routing = gate(x_TD)
        expected = reference_output(modules, x_TD, routing.topk_ids_TK, routing.topk_weights_TK)
        got = layer_check.SortedReference(gate, modules)(x_TD)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("world", "experts", "slots"),
    [
        (1, 4, [[0, 1, 2, 3]]),
        (2, 8, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (4, 2, [[0], [1], [0], [1]]),
        (3, 4, [[0, 1], [2, 3], [0, 1]]),
    ],
)
def test_spread_plan(world, experts, slots):
    plan = layer_check.spread_plan(experts, world)
    assert [list(s) for s in plan.slots] == slots
    assert all(e in plan.slots[plan.primary[e]] for e in range(experts))


def test_idle_share_is_the_uncovered_part_of_the_window():
    assert measures.idle_share([], start=0.0) == 1.0
    assert measures.idle_share([(0.0, 10.0)], start=0.0) == 0.0
    # busy 2-4 and 3-6 (overlapping: 2-6) and 8-10 inside the window 0-10: 6 of 10 busy
    assert measures.idle_share([(3.0, 6.0), (8.0, 10.0), (2.0, 4.0)], start=0.0) == pytest.approx(0.4)
    # an interval before the window's start counts only from the start
    assert measures.idle_share([(-5.0, 1.0), (4.0, 5.0)], start=0.0) == pytest.approx(0.6)


def test_sync_warnings_are_counted_by_their_message():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(measures.SYNC_WARNING, UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
        warnings.warn(measures.SYNC_WARNING, UserWarning, stacklevel=1)
    assert measures.count_sync_warnings(str(w.message) for w in caught) == 2


def test_cpu_measures():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    cpu = torch.device("cpu")
    assert measures.host_syncs(lambda: layer(x), device=cpu) == NOT_ON_CPU
    counts = measures.profile_forward(lambda: layer(x), device=cpu)
    assert counts["aten_ops"] == 1  # aten::linear; its addmm is nested
    assert counts["kernels"] == counts["gpu_idle_share"] == NOT_ON_CPU
    timing = measures.time_forward(lambda: layer(x), device=cpu, warmup=1, max_iters=4, budget_s=1e9)
    assert timing.iters == 4 and timing.median_ms > 0
    assert measures.time_forward(lambda: layer(x), device=cpu, warmup=0, max_iters=4, budget_s=0.0).iters == 1


def _gpu_command(readme: str) -> str:
    match = re.search(r"^bash benchmarks/gpu/check\.sh .*$", readme, flags=re.MULTILINE)
    assert match, "benchmarks/README.md shows no one-line `bash benchmarks/gpu/check.sh ...` command"
    return match.group(0)


def test_scripts_parse_and_the_gpu_command_fits_one_line():
    for script in ("check.sh", "wheelhouse.sh"):
        run = subprocess.run(["bash", "-n", str(GPU_DIR / script)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    command = _gpu_command((REPO_ROOT / "benchmarks" / "README.md").read_text())
    assert len(command) < 2000 and "--wheels benchmarks/gpu/wheels" in command and '--out "$OUT"' in command
    assert "benchmarks/gpu/wheels/" in (REPO_ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize(
    ("args", "step", "detail"),
    [
        (["--out", "OUT"], "args", "--wheels DIR and --out DIR are required"),
        (
            ["--wheels", "WHEELS", "--out", "OUT", "--device", "tpu"],
            "args",
            "--device (tpu) must be cpu or cuda",
        ),
        (["--wheels", "WHEELS", "--out", "OUT"], "wheels", "MANIFEST.txt is missing"),
        (["--wheels", "WHEELS", "--out", "OUT", "--bogus"], "args", "unknown argument '--bogus'"),
    ],
)
def test_check_sh_names_the_failed_step(tmp_path, args, step, detail):
    (tmp_path / "WHEELS").mkdir()
    run = subprocess.run(
        ["bash", str(GPU_DIR / "check.sh"), *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 2
    assert f"error: step '{step}' failed: " in run.stderr and detail in run.stderr, run.stderr


def test_check_sh_refuses_wheels_for_another_python_or_a_torch_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "MANIFEST.txt").write_text("python 2.7\nx-1-py3-none-any.whl\n")
    command = ["bash", str(GPU_DIR / "check.sh"), "--wheels", str(wheels), "--out", str(tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 2 and "step 'wheels' failed: the wheels are for Python 2.7" in run.stderr
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    (wheels / "MANIFEST.txt").write_text(f"python {here}\ntorch-2.11.0-cp312-cp312-linux_x86_64.whl\n")
    (wheels / "torch-2.11.0-cp312-cp312-linux_x86_64.whl").write_text("")
    run = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}
    )
    assert run.returncode == 2 and "would replace the machine's own build" in run.stderr, run.stderr
