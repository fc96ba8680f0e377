"""Network namespaces, veth pairs, a bridge and tc shaping that make one machine look like N nodes.

Layout for one cluster (names carry the owner's pid and a sequence number, so concurrent
clusters never collide, and stale ones can be found and removed):

    dsg-<pid>-<seq>-br   bridge namespace: bridge br0 with ports n0 .. n<N-1>
    dsg-<pid>-<seq>-n<i> node i: interface eth0 = 10.77.0.<i+1>/24, loopback up

Nothing is created in the caller's own network namespace: each veth pair is made inside the
bridge namespace with its peer moved straight into the node's namespace.

Shaping: a tbf on eth0 (what node i sends) and a tbf on the bridge port n<i> (what node i
receives), both at the configured rate, so a node's link is limited in both directions like a
full-duplex NIC. Optional delay is a netem qdisc on eth0 only, so the one-way delay between two
nodes is delay_ms. Traffic between ranks of one node never touches eth0: gloo binds every rank to
eth0's address (GLOO_SOCKET_IFNAME), and Linux delivers packets to a local address over the
loopback device, so intra-node traffic runs at memory speed without any per-destination filters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

PREFIX = "dsg-"
SUBNET = "10.77.0"
NODE_IFNAME = "eth0"
BRIDGE_IFNAME = "br0"
NAME_PATTERN = re.compile(rf"^{PREFIX}(?P<pid>\d+)-(?P<seq>\d+)-(?P<role>br|probe|n\d+)$")
MAX_NODES = 250

_sequence = 0


class NetworkSetupError(RuntimeError):
    """Creating the namespaces, links or qdiscs failed; the message names the command and its error."""


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetworkSetupError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _add_qdisc(
    namespace: str, device: str, spec: list[str], *, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return _run(["tc", "-n", namespace, "qdisc", "add", "dev", device, *spec], check=check)


def _next_sequence() -> int:
    global _sequence
    _sequence += 1
    return _sequence


@dataclass(frozen=True)
class LinkShape:
    """Per-node link: rate in Mbit/s, one-way delay, tbf burst (None: 10 ms of traffic) and queue bound."""

    rate_mbit: float
    delay_ms: float = 0.0
    burst_kbyte: float | None = None
    queue_latency_ms: float = 50.0

    def __post_init__(self) -> None:
        if not self.rate_mbit > 0:
            raise ValueError(f"rate_mbit ({self.rate_mbit}) must be > 0")
        if not self.delay_ms >= 0:
            raise ValueError(f"delay_ms ({self.delay_ms}) must be >= 0")
        if self.burst_kbyte is not None and not self.burst_kbyte >= 2:
            raise ValueError(f"burst_kbyte ({self.burst_kbyte}) must be >= 2 (one packet fits)")
        if not self.queue_latency_ms > 0:
            raise ValueError(f"queue_latency_ms ({self.queue_latency_ms}) must be > 0")

    @property
    def burst_bytes(self) -> int:
        if self.burst_kbyte is not None:
            return int(self.burst_kbyte * 1024)
        return max(32 * 1024, int(self.rate_mbit * 1e6 / 8 * 0.010))

    def tbf_args(self) -> list[str]:
        rate_kbit = max(1, round(self.rate_mbit * 1000))
        return [
            "tbf",
            "rate",
            f"{rate_kbit}kbit",
            "burst",
            str(self.burst_bytes),
            "latency",
            f"{self.queue_latency_ms:g}ms",
        ]


def netns_unavailable_reason() -> str | None:
    """None when this process can build an emulated cluster, else why not (root, ip, tc, netns)."""
    if os.geteuid() != 0:
        return f"network namespaces, veth and tc need root (running as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is not installed"
    name = f"{PREFIX}{os.getpid()}-{_next_sequence()}-probe"
    proc = _run(["ip", "netns", "add", name], check=False)
    if proc.returncode != 0:
        return f"`ip netns add` does not work here: {proc.stderr.strip()}"
    _run(["ip", "netns", "del", name], check=False)
    return None


def list_namespaces() -> list[str]:
    proc = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_namespace(name: str) -> str | None:
    """Kill what still runs in namespace `name` (processes this tool started there), then delete it.

    Returns None on success, else the problem.
    """

    def pids_inside() -> list[int]:
        return [
            int(p) for p in _run(["ip", "netns", "pids", name], check=False).stdout.split() if p.isdigit()
        ]

    for _ in range(5):
        pids = pids_inside()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    pids = pids_inside()
    proc = _run(["ip", "netns", "del", name], check=False)
    if proc.returncode != 0 and name in list_namespaces():
        return f"could not delete namespace {name}: {proc.stderr.strip()}"
    if pids:
        # the name is gone, but the namespace and its links live on while these processes do
        return f"processes {pids} were still inside namespace {name} when it was deleted"
    return None


def stale_namespaces(*, include_live_owners: bool = False) -> list[str]:
    """Namespaces with this tool's prefix whose owning process is gone (or all of them)."""
    stale = []
    for name in list_namespaces():
        match = NAME_PATTERN.match(name)
        if match and (include_live_owners or not _pid_alive(int(match["pid"]))):
            stale.append(name)
    return stale


