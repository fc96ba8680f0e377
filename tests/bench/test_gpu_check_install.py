"""The GPU check's install, rehearsed: wheels built for this machine's Python by wheelhouse.sh, installed by
check.sh with --no-index --no-deps into a scratch folder, and the check run by `python -S` that sees only
those wheels and the packages the GPU machine has (a view of this interpreter's site-packages).

wheelhouse.sh downloads the carried wheels (pydantic, hjson, ...) through pip, from its cache or the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GPU_DIR = REPO_ROOT / "benchmarks" / "gpu"
CARRIED = {
    "deepspeed",
    "ds_grace",
    "pydantic",
    "pydantic_core",
    "hjson",
    "annotated_types",
    "typing_inspection",
}


@pytest.mark.slow
def test_wheels_install_and_the_check_runs_without_the_machines_missing_packages(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    wheels, view, site, out = (tmp_path / name for name in ("wheels", "view", "site", "out"))
    built = subprocess.run(
        ["bash", str(GPU_DIR / "wheelhouse.sh"), "--this-python", str(wheels)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    listed = (wheels / "MANIFEST.txt").read_text().splitlines()
    assert listed[0] == f"python {sys.version_info[0]}.{sys.version_info[1]}"
    assert {name.split("-")[0].lower() for name in listed[1:]} == CARRIED | {"typing_extensions"}
    assert "together" in built.stderr and "of 64.0 MiB" in built.stderr

    viewed = subprocess.run(
        [sys.executable, str(GPU_DIR / "carry.py"), "machine-view", str(view)], capture_output=True, text=True
    )
    assert viewed.returncode == 0, viewed.stderr
    assert (view / "torch").exists() and not any((view / name).exists() for name in CARRIED)

    # a scratch extension cache: a C++ op built against the scratch deepspeed never replaces the shared one
    env |= {
        "PYTHON": f"{sys.executable} -S",
        "PYTHONPATH": str(view),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
    }
    command = [
        "bash",
        str(GPU_DIR / "check.sh"),
        "--wheels",
        str(wheels),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    command += ["--site", str(site), "--", "--sizes", "tiny", "--models", "olmoe", "--tokens", "4", "64"]
    command += ["--warmup", "0", "--iters", "1"]
    checked = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert (
        report["status"] == "passed"
        and (out / "gpu_check.md").is_file()
        and (out / "gpu_check.log").is_file()
    )
    files = report["versions"]["module_files"]
    assert all(
        Path(files[name]).resolve().is_relative_to(site.resolve()) for name in ("ds_grace", "deepspeed")
    )
    assert {row["variant"] for row in report["timing"]} >= {"grace:flat", "grace:low-latency", "deepspeed"}
    assert "shm_comm_op built" not in checked.stdout + checked.stderr
