"""The README's commands are real: the user journey block runs as written, and every `ds-grace`
subcommand and make target it names exists."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from ds_grace.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _journey() -> str:
    block = README.split("<!-- journey:start -->", 1)[1].split("<!-- journey:end -->", 1)[0]
    return block.split("```bash", 1)[1].split("```", 1)[0]


def test_every_ds_grace_subcommand_in_readme_exists():
    named = set(re.findall(r"ds-grace ([a-z][a-z-]+)", README))
    assert named, "the README names ds-grace subcommands"
    assert named <= set(COMMANDS), f"README names unknown subcommands: {sorted(named - set(COMMANDS))}"


def test_quick_start_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile lacks target {target}"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_console_script_help_and_check_config():
    shown = subprocess.run(["ds-grace", "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0
    assert all(name in shown.stdout for name in COMMANDS)
    checked = subprocess.run(
        ["ds-grace", "check-config", str(ROOT / "ds_configs" / "vanilla_moe.json"), "--world-size", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["grace"]["topology"] == {"num_nodes": 1, "gpus_per_node": 4}


def _python_example() -> str:
    block = README.split("<!-- python-example:start -->", 1)[1].split("<!-- python-example:end -->", 1)[0]
    return block.split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.timeout(1500)  # two launches (the journey's and the Python example's): above the 600 s default
def test_user_journey_block_runs_as_written_from_any_directory(tmp_path):
    """The journey from a directory outside the repository, REPO naming the clone: its files land in the
    folder it names; then the README's Python example runs as written on them under the launcher."""
    script = "set -euo pipefail\n" + _journey()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPO": str(ROOT)}
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = next(json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"cross_node'))
    assert metrics["cross_node_copies_per_token"] < metrics["vanilla_cross_node_copies_per_token"]
    assert [p.name for p in tmp_path.iterdir()] == ["grace-journey"]
    journey = tmp_path / "grace-journey"
    assert {"tiny-mixtral", "calib.txt", "trace.npz", "plan.json", "report"} <= {
        p.name for p in journey.iterdir()
    }
    assert {p.name for p in (journey / "report").iterdir()} >= {"summary.md", "gpu_load.png"}
    assert "same tokens: True" in done.stdout
    (journey / "serve.py").write_text(_python_example())
    launch = (
        f'deepspeed --hostfile "{ROOT}/launch/hostfile.example" --no_ssh --node_rank 0 '
        "--master_addr 127.0.0.1 --master_port 29534 serve.py"
    )
    served = subprocess.run(
        ["bash", "-c", launch], cwd=journey, env=env, capture_output=True, text=True, timeout=400
    )
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
    # one print per rank, each with the same total over all ranks (the ranks share the launcher's stdout,
    # so two ranks' lines may run together: the totals are read wherever they are)
    totals = re.findall(r"bytes across nodes: (\d+)", served.stdout)
    assert len(totals) == 4 and len(set(totals)) == 1 and int(totals[0]) > 0, served.stdout[-3000:]
