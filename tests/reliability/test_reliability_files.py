"""Files are written atomically: a write that fails or is killed half-way leaves the old file intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ds_grace.files import FileWriteError, atomic_writer, write_text_atomic
from ds_grace.planning.plan import GracePlan, LayerPlan
from ds_grace.topology import Topology
from ds_grace.trace import load_trace, synthetic

REPO_ROOT = Path(__file__).resolve().parents[2]


def _plan(num_experts: int = 8, num_layers: int = 2) -> GracePlan:
    topology = Topology(2, 2)
    per_rank = num_experts // topology.world_size
    layer = LayerPlan.from_lists(
        slots=[list(range(r * per_rank, (r + 1) * per_rank)) for r in range(topology.world_size)],
        primary=[e // per_rank for e in range(num_experts)],
    )
    return GracePlan(topology=topology, layers=(layer,) * num_layers)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_failed_plan_write_keeps_the_old_plan(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    old = _plan()
    old.save(path)
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(FileWriteError, match=rf"cannot write {path}: No space left on device"):
        _plan(num_layers=3).save(path)
    assert path.read_bytes() == before and GracePlan.load(path) == old
    assert _leftovers(tmp_path) == []


def test_failed_trace_write_keeps_the_old_trace(tmp_path, monkeypatch):
    path = tmp_path / "trace.npz"
    old = synthetic(num_layers=2, num_experts=8, top_k=2, num_tokens=64, seed=1)
    old.save(path)
    before = path.read_bytes()
    real_savez = np.savez

    def savez_then_fail(handle, **arrays):
        real_savez(handle, **arrays)  # the bytes are written, the rename must not happen
        raise OSError(27, "File too large")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(FileWriteError, match="File too large"):
        synthetic(num_layers=3, num_experts=8, top_k=2, num_tokens=64, seed=2).save(path)
    assert path.read_bytes() == before
    assert load_trace(path).fingerprint == old.fingerprint
    assert _leftovers(tmp_path) == []


def test_an_error_inside_the_block_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text('{"old": true}')
    with pytest.raises(RuntimeError, match="boom"), atomic_writer(path) as handle:
        handle.write(b'{"new": ')
        raise RuntimeError("boom")
    assert path.read_text() == '{"old": true}' and _leftovers(tmp_path) == []


def test_write_into_a_missing_folder_or_onto_a_folder_names_the_target(tmp_path):
    with pytest.raises(FileWriteError, match=rf"cannot write {tmp_path / 'no' / 'p.json'}: No such file"):
        write_text_atomic(tmp_path / "no" / "p.json", "{}")
    with pytest.raises(FileWriteError, match=rf"cannot write {tmp_path}: is a directory"):
        write_text_atomic(tmp_path, "{}")


def test_new_file_gets_the_usual_permissions(tmp_path):
    write_text_atomic(tmp_path / "a.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask


def _child(code: str, tmp_path: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_killed_mid_write_keeps_the_old_plan(tmp_path):
    path = tmp_path / "plan.json"
    _plan().save(path)
    before = path.read_bytes()
    child = _child(
        """
        import sys, time
        from pathlib import Path
        from ds_grace.files import atomic_writer
        with atomic_writer(Path(sys.argv[1]) / "plan.json") as handle:
            handle.write(b'{"format_version": 1, "layers": [')
            handle.flush()
            print("writing", flush=True)
            time.sleep(60)
        """,
        tmp_path,
    )
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert path.read_bytes() == before
    GracePlan.load(path)


def test_file_size_limit_keeps_the_old_plan(tmp_path):
    """`ulimit -f`: a plan larger than the limit fails to write; the smaller old plan survives."""
    import resource

    path = tmp_path / "plan.json"
    _plan().save(path)
    before = path.read_bytes()
    limit = len(before) + 512

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    child = _child(
        """
        import sys
        from pathlib import Path
        from ds_grace.planning.plan import GracePlan, LayerPlan
        from ds_grace.topology import Topology
        layer = LayerPlan.from_lists(slots=[list(range(r * 16, r * 16 + 16)) for r in range(4)],
                                     primary=[e // 16 for e in range(64)])
        try:
            GracePlan(topology=Topology(2, 2), layers=(layer,) * 8).save(Path(sys.argv[1]) / "plan.json")
        except OSError as exc:
            print(f"error: {exc}")
            sys.exit(2)
        """,
        tmp_path,
        preexec_fn=limit_file_size,
    )
    out, err = child.communicate(timeout=120)
    assert child.returncode == 2, err
    assert out.strip() == f"error: cannot write {path}: File too large"
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_report_and_benchmark_writers_are_atomic():
    """Every writer of the project goes through ds_grace.files (none writes its target in place)."""
    offenders = []
    for folder in ("ds_grace", "benchmarks"):
        for source in (REPO_ROOT / folder).rglob("*.py"):
            text = source.read_text()
            for needle in (".write_text(", "json.dump(", "np.savez(path", "savefig(path"):
                if needle in text and source.name != "files.py":
                    offenders.append(f"{source.relative_to(REPO_ROOT)}: {needle}")
    allowed = {
        "benchmarks/bench.py: .write_text(",  # README table update; a scratch marker in a run's workdir
        "benchmarks/simulator.py: .write_text(",  # README table update
        "benchmarks/bench_memory.py: .write_text(",  # /proc/self/clear_refs, a scratch checkpoint index
        "benchmarks/workloads.py: np.savez(path",  # scratch replay batches inside a run's workdir
        "ds_grace/cluster/emulated_cluster.py: .write_text(",  # a run's scratch hostfile
        "ds_grace/cluster/node_launchers.py: .write_text(",  # a run's scratch hostfile
        "ds_grace/cluster/rank_exec.py: .write_text(",  # a rank's exit code in the run's log folder
    }
    assert sorted(set(offenders) - allowed) == []
