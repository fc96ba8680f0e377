"""Through the real `deepspeed` launcher (two nodes on this machine, --no_ssh, one launcher per node):
a rank that fails, or dies, before the start-up handshake stops every rank of the other node, which
names it (rank, host, error) instead of waiting out communication.timeout_s (300 s, the default, here).
Nodes launched with different prompts or generation settings: test_reliability_launcher.py."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from ds_grace.cluster.node_launchers import NodeLaunch, run_node_launchers
from ds_grace.models import tiny_checkpoint
from ds_grace.trace import synthetic

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATE = REPO_ROOT / "launch" / "generate.py"
KILL_RANK = Path(__file__).with_name("startup_kill_rank.py")
HOST = re.escape(socket.gethostname())
# well under communication.timeout_s (300 s): a launch that waits for it fails with TimeoutExpired
LAUNCH_TIMEOUT_S = 200


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    model = tiny_checkpoint("qwen3_moe", root / "qwen3_moe", seed=3)
    synthetic(num_layers=2, num_experts=8, top_k=4, num_tokens=256, seed=3).save(root / "trace.npz")
    config = root / "grace.json"
    config.write_text(json.dumps({"dtype": "fp32", "grace": {"profile": {"trace": str(root / "trace.npz")}}}))
    return model, config


def _generate(model: Path, config: Path, *extra: str) -> list[str]:
    return [str(GENERATE), "--model", str(model), "--ds-config", str(config), "--warmup", "0", *extra]


def _launch(tmp_path: Path, scripts: list[list[str]], *, ranks_per_node: int, **env: str) -> NodeLaunch:
    return run_node_launchers(
        node_scripts=scripts,
        ranks_per_node=ranks_per_node,
        workdir=tmp_path,
        timeout_s=LAUNCH_TIMEOUT_S,
        env={"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT), **env},
    )


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def _truncated_copy(model: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "truncated"
    shutil.copytree(model, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return copy, weights


@pytest.mark.slow
def test_a_truncated_shard_on_one_node_stops_the_other_node_naming_rank_host_and_error(served, tmp_path):
    model, config = served
    broken, weights = _truncated_copy(model, tmp_path)
    prompt = ["--prompt", "a", "--max-new-tokens", "2"]
    run = _launch(
        tmp_path, [_generate(model, config, *prompt), _generate(broken, config, *prompt)], ranks_per_node=2
    )
    shown = run.shown(tail_chars=3000)
    assert run.exit_codes == [2, 2], shown
    damaged = rf"checkpoint file \({re.escape(str(weights))}, \d+ bytes\) is not a whole safetensors file"
    for node, text in enumerate(run.outputs):
        assert "Traceback" not in text and "DistStoreError" not in text, shown
        lines = _error_lines(text)
        assert len(lines) == 2, shown  # one per rank of the node, each with its rank
        for line in lines:
            if node == 1:  # its own error
                assert re.match(rf"error: rank [23] \(host {HOST}\): {damaged}", line), shown
            else:  # the failed rank, its host and its error
                assert re.match(
                    rf"error: rank [01] \(host {HOST}\): rank [23] \(host {HOST}\) failed before the "
                    rf"start-up handshake: {damaged}",
                    line,
                ), shown


@pytest.mark.slow
def test_a_missing_plan_on_one_node_stops_the_other_node(served, tmp_path):
    model, config = served
    prompt = ["--prompt", "a", "--max-new-tokens", "2"]
    missing = tmp_path / "missing-plan.json"
    run = _launch(
        tmp_path,
        [_generate(model, config, *prompt), _generate(model, config, *prompt, "--plan", str(missing))],
        ranks_per_node=1,
    )
    shown = run.shown(tail_chars=3000)
    assert run.exit_codes == [2, 2], shown
    [line] = _error_lines(run.outputs[0])
    assert line.startswith(f"error: rank 0 (host {socket.gethostname()}): rank 1 (host "), shown
    assert "failed before the start-up handshake" in line and str(missing) in line, shown
    [own] = _error_lines(run.outputs[1])
    assert own.startswith("error: rank 1 (host ") and str(missing) in own, shown


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "join_timeout_s", "why"),
    [
        # the killed rank never joins: rank 0 waits out the join deadline, short here
        ("before-join", "4", r"it never joined the start-up rendezvous at 127\.0\.0\.1:\d+ within 4 s"),
        # the killed rank joins first (after its imports): a deadline with room for them
        ("after-join", "10", r"its heartbeat stopped for 10 s"),
    ],
)
def test_a_rank_killed_during_start_up_is_named_within_seconds(served, tmp_path, when, join_timeout_s, why):
    model, config = served
    run = _launch(
        tmp_path,
        [_generate(model, config, "--prompt", "a"), [str(KILL_RANK), when]],
        ranks_per_node=1,
        DS_GRACE_JOIN_TIMEOUT_S=join_timeout_s,
    )
    shown = run.shown(tail_chars=3000)
    assert run.exit_codes[0] == 1 and run.exit_codes[1] != 0, shown
    [line] = _error_lines(run.outputs[0])
    assert re.match(
        rf"error: rank 0 \(host {HOST}\): rank 1 was lost before the start-up handshake: {why}", line
    )
    assert "Traceback" not in run.outputs[0], shown


# ---- the rendezvous in one process (ranks as objects on one store) ----


def _join(port: int, rank: int, world_size: int):
    from ds_grace.comm.rendezvous import StartupRendezvous

    return StartupRendezvous.join(
        master_addr="127.0.0.1",
        master_port=port,
        rank=rank,
        world_size=world_size,
        join_timeout_s=3,
        beat_s=0.1,
        dead_after_s=1,
    )


def test_rendezvous_names_the_failed_rank_with_its_host_and_error():
    from ds_grace.cluster.node_launchers import free_port
    from ds_grace.comm.rendezvous import PeerFailedError, PeerLostError
    from ds_grace.models import CheckpointError

    port = free_port()
    ranks = [_join(port, rank, 3) for rank in range(3)]
    try:
        ranks[2].fail(
            CheckpointError("checkpoint file (x) is not a whole safetensors file"), input_error=True
        )
        for survivor in ranks[:2]:
            with pytest.raises(PeerFailedError) as info:
                survivor.wait_ready()
            assert str(info.value) == (
                f"rank 2 (host {socket.gethostname()}) failed before the start-up handshake: checkpoint file (x) "
                "is not a whole safetensors file"
            )
        # a second failure, seen by rank 2, which has not left (survivors stop watching when they leave):
        # the lowest failed rank is named, a crash as PeerLostError
        ranks[1].fail(RuntimeError("a crash"), input_error=False)
        pattern = r"^rank 1 \(host \S+\) failed before the start-up handshake: a crash"
        with pytest.raises(PeerLostError, match=pattern):
            for _ in range(100):
                problem = ranks[2].problem()
                if problem is not None:
                    raise problem
                time.sleep(0.05)
        assert [failure.rank for failure in ranks[2].failures()] == [2, 1]
    finally:
        for rank in ranks:
            rank.close()


def test_rendezvous_names_a_rank_that_never_joined_or_stopped_beating():
    from ds_grace.cluster.node_launchers import free_port
    from ds_grace.comm.rendezvous import PeerLostError

    port = free_port()
    alone = _join(port, 0, 2)
    try:
        with pytest.raises(
            PeerLostError, match=r"^rank 1 was lost before the start-up handshake: it never joined"
        ):
            alone.wait_ready()
    finally:
        alone.close()
    port = free_port()
    first, second = _join(port, 0, 2), _join(port, 1, 2)
    try:
        second.close()  # stops beating, as a killed rank
        with pytest.raises(
            PeerLostError, match=r"^rank 1 was lost before the start-up handshake: its heartbeat"
        ):
            first.wait_ready()
    finally:
        first.close()


@pytest.mark.slow
def test_a_launch_that_fails_after_the_process_group_leaves_no_shared_memory(tmp_path):
    """DeepSpeed's CPU backend maps a /dev/shm segment per rank when the job's ranks share a machine and
    never unlinks it; ranks that fail before init_inference's handshake (here: DeepSpeed started alone)
    cannot unlink theirs safely, so run_node_launchers unlinks every rank's once its launchers are gone."""
    script = tmp_path / "fail_after_init.py"
    script.write_text(
        "import os, sys\n"
        "import deepspeed\n"
        "from ds_grace.comm.shared_memory import shared_memory_name\n"
        "deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)  # no barrier, no unlink\n"
        "name = shared_memory_name(int(os.environ['RANK']), os.environ)\n"
        "if name.exists():  # one file per rank: the ranks share the launcher's stdout\n"
        f"    open('{tmp_path}/segment' + os.environ['RANK'], 'w').write(str(name))\n"
        "sys.exit(3)\n"
    )
    launch = _launch(tmp_path, [[str(script)]], ranks_per_node=2)
    names = [
        Path((tmp_path / f"segment{rank}").read_text())
        for rank in range(2)
        if (tmp_path / f"segment{rank}").exists()
    ]
    assert launch.exit_codes != [0] and len(names) == 2, launch.outputs[0][-2000:]
    assert not any(name.exists() for name in names)
