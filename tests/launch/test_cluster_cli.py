"""Command line, the no-root path and argument checks of the emulated cluster (no processes)."""

import os

import pytest
from cluster_helpers import LAUNCH_DIR
from probe_collectives import parse_args, uneven_counts

from ds_grace import cli
from ds_grace.cluster import cluster_network, emulated_cluster
from ds_grace.cluster.emulated_cluster import (
    ClusterRun,
    EmulationUnavailable,
    declared_topology,
    netns_unavailable_reason,
    run_emulated,
    run_local_ranks,
)
from ds_grace.topology import Topology

PROBE = LAUNCH_DIR / "probe_collectives.py"


@pytest.fixture
def not_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)


def test_without_root_the_reason_is_given(not_root):
    assert netns_unavailable_reason() == "network namespaces, veth and tc need root (running as uid 1000)"


def test_without_root_run_emulated_offers_the_local_ranks_mode(not_root):
    with pytest.raises(EmulationUnavailable) as info:
        run_emulated(PROBE, nodes=3, ranks_per_node=1)
    message = str(info.value)
    assert "need root (running as uid 1000)" in message
    assert "--mode local --nodes 3 --ranks-per-node 1" in message


def test_without_root_the_tool_says_so_and_exits_2(not_root, capsys):
    assert emulated_cluster.main(["--nodes", "2", "--", str(PROBE)]) == 2
    err = capsys.readouterr().err
    assert "need root" in err and "--mode local --nodes 2 --ranks-per-node 2" in err


def test_ds_grace_cluster_command_wraps_the_tool(not_root, capsys):
    assert cli.main(["cluster", "--rate-mbit", "50", "--", str(PROBE), "--iterations", "2"]) == 2
    assert "--mode local" in capsys.readouterr().err


def test_auto_mode_falls_back_to_local_ranks_without_root(not_root, monkeypatch, capsys):
    calls = []

    def fake_local(script, script_args, **kwargs):
        calls.append((script, list(script_args), kwargs["nodes"], kwargs["ranks_per_node"]))
        return ClusterRun(
            mode="local",
            topology=Topology(kwargs["nodes"], kwargs["ranks_per_node"]),
            ranks=[],
            launcher_exit_codes=[0],
            launcher_logs=[[]],
            wall_s=0.0,
            timed_out=False,
            commands=[],
        )

    monkeypatch.setattr(emulated_cluster, "run_local_ranks", fake_local)
    code = emulated_cluster.main(
        ["--mode", "auto", "--nodes", "2", "--ranks-per-node", "1", "--", "x.py", "-v"]
    )
    assert code == 0
    assert calls == [("x.py", ["-v"], 2, 1)]
    captured = capsys.readouterr()
    assert "using plain local ranks" in captured.err
    assert "cluster run (local, 2 nodes x 1 GPUs): ok" in captured.out


def test_arguments_are_checked_before_anything_starts():
    with pytest.raises(ValueError, match=r"script \(missing\.py\) must be an existing file"):
        run_local_ranks("missing.py")
    with pytest.raises(ValueError, match=r"timeout_s \(0\) must be > 0"):
        run_local_ranks(PROBE, timeout_s=0)
    with pytest.raises(ValueError, match=r"topology.num_nodes \(0\) must be an integer >= 1"):
        run_local_ranks(PROBE, nodes=0)


def test_no_script_is_a_usage_error(capsys):
    assert emulated_cluster.main(["--nodes", "2"]) == 2
    assert "no script given" in capsys.readouterr().err


def test_declared_topology_prefers_the_declaration_over_the_launcher_layout():
    env = {"DS_GRACE_NUM_NODES": "2", "DS_GRACE_GPUS_PER_NODE": "2", "CROSS_SIZE": "1", "LOCAL_SIZE": "4"}
    assert declared_topology(env) == Topology(2, 2)
    assert declared_topology({"CROSS_SIZE": "2", "LOCAL_SIZE": "3"}) == Topology(2, 3)
    with pytest.raises(ValueError, match=r"DS_GRACE_NUM_NODES \('two'\) must be a positive integer"):
        declared_topology({"DS_GRACE_NUM_NODES": "two", "DS_GRACE_GPUS_PER_NODE": "2"})


def test_namespace_names_are_recognised_for_cleanup():
    assert cluster_network.NAME_PATTERN.match("dsg-123-4-n0")["pid"] == "123"
    assert cluster_network.NAME_PATTERN.match("dsg-123-4-br")["role"] == "br"
    assert cluster_network.NAME_PATTERN.match("other-123-4-n0") is None


def test_probe_split_matrix_is_uneven_positive_and_the_same_everywhere():
    counts_RR = uneven_counts(4, 700)
    assert counts_RR == uneven_counts(4, 700)
    flat = [c for row in counts_RR for c in row]
    assert min(flat) == 200 and max(flat) == 1200 and len(set(flat)) > 3
    assert min(c for row in uneven_counts(4, 1) for c in row) == 1


def test_probe_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--iterations", "0"])
    assert "--iterations (0) must be >= 1" in capsys.readouterr().err
    assert parse_args(["--local_rank=1", "--fail-rank", "2"]).fail_rank == 2
