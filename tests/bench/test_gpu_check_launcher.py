"""The GPU check's entry point under the real `deepspeed` launcher, on the CPU: two nodes of one rank (one
launcher per node, --no_ssh), the world and topology taken from the launcher, every path measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_grace.cluster.node_launchers import run_node_launchers

REPO_ROOT = Path(__file__).resolve().parents[2]
LAYER_CHECK = REPO_ROOT / "benchmarks" / "gpu" / "layer_check.py"


@pytest.mark.multirank
@pytest.mark.slow
def test_layer_check_takes_its_world_from_the_launcher(tmp_path):
    out = tmp_path / "out"
    script = [str(LAYER_CHECK), "--device", "cpu", "--sizes", "tiny", "--models", "olmoe", "--out", str(out)]
    script += ["--tokens", "4", "64", "--warmup", "0", "--iters", "1"]
    run = run_node_launchers(
        node_scripts=[script, script], ranks_per_node=1, workdir=tmp_path, timeout_s=300,
        env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert run.exit_codes == [0, 0], run.shown(tail_chars=4000)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "passed" and report["world_size"] == 2
    assert report["topology"] == "2 nodes x 1 GPUs" and report["deepspeed_ep_size"] == {"olmoe": 2}
    variants = {row["variant"] for row in report["parity"]}
    assert variants == {"grace:flat", "grace:hierarchical", "grace:low-latency", "grace:auto", "deepspeed"}
    assert all(row["status"] == "passed" for row in report["parity"])
    assert {row["path"] for row in report["timing"] if row["variant"] == "grace:low-latency"} == {
        "low-latency"
    }
