"""A lost rank is named: the survivors' error says which rank (host, pid) stopped answering and that the
others were shut down, as far as it can be known (peers on the same host are looked up by process)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import ds_grace.comm.collectives as collectives
from ds_grace.cli import report_failure
from ds_grace.comm.local_ranks import RankContext, RankFailure, run_on_ranks
from ds_grace.topology import Topology

GLOO_TEXT = (
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1664. "
    "This is typically caused by a remote worker crashing."
)


@pytest.fixture
def peers(monkeypatch):
    """A handshake's table with this process as rank 0, a finished process as rank 1, a stopped one as
    rank 2 and a running one as rank 3, all on this host, and rank 4 on another host."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(stopped.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while collectives._process_state(stopped.pid) != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    host = socket.gethostname()
    table = [
        {"rank": 0, "node": 0, "host": host, "pid": os.getpid()},
        {"rank": 1, "node": 0, "host": host, "pid": gone.pid},
        {"rank": 2, "node": 0, "host": host, "pid": stopped.pid},
        {"rank": 3, "node": 0, "host": host, "pid": running.pid},
        {"rank": 4, "node": 1, "host": "elsewhere", "pid": 1},
    ]
    monkeypatch.setattr(collectives, "_PEERS", table)
    yield table, (gone, stopped, running)
    for proc in (stopped, running):
        proc.kill()
        proc.wait()


def test_the_survivors_error_names_the_lost_and_the_stopped_rank(peers, capsys):
    table, (gone, stopped, _) = peers
    report = collectives.lost_rank_report(RuntimeError(GLOO_TEXT), wait_s=0)
    host = socket.gethostname()
    assert report.startswith(
        f"rank 1 (host {host}, pid {gone.pid}) stopped answering: its process exited; "
        f"rank 2 (host {host}, pid {stopped.pid}) stopped answering: its process is stopped (not running). "
        "Rank 0 stopped serving too; the launcher shuts down the remaining ranks (collective error: "
    )
    assert report_failure(RuntimeError(GLOO_TEXT)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: {report}"


def test_a_rank_lost_on_another_host_is_said_to_be_there(peers):
    table, _ = peers
    del table[1:3]  # every rank of this host runs
    report = collectives.lost_rank_report(
        RuntimeError("Timed out waiting 30000ms for recv operation"), wait_s=0
    )
    assert report.startswith(
        f"a rank on another host stopped answering (every rank on {socket.gethostname()} still runs; "
        "ranks [4] on elsewhere cannot be checked from here)"
    )


def test_other_errors_are_not_called_a_lost_rank(peers):
    assert collectives.lost_rank_report(RuntimeError("shape mismatch"), wait_s=0) is None
    assert collectives.lost_rank_report(ValueError(GLOO_TEXT), wait_s=0) is None
    with pytest.raises(AssertionError):  # a bug is not reported as input or a lost rank: it is re-raised
        if report_failure(AssertionError(GLOO_TEXT)) is None:
            raise AssertionError(GLOO_TEXT)


def _killed_mid_collective(ctx: RankContext) -> str:
    """Handshake, then rank 1 is SIGKILLed while the others are in an all-reduce."""
    identity = {
        "rank": ctx.rank,
        "node": ctx.topology.node_of(ctx.rank),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    collectives.check_ranks_agree({"settings": 1}, identity)
    if ctx.rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.all_reduce(torch.ones(1))
    return "unreachable"


@pytest.mark.multirank
def test_a_killed_rank_is_named_and_the_others_are_shut_down():
    begin = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_on_ranks(_killed_mid_collective, topology=Topology(1, 3), timeout_s=120, collective_timeout_s=60)
    message = str(info.value)
    assert message.startswith(
        "rank 1 (killed by signal 9 (SIGKILL)) stopped answering on 1 nodes x 3 GPUs; the other ranks (0, 2) "
        "were shut down"
    ), message
    assert re.search(r"rank 1 \(host \S+, pid \d+\) stopped answering: killed by signal 9", message)
    assert time.monotonic() - begin < 50, "a lost rank must not wait for the collective timeout"
