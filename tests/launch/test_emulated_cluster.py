"""The emulated cluster end to end: the real deepspeed launcher per node, the probe, failures, teardown."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import LAUNCH_DIR, host_links_with_prefix, namespaces_with_prefix, requires_netns

from ds_grace.cluster.emulated_cluster import ClusterRun, run_emulated, run_local_ranks, running_in_group

PROBE = LAUNCH_DIR / "probe_collectives.py"
RATE_MBIT = 20.0
PAIRWISE_BYTES = 1024 * 1024


def _one_json_line_per_rank(run: ClusterRun) -> list[dict]:
    records = run.json_records()
    assert [len(r) for r in records] == [1] * run.topology.world_size, [r.stdout for r in run.ranks]
    return [r[0] for r in records]


def _assert_nothing_left(run: ClusterRun) -> None:
    stem = run.namespaces[-1].removesuffix("-br")
    assert run.teardown_problems == []
    assert namespaces_with_prefix(stem) == []
    assert host_links_with_prefix(stem) == []


@requires_netns
@pytest.mark.netns
@pytest.mark.multirank
@pytest.mark.slow
def test_probe_on_2x2_cluster_sees_the_link_rate_across_nodes_and_loopback_inside():
    run = run_emulated(
        PROBE,
        ["--pairwise-bytes", str(PAIRWISE_BYTES), "--iterations", "3"],
        nodes=2,
        ranks_per_node=2,
        rate_mbit=RATE_MBIT,
        timeout_s=150,
    )
    assert run.ok, "\n".join(run.summary_lines() + [line for r in run.ranks for line in r.stderr[-5:]])
    _assert_nothing_left(run)
    records = _one_json_line_per_rank(run)
    assert [r["rank"] for r in records] == [0, 1, 2, 3]
    assert [(r["node"], r["local_rank"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["status"] == "ok" and r["uneven_all_to_all"]["correct"] for r in records)

    pairwise = records[0]["pairwise"]
    inter_mbit = pairwise["inter_oneway"]["node_link_mbit_s"]
    intra_mbit = pairwise["intra"]["rank_mbit_s"]
    assert 0.75 * RATE_MBIT < inter_mbit < 1.05 * RATE_MBIT, pairwise
    assert intra_mbit > 10 * RATE_MBIT, pairwise
    # both directions loaded at once: each still carries a good share of the rate
    assert pairwise["inter_duplex"]["node_link_mbit_s"] > 0.3 * RATE_MBIT, pairwise

    # only cross-node bytes went through eth0: the intra-node phase (as large as each inter-node
    # phase) would otherwise have added about half again to what each node sent
    repeats = len(pairwise["inter_oneway"]["seconds"])
    uneven_rounds = records[0]["uneven_all_to_all"]["iterations"] + 1  # one warm-up round
    per_phase = 2 * PAIRWISE_BYTES * repeats  # two ranks per node
    for node, counters in enumerate(run.link_bytes):
        uneven = sum(r["uneven_all_to_all"]["send_bytes"]["inter"] for r in records if r["node"] == node)
        # node 0 sends in the one-way and the duplex phase, node 1 in the duplex phase only
        sent_across = uneven * uneven_rounds + per_phase * (2 if node == 0 else 1)
        assert sent_across < counters["tx_bytes"] < 1.1 * sent_across + 2_000_000, (node, counters)


def _event_times(run: ClusterRun) -> tuple[float, dict[int, dict]]:
    records = {r.rank: r.json_lines() for r in run.ranks}
    injected = [rec for recs in records.values() for rec in recs if rec["status"] == "injected_failure"]
    assert len(injected) == 1, records
    others = {rank: recs[-1] for rank, recs in records.items() if rank != injected[0]["rank"]}
    return injected[0]["time"], others


@requires_netns
@pytest.mark.netns
@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,ranks_per_node,failure_grace_s",
    [
        # rank 1 dies on node 0: its launcher stops rank 0, node 1's ranks see the broken connections
        ("kill", 2, None),
        # rank 1 hangs alone on node 1: rank 0 hits the collective timeout, node 1 is stopped by the tool
        ("hang", 1, 3.0),
    ],
)
def test_one_failing_rank_stops_every_other_rank_with_a_message_within_the_timeout(
    mode, ranks_per_node, failure_grace_s
):
    collective_timeout_s = 6.0
    fail_rank = 1
    run = run_emulated(
        PROBE,
        ["--iterations", "20", "--fail-rank", str(fail_rank), "--fail-after", "3", "--fail-mode", mode]
        + ["--collective-timeout-s", str(collective_timeout_s)],
        nodes=2,
        ranks_per_node=ranks_per_node,
        rate_mbit=RATE_MBIT,
        timeout_s=120,
        failure_grace_s=failure_grace_s,
    )
    summary = "\n".join(run.summary_lines())
    assert not run.ok and not run.timed_out, summary
    assert run.stopped_after_failure == (mode == "hang"), summary
    assert all(code != 0 for code in run.launcher_exit_codes), summary
    assert run.ranks[fail_rank].exit_code == (-signal.SIGKILL if mode == "kill" else 128 + signal.SIGTERM)
    failed_at, others = _event_times(run)
    assert len(others) == 2 * ranks_per_node - 1
    for rank, record in others.items():
        assert record["status"] in ("failed", "terminated"), (rank, record)
        assert record["message"].startswith(f"probe rank {rank}: ")
        assert record["message"] in run.ranks[rank].stderr, run.ranks[rank].stderr
        assert run.ranks[rank].exit_code not in (0, None), (rank, run.ranks[rank].exit_code)
        assert record["time"] - failed_at < collective_timeout_s + 5.0, (rank, record)
    if mode == "hang":
        # nobody died: only the collective timeout given to init_process_group can have stopped rank 0
        assert "Timed out waiting 6000ms" in others[0]["error"], others[0]
        assert others[0]["time"] - failed_at > collective_timeout_s - 1
    _assert_nothing_left(run)


@requires_netns
@pytest.mark.netns
@pytest.mark.slow
def test_sigterm_to_the_tool_tears_everything_down(tmp_path):
    sleeper = tmp_path / "sleep_forever.py"
    sleeper.write_text("import time\ntime.sleep(600)\n")
    tool = subprocess.Popen(
        [sys.executable, "-m", "ds_grace.cluster.emulated_cluster", "--quiet", "--", str(sleeper)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stem = f"dsg-{tool.pid}-"
    deadline = time.monotonic() + 60
    while len(namespaces_with_prefix(stem)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(namespaces_with_prefix(stem)) == 3, "the tool never built its 2-node network"
    time.sleep(4)  # let the launchers start their ranks
    node1 = [name for name in namespaces_with_prefix(stem) if name.endswith("-n1")][0]
    in_namespaces = subprocess.run(
        ["ip", "netns", "pids", node1], capture_output=True, text=True
    ).stdout.split()
    assert in_namespaces, "the node's launcher should be running inside its namespace"
    tool.send_signal(signal.SIGTERM)
    _, err = tool.communicate(timeout=60)
    assert tool.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err
    assert namespaces_with_prefix(stem) == []
    assert host_links_with_prefix(stem) == []
    for pid in in_namespaces:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


@pytest.mark.multirank
@pytest.mark.slow
def test_local_ranks_fallback_runs_the_probe_with_the_declared_topology():
    segments = "deepspeed_allreduce_buffer_*_127.0.0.1_*"  # DeepSpeed's CPU allreduce, one per local rank
    before = set(Path("/dev/shm").glob(segments))
    run = run_local_ranks(PROBE, ["--iterations", "2"], nodes=2, ranks_per_node=1, timeout_s=120)
    assert set(Path("/dev/shm").glob(segments)) <= before  # the probe starts DeepSpeed itself
    assert run.ok, "\n".join(run.summary_lines() + [line for r in run.ranks for line in r.stderr[-5:]])
    assert run.mode == "local" and run.link is None and run.namespaces == []
    records = _one_json_line_per_rank(run)
    # one local node to the launcher, two declared nodes to the script
    assert [(r["nodes"], r["ranks_per_node"], r["node"]) for r in records] == [(2, 1, 0), (2, 1, 1)]
    assert all(r["uneven_all_to_all"]["correct"] for r in records)
    assert json.loads(json.dumps(run.to_dict()))["ok"] is True


def test_running_in_group_counts_live_members_and_not_zombies():
    """Stopping a node waits for its group's running processes (a rank's wrapper writes its exit code
    after the launcher is gone), and an exited member that no one reaped yet does not hold it up."""
    member = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert running_in_group(member.pid)
        member.kill()
        deadline = time.monotonic() + 10
        while running_in_group(member.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running_in_group(member.pid)  # a zombie now: killed, not yet reaped
        assert Path(f"/proc/{member.pid}").exists()
    finally:
        member.kill()
        member.wait()
    assert not running_in_group(member.pid)
