"""The installed package outside a checkout: a wheel of this tree, installed into a temporary folder and
run from another directory with only that folder (not the repository) on sys.path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("ds_grace", "benchmarks", "setup.py", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding ds_grace installed from a wheel built off a copy of the sources."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy2(path, source / name)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True
    )
    site = root / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))], check=True
    )
    return site


def _run(site: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_installed_package_is_the_one_imported(installed, tmp_path):
    done = _run(installed, tmp_path, "-c", "import ds_grace, benchmarks.bench; print(ds_grace.__file__)")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]).is_relative_to(installed)


@pytest.mark.parametrize("command", ["demo", "cluster", "bench", "check-config"])
def test_every_command_parses_outside_a_checkout(installed, tmp_path, command):
    done = _run(installed, tmp_path, "-m", "ds_grace.cli", command, "--help")
    assert done.returncode == 0, done.stderr
    assert f"usage: ds-grace {command}" in done.stdout


@pytest.mark.multirank
def test_cluster_runs_ranks_from_the_installed_package(installed, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            import ds_grace
            from ds_grace.cluster.emulated_cluster import declared_topology
            print("rank", os.environ["RANK"], declared_topology(), ds_grace.__file__, flush=True)
            """
        )
    )
    done = _run(
        installed, tmp_path, "-m", "ds_grace.cli", "cluster", "--mode", "local", "--nodes", "2",
        "--ranks-per-node", "1", "--", str(script),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for rank in (0, 1):
        assert f"rank {rank} " in done.stdout, done.stdout
    assert str(installed) in done.stdout


def test_bench_outside_a_checkout_says_it_needs_one(installed, tmp_path):
    done = _run(installed, tmp_path, "-m", "ds_grace.cli", "bench", "--quick")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ds-grace bench rewrites a checkout's")