def cleanup_stale(*, include_live_owners: bool = False) -> tuple[list[str], list[str]]:
    """Remove stale namespaces of this tool; returns (removed names, problems)."""
    removed, problems = [], []
    # node namespaces before bridges, so no veth is left dangling while its bridge goes away
    for name in sorted(
        stale_namespaces(include_live_owners=include_live_owners), key=lambda n: n.endswith("br")
    ):
        problem = remove_namespace(name)
        if problem is None:
            removed.append(name)
        else:
            problems.append(problem)
    return removed, problems


class EmulatedNetwork:
    """N node namespaces on one bridge with shaped links; `setup()` then always `teardown()`."""

    def __init__(self, *, nodes: int, shape: LinkShape) -> None:
        if not isinstance(nodes, int) or isinstance(nodes, bool) or not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes ({nodes!r}) must be an integer in [1, {MAX_NODES}]")
        self.nodes = nodes
        self.shape = shape
        stem = f"{PREFIX}{os.getpid()}-{_next_sequence()}"
        self.bridge_namespace = f"{stem}-br"
        self.node_namespaces = [f"{stem}-n{i}" for i in range(nodes)]
        self._created: list[str] = []

    @property
    def namespaces(self) -> list[str]:
        return [*self.node_namespaces, self.bridge_namespace]

    def node_address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def exec_prefix(self, node: int) -> list[str]:
        """Command prefix that runs a program inside node `node`'s namespace."""
        return ["ip", "netns", "exec", self.node_namespaces[node]]

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def setup(self) -> None:
        bridge = self.bridge_namespace
        self._add_namespace(bridge)
        _run(["ip", "-n", bridge, "link", "add", BRIDGE_IFNAME, "type", "bridge"])
        _run(["ip", "-n", bridge, "link", "set", BRIDGE_IFNAME, "up"])
        for node, namespace in enumerate(self.node_namespaces):
            self._add_namespace(namespace)
            port = f"n{node}"
            _run(
                ["ip", "-n", bridge, "link", "add", port, "type", "veth"]
                + ["peer", "name", NODE_IFNAME, "netns", namespace]
            )
            _run(["ip", "-n", bridge, "link", "set", port, "master", BRIDGE_IFNAME])
            _run(["ip", "-n", bridge, "link", "set", port, "up"])
            _run(["ip", "-n", namespace, "addr", "add", f"{self.node_address(node)}/24", "dev", NODE_IFNAME])
            _run(["ip", "-n", namespace, "link", "set", NODE_IFNAME, "up"])
            self._shape(node)

    def _shape(self, node: int) -> None:
        namespace = self.node_namespaces[node]
        tbf = self.shape.tbf_args()
        if self.shape.delay_ms > 0:
            netem = ["netem", "delay", f"{self.shape.delay_ms:g}ms", "limit", "100000"]
            proc = _add_qdisc(namespace, NODE_IFNAME, ["root", "handle", "1:", *netem], check=False)
            if proc.returncode != 0:
                raise NetworkSetupError(
                    f"delay_ms ({self.shape.delay_ms:g}) needs the tc netem qdisc, which this kernel does not "
                    f"provide ({proc.stderr.strip()}); use delay_ms 0 (rate limiting with tbf still works)"
                )
            _add_qdisc(namespace, NODE_IFNAME, ["parent", "1:1", "handle", "10:", *tbf])
        else:
            _add_qdisc(namespace, NODE_IFNAME, ["root", "handle", "1:", *tbf])
        _add_qdisc(self.bridge_namespace, f"n{node}", ["root", "handle", "1:", *tbf])

    def link_counters(self) -> list[dict[str, int]]:
        """Bytes and packets each node's eth0 has sent and received so far."""
        counters = []
        for namespace in self.node_namespaces:
            proc = _run(["ip", "-n", namespace, "-j", "-s", "link", "show", NODE_IFNAME])
            stats = json.loads(proc.stdout)[0]["stats64"]
            counters.append(
                {
                    "tx_bytes": int(stats["tx"]["bytes"]),
                    "rx_bytes": int(stats["rx"]["bytes"]),
                    "tx_packets": int(stats["tx"]["packets"]),
                    "rx_packets": int(stats["rx"]["packets"]),
                }
            )
        return counters

    def qdisc_summary(self) -> list[str]:
        lines = []
        for namespace in self.node_namespaces:
            shown = _run(["tc", "-n", namespace, "qdisc", "show", "dev", NODE_IFNAME]).stdout
            lines += [f"{namespace}: {line}" for line in shown.splitlines()]
        return lines

    def teardown(self) -> list[str]:
        """Delete every namespace this network created (idempotent); returns problems, if any."""
        problems = []
        ordered = [n for n in self._created if n != self.bridge_namespace]
        ordered += [n for n in self._created if n == self.bridge_namespace]
        for name in ordered:
            problem = remove_namespace(name)
            if problem is not None:
                problems.append(problem)
        self._created = []
        return problems
