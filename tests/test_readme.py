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


@pytest.mark.slow
@pytest.mark.multirank
def test_user_journey_block_runs_as_written(tmp_path):
    for shared in ("launch", "ds_configs"):
        (tmp_path / shared).symlink_to(ROOT / shared)
    script = "set -euo pipefail\n" + _journey()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = next(json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"cross_node'))
    assert metrics["cross_node_copies_per_token"] < metrics["vanilla_cross_node_copies_per_token"]
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"summary.md", "gpu_load.png"}
    assert "same tokens: True" in done.stdout
