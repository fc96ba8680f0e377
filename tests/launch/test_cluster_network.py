"""The emulated network on its own: namespaces, routes, shaping in both directions, cleanup."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from cluster_helpers import host_links_with_prefix, namespaces_with_prefix, requires_netns

from ds_grace.cluster.cluster_network import (
    PREFIX,
    EmulatedNetwork,
    LinkShape,
    NetworkSetupError,
    remove_namespace,
)


def test_link_shape_validation_names_field_value_and_rule():
    with pytest.raises(ValueError, match=r"rate_mbit \(0\) must be > 0"):
        LinkShape(rate_mbit=0)
    with pytest.raises(ValueError, match=r"delay_ms \(-1\) must be >= 0"):
        LinkShape(rate_mbit=50, delay_ms=-1)
    with pytest.raises(ValueError, match=r"burst_kbyte \(1\) must be >= 2"):
        LinkShape(rate_mbit=50, burst_kbyte=1)
    with pytest.raises(ValueError, match=r"nodes \(0\) must be an integer in \[1, 250\]"):
        EmulatedNetwork(nodes=0, shape=LinkShape(rate_mbit=50))


def test_tbf_burst_covers_ten_ms_of_traffic():
    assert LinkShape(rate_mbit=50).burst_bytes == 62_500
    assert LinkShape(rate_mbit=1).burst_bytes == 32 * 1024
    assert LinkShape(rate_mbit=50, burst_kbyte=8).burst_bytes == 8192
    assert LinkShape(rate_mbit=12.5).tbf_args()[:3] == ["tbf", "rate", "12500kbit"]


def _sh(*cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True).stdout


@requires_netns
@pytest.mark.netns
def test_setup_routes_intra_node_over_loopback_and_teardown_removes_everything():
    network = EmulatedNetwork(nodes=2, shape=LinkShape(rate_mbit=50))
    stem = network.bridge_namespace.removesuffix("-br")
    try:
        network.setup()
        assert sorted(namespaces_with_prefix(stem)) == sorted(network.namespaces)
        n0, bridge = network.node_namespaces[0], network.bridge_namespace
        # a rank talking to a rank of its own node uses eth0's address, which the kernel delivers on lo
        assert " dev lo " in _sh("ip", "-n", n0, "route", "get", network.node_address(0))
        assert " dev eth0 " in _sh("ip", "-n", n0, "route", "get", network.node_address(1))
        assert "tbf" in _sh("tc", "-n", n0, "qdisc", "show", "dev", "eth0")
        assert "rate 50Mbit" in _sh("tc", "-n", n0, "qdisc", "show", "dev", "eth0")
        assert "rate 50Mbit" in _sh("tc", "-n", bridge, "qdisc", "show", "dev", "n0")
    finally:
        assert network.teardown() == []
    assert namespaces_with_prefix(stem) == []
    assert host_links_with_prefix(stem) == []


_RECEIVER = textwrap.dedent(
    """
    import socket, sys, threading, time
    size = int(sys.argv[2])
    server = socket.create_server((sys.argv[1], 5201))
    conns = [server.accept()[0] for _ in range(2)]
    def drain(conn):
        got = 0
        while got < size:
            got += len(conn.recv(min(1 << 20, size - got)))
    start = time.perf_counter()
    for conn in conns:
        conn.sendall(b"g")
    threads = [threading.Thread(target=drain, args=(conn,)) for conn in conns]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(2 * size * 8 / (time.perf_counter() - start) / 1e6)
    """
)
_SENDER = textwrap.dedent(
    """
    import socket, sys, time
    for _ in range(100):
        try:
            conn = socket.create_connection((sys.argv[1], 5201))
            break
        except OSError:
            time.sleep(0.05)
    assert conn.recv(1) == b"g"
    conn.sendall(bytes(int(sys.argv[2])))
    conn.close()
    """
)


@requires_netns
@pytest.mark.netns
def test_two_senders_share_the_receivers_link_rate():
    """Nodes 1 and 2 send to node 0 at once: each sender's link allows the full rate, so only the
    shaping of node 0's receiving side keeps the total at the rate."""
    rate_mbit, size = 40.0, 1_500_000
    network = EmulatedNetwork(nodes=3, shape=LinkShape(rate_mbit=rate_mbit))
    try:
        network.setup()
        receiver = subprocess.Popen(
            network.exec_prefix(0) + [sys.executable, "-c", _RECEIVER, network.node_address(0), str(size)],
            stdout=subprocess.PIPE,
            text=True,
        )
        senders = [
            subprocess.Popen(
                network.exec_prefix(node)
                + [sys.executable, "-c", _SENDER, network.node_address(0), str(size)]
            )
            for node in (1, 2)
        ]
        out, _ = receiver.communicate(timeout=60)
        assert all(sender.wait(timeout=30) == 0 for sender in senders)
    finally:
        assert network.teardown() == []
    total_mbit = float(out)
    assert 0.6 * rate_mbit < total_mbit < 1.1 * rate_mbit, total_mbit


@requires_netns
@pytest.mark.netns
def test_delay_needs_netem_and_fails_cleanly_without_it():
    network = EmulatedNetwork(nodes=2, shape=LinkShape(rate_mbit=50, delay_ms=2))
    stem = network.bridge_namespace.removesuffix("-br")
    try:
        network.setup()
        netem = "netem" in _sh("tc", "-n", network.node_namespaces[0], "qdisc", "show", "dev", "eth0")
        assert netem, "setup succeeded, so eth0 must carry the netem delay"
    except NetworkSetupError as exc:
        assert "delay_ms (2) needs the tc netem qdisc" in str(exc)
    finally:
        assert network.teardown() == []
    assert namespaces_with_prefix(stem) == []


@requires_netns
@pytest.mark.netns
def test_cleanup_removes_namespaces_of_dead_owners_only():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}-1-n0"
    live = f"{PREFIX}{os.getpid()}-9999-n0"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
        time.sleep(0.3)
        cli = subprocess.run(
            [sys.executable, "-m", "ds_grace.cluster.emulated_cluster", "--cleanup"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert f"removed namespace {stale}" in cli.stdout
        assert sleeper.wait(timeout=10) != 0  # what ran inside the stale namespace was stopped
        remaining = namespaces_with_prefix()
        assert stale not in remaining
        assert live in remaining
        assert remove_namespace(live) is None
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert {stale, live}.isdisjoint(namespaces_with_prefix())
