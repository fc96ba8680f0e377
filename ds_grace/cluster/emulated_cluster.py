"""Emulated multi-node cluster: N network namespaces ("nodes") x R ranks on one machine, each node
running the real deepspeed launcher, with shaped links between nodes (see cluster_network.py).

    ds-grace cluster --nodes 2 --ranks-per-node 2 --rate-mbit 50 -- SCRIPT ARGS...
    ds-grace cluster --mode local --nodes 2 --ranks-per-node 2 -- SCRIPT ARGS...
    ds-grace cluster --cleanup

Per node i the tool runs, inside namespace i with GLOO_SOCKET_IFNAME=eth0,
`deepspeed --hostfile H --no_ssh --node_rank i --master_addr 10.77.0.1 --master_port P SCRIPT`
(as `python -m deepspeed.launcher.runner`, the code behind the `deepspeed` command). Each rank goes
through rank_exec.py, which keeps its stdout, stderr and exit code in files, so the result holds
every rank's output separately. Everything the tool creates is removed on return, on failure, on
SIGINT/SIGTERM/SIGHUP and at interpreter exit; `--cleanup` removes what a killed run left behind.

Without root (or without `ip netns`) it says so and offers the local-ranks mode: the same script
under `deepspeed --num_gpus N*R` on this machine, with the declared topology in the environment
(DS_GRACE_NUM_NODES, DS_GRACE_GPUS_PER_NODE; `declared_topology()` reads it in either mode).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from shutil import rmtree
from typing import TYPE_CHECKING, Any

from ds_grace.cluster.cluster_network import (
    NODE_IFNAME,
    EmulatedNetwork,
    LinkShape,
    NetworkSetupError,
    cleanup_stale,
    netns_unavailable_reason,
)
from ds_grace.cluster.node_launchers import MASTER_ADDR, free_port
from ds_grace.comm.shared_memory import release_shared_memory_names
from ds_grace.files import write_text_atomic

if TYPE_CHECKING:
    from ds_grace.topology import Topology

RANK_EXEC = Path(__file__).resolve().parent / "rank_exec.py"
# the folder holding the ds_grace package (a checkout or site-packages): on every rank's PYTHONPATH
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
MASTER_PORT = 29500  # free by construction: node 0's namespace is new
ENV_NUM_NODES = "DS_GRACE_NUM_NODES"
ENV_GPUS_PER_NODE = "DS_GRACE_GPUS_PER_NODE"
ENV_CLUSTER_MODE = "DS_GRACE_CLUSTER_MODE"
STOP_GRACE_S = 5.0
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def running_in_group(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (not counting zombies: an exited process whose
    parent is gone waits in the group until its new parent reaps it)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process ended while being read
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class EmulationUnavailable(RuntimeError):
    """This machine or user cannot build the emulated cluster; the message offers local ranks."""


class ClusterInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived while a cluster ran; everything was torn down."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def declared_topology(environ: Mapping[str, str] | None = None) -> Topology:
    """The cluster shape a rank runs in: the declared one, else the launcher's CROSS_SIZE/LOCAL_SIZE."""
    from ds_grace.topology import Topology  # imported on use: the ds_grace package pulls in torch

    environ = os.environ if environ is None else environ
    nodes = environ.get(ENV_NUM_NODES, environ.get("CROSS_SIZE", "1"))
    per_node = environ.get(ENV_GPUS_PER_NODE, environ.get("LOCAL_SIZE", environ.get("WORLD_SIZE", "1")))
    for name, value in ((ENV_NUM_NODES, nodes), (ENV_GPUS_PER_NODE, per_node)):
        if not value.isdigit():
            raise ValueError(f"{name} ({value!r}) must be a positive integer")
    return Topology(int(nodes), int(per_node))


@dataclass
class RankResult:
    rank: int
    node: int
    local_rank: int
    exit_code: int | None  # None: the rank never ran or was killed with its wrapper
    stdout: list[str]
    stderr: list[str]

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stdout line that is a JSON object, parsed."""
        records = []
        for line in self.stdout:
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records


@dataclass
class ClusterRun:
    mode: str  # "netns" (emulated nodes) or "local" (plain local ranks, declared topology)
    topology: Topology
    ranks: list[RankResult]
    launcher_exit_codes: list[int | None]
    launcher_logs: list[list[str]]
    wall_s: float
    timed_out: bool  # the whole run hit timeout_s
    commands: list[list[str]]  # per node: the launcher command line (inside its namespace in netns mode)
    link: LinkShape | None = None
    link_bytes: list[dict[str, int]] | None = None  # per node: traffic through its eth0 during the run
    namespaces: list[str] = field(default_factory=list)
    teardown_problems: list[str] = field(default_factory=list)
    workdir: str | None = None
    stopped_after_failure: bool = False  # failure_grace_s ran out after a node failed: the rest was stopped

    @property
    def ok(self) -> bool:
        return (
            not self.timed_out
            and not self.teardown_problems
            and all(code == 0 for code in self.launcher_exit_codes)
            and all(rank.exit_code == 0 for rank in self.ranks)
        )

    def json_records(self) -> list[list[dict[str, Any]]]:
        return [rank.json_lines() for rank in self.ranks]

    def summary_lines(self) -> list[str]:
        where = f"{self.mode}, {self.topology}"
        if self.link is not None:
            where += f", link {self.link.rate_mbit:g} Mbit/s, delay {self.link.delay_ms:g} ms"
        lines = [f"cluster run ({where}): {'ok' if self.ok else 'FAILED'} in {self.wall_s:.1f} s"]
        if self.timed_out:
            lines.append("  timed out: every process was stopped")
        if self.stopped_after_failure:
            lines.append("  a node failed and the others outlived the failure grace: they were stopped")
        for node, code in enumerate(self.launcher_exit_codes):
            lines.append(f"  node {node} launcher exit code {code}")
        for rank in self.ranks:
            lines.append(
                f"  rank {rank.rank} (node {rank.node}, local {rank.local_rank}): exit code {rank.exit_code}"
            )
        for node, counters in enumerate(self.link_bytes or []):
            lines.append(
                f"  node {node} link: sent {counters['tx_bytes']} B, received {counters['rx_bytes']} B"
            )
        lines += [f"  teardown problem: {problem}" for problem in self.teardown_problems]
        return lines

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["topology"] = {
            "num_nodes": self.topology.num_nodes,
            "gpus_per_node": self.topology.gpus_per_node,
        }
        data["ok"] = self.ok
        return data


_LIVE_SESSIONS: set[_Session] = set()


def _teardown_live_sessions() -> None:
    for session in list(_LIVE_SESSIONS):
        session.close()


atexit.register(_teardown_live_sessions)


@contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise ClusterInterrupted once (so `finally` tears down); repeats are ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if not fired:
            fired.append(signum)
            raise ClusterInterrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class _Session:
    """The processes, network and files of one run; `close()` removes all of them (idempotent)."""

    def __init__(self, *, topology: Topology, keep_workdir: bool) -> None:
        self.topology = topology
        self.keep_workdir = keep_workdir
        self.workdir = Path(tempfile.mkdtemp(prefix="dsg-cluster-"))
        self.rank_dir = self.workdir / "ranks"
        self.rank_dir.mkdir()
        self.network: EmulatedNetwork | None = None
        self.launchers: list[subprocess.Popen[bytes]] = []
        self.teardown_problems: list[str] = []
        self._offsets: dict[Path, int] = {}
        self._closed = False
        _LIVE_SESSIONS.add(self)

    def start_launcher(self, cmd: list[str], *, env: dict[str, str], cwd: str) -> None:
        with open(self.workdir / f"launcher{len(self.launchers)}.log", "wb") as log:
            self.launchers.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def wait(self, *, timeout_s: float, failure_grace_s: float | None, stream: bool) -> str:
        """Wait for every launcher: "done", "timeout", or "failure_grace" (the others were given up)."""
        deadline = time.monotonic() + timeout_s
        grace_deadline = None
        while True:
            if stream:
                self.stream_new_lines()
            codes = [proc.poll() for proc in self.launchers]
            if all(code is not None for code in codes):
                return "done"
            if (
                grace_deadline is None
                and failure_grace_s is not None
                and any(c not in (None, 0) for c in codes)
            ):
                grace_deadline = time.monotonic() + failure_grace_s
            if time.monotonic() >= deadline:
                return "timeout"
            if grace_deadline is not None and time.monotonic() >= grace_deadline:
                return "failure_grace"
            time.sleep(0.2)

    def stream_new_lines(self) -> None:
        for rank in range(self.topology.world_size):
            node = self.topology.node_of(rank)
            for suffix, tag in (("out", ""), ("err", " err")):
                path = self.rank_dir / f"rank{rank}.{suffix}"
                if not path.exists():
                    continue
                with open(path, "rb") as handle:
                    handle.seek(self._offsets.get(path, 0))
                    chunk = handle.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                self._offsets[path] = self._offsets.get(path, 0) + len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    print(f"[n{node} r{rank}{tag}] {line}", flush=True)

    def stop_launchers(self) -> None:
        """SIGTERM each launcher's process group (launcher and its ranks), SIGKILL what remains."""
        for proc in self.launchers:
            if proc.poll() is None:
                self._signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.launchers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # a rank's wrapper records its exit code after its launcher is gone: give it the same grace
            while running_in_group(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        for proc in self.launchers:
            # ranks can outlive their launcher; the group id stays theirs while any member lives
            self._signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.teardown_problems.append(f"launcher pid {proc.pid} did not exit after SIGKILL")

    @staticmethod
    def _signal_group(pgid: int, signum: int) -> None:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def rank_results(self) -> list[RankResult]:
        results = []
        for rank in range(self.topology.world_size):
            exit_path = self.rank_dir / f"rank{rank}.exit"
            exit_text = exit_path.read_text().strip() if exit_path.exists() else ""
            results.append(
                RankResult(
                    rank=rank,
                    node=self.topology.node_of(rank),
                    local_rank=self.topology.local_rank_of(rank),
                    exit_code=int(exit_text) if exit_text.lstrip("-").isdigit() else None,
                    stdout=self._lines(self.rank_dir / f"rank{rank}.out"),
                    stderr=self._lines(self.rank_dir / f"rank{rank}.err"),
                )
            )
        return results

    def launcher_logs(self) -> list[list[str]]:
        return [self._lines(self.workdir / f"launcher{i}.log") for i in range(len(self.launchers))]

    @staticmethod
    def _lines(path: Path) -> list[str]:
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # a signal arriving now is held until everything is removed, then raises as usual
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPT_SIGNALS)
        try:
            self.stop_launchers()
        finally:
            try:
                if self.network is not None:
                    self.teardown_problems += self.network.teardown()
                if not self.keep_workdir:
                    rmtree(self.workdir, ignore_errors=True)
                _LIVE_SESSIONS.discard(self)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _check_common(script: str | os.PathLike[str], timeout_s: float, failure_grace_s: float | None) -> Path:
    path = Path(script).resolve()
    if not path.is_file():
        raise ValueError(f"script ({script}) must be an existing file")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s ({timeout_s}) must be > 0")
    if failure_grace_s is not None and not failure_grace_s >= 0:
        raise ValueError(f"failure_grace_s ({failure_grace_s}) must be >= 0 or None")
    return path


def _rank_env(
    *, session: _Session, mode: str, pass_local_rank: bool, env: Mapping[str, str] | None
) -> dict[str, str]:
    rank_env = dict(os.environ)
    rank_env.setdefault("OMP_NUM_THREADS", "1")
    rank_env["PYTHONUNBUFFERED"] = "1"
    rank_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")) if p
    )
    rank_env["DS_GRACE_RANK_LOG_DIR"] = str(session.rank_dir)
    rank_env["DS_GRACE_PASS_LOCAL_RANK"] = "1" if pass_local_rank else "0"
    rank_env[ENV_NUM_NODES] = str(session.topology.num_nodes)
    rank_env[ENV_GPUS_PER_NODE] = str(session.topology.gpus_per_node)
    rank_env[ENV_CLUSTER_MODE] = mode
    rank_env.update(env or {})
    return rank_env


def _finish(
    session: _Session,
    *,
    mode: str,
    commands: list[list[str]],
    started: float,
    outcome: str,
    link: LinkShape | None = None,
    counters_before: list[dict[str, int]] | None = None,
) -> ClusterRun:
    """Stop what is left, read counters, tear down and build the result (always closes `session`)."""
    link_bytes = None
    try:
        session.stop_launchers()
        wall_s = time.monotonic() - started
        if session.network is not None and counters_before is not None:
            after = session.network.link_counters()
            link_bytes = [
                {key: after[node][key] - counters_before[node][key] for key in after[node]}
                for node in range(len(after))
            ]
        ranks = session.rank_results()
        launcher_logs = session.launcher_logs()
    finally:
        session.close()
    return ClusterRun(
        mode=mode,
        topology=session.topology,
        ranks=ranks,
        launcher_exit_codes=[proc.returncode for proc in session.launchers],
        launcher_logs=launcher_logs,
        wall_s=wall_s,
        timed_out=outcome == "timeout",
        stopped_after_failure=outcome == "failure_grace",
        commands=commands,
        link=link,
        link_bytes=link_bytes,
        namespaces=session.network.namespaces if session.network is not None else [],
        teardown_problems=session.teardown_problems,
        workdir=str(session.workdir) if session.keep_workdir else None,
    )


def local_mode_offer(nodes: int, ranks_per_node: int) -> str:
    return (
        f"the plain local-ranks mode runs the same script on {nodes * ranks_per_node} local ranks with the "
        f"declared {nodes} x {ranks_per_node} topology and no link emulation: "
        f"python launch/emulated_cluster.py --mode local --nodes {nodes} --ranks-per-node {ranks_per_node} "
        "-- SCRIPT ARGS... (or run_local_ranks(...))"
    )


def run_emulated(
    script: str | os.PathLike[str],
    script_args: Sequence[str] = (),
    *,
    nodes: int = 2,
    ranks_per_node: int = 2,
    rate_mbit: float = 200.0,
    delay_ms: float = 0.0,
    burst_kbyte: float | None = None,
    timeout_s: float = 600.0,
    failure_grace_s: float | None = None,
    env: Mapping[str, str] | None = None,
    pass_local_rank: bool = True,
    stream: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    keep_workdir: bool = False,
) -> ClusterRun:
    """Run `script` on `nodes` emulated nodes x `ranks_per_node` ranks; always tears everything down.

    Each node's link is shaped to `rate_mbit` in both directions (plus `delay_ms` one-way if the
    kernel has netem). `timeout_s` bounds the whole run; `failure_grace_s`, if set, bounds how long
    the other nodes may keep running once one node's launcher failed. `env` is added to every
    rank's environment. `pass_local_rank` appends `--local_rank=L` after the script, as the
    deepspeed launcher does by default. Raises EmulationUnavailable without root or `ip netns`.
    """
    reason = netns_unavailable_reason()
    if reason is not None:
        raise EmulationUnavailable(
            f"the emulated cluster is unavailable: {reason}; {local_mode_offer(nodes, ranks_per_node)}"
        )
    from ds_grace.topology import Topology

    topology = Topology(nodes, ranks_per_node)
    shape = LinkShape(rate_mbit=rate_mbit, delay_ms=delay_ms, burst_kbyte=burst_kbyte)
    script_path = _check_common(script, timeout_s, failure_grace_s)
    session = _Session(topology=topology, keep_workdir=keep_workdir)
    with _signals_as_interrupts():
        try:
            session.network = EmulatedNetwork(nodes=nodes, shape=shape)
            session.network.setup()
            hostfile = session.workdir / "hostfile"
            hostfile.write_text("".join(f"node{i} slots={ranks_per_node}\n" for i in range(nodes)))
            rank_env = _rank_env(session=session, mode="netns", pass_local_rank=pass_local_rank, env=env)
            rank_env["GLOO_SOCKET_IFNAME"] = NODE_IFNAME
            counters_before = session.network.link_counters()
            commands: list[list[str]] = []
            started = time.monotonic()
            for node in range(nodes):
                launcher = [
                    sys.executable, "-m", "deepspeed.launcher.runner",
                    "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                    "--master_addr", session.network.node_address(0), "--master_port", str(MASTER_PORT),
                    "--no_local_rank", str(RANK_EXEC), str(script_path), *script_args,
                ]  # fmt: skip
                commands.append(session.network.exec_prefix(node) + launcher)
                session.start_launcher(commands[-1], env=rank_env, cwd=str(cwd or os.getcwd()))
            outcome = session.wait(timeout_s=timeout_s, failure_grace_s=failure_grace_s, stream=stream)
            if stream:
                session.stream_new_lines()
            return _finish(
                session,
                mode="netns",
                commands=commands,
                started=started,
                outcome=outcome,
                link=shape,
                counters_before=counters_before,
            )
        finally:
            session.close()


def run_local_ranks(
    script: str | os.PathLike[str],
    script_args: Sequence[str] = (),
    *,
    nodes: int = 2,
    ranks_per_node: int = 2,
    timeout_s: float = 600.0,
    failure_grace_s: float | None = None,
    env: Mapping[str, str] | None = None,
    pass_local_rank: bool = True,
    stream: bool = False,
    cwd: str | os.PathLike[str] | None = None,
    keep_workdir: bool = False,
) -> ClusterRun:
    """The fallback: `deepspeed --num_gpus nodes*ranks_per_node` on this machine, topology declared
    through DS_GRACE_NUM_NODES / DS_GRACE_GPUS_PER_NODE. No root needed, no link emulation."""
    from ds_grace.topology import Topology

    topology = Topology(nodes, ranks_per_node)
    script_path = _check_common(script, timeout_s, failure_grace_s)
    session = _Session(topology=topology, keep_workdir=keep_workdir)
    port = str(free_port())
    with _signals_as_interrupts():
        try:
            rank_env = _rank_env(session=session, mode="local", pass_local_rank=pass_local_rank, env=env)
            rank_env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            launcher = [
                sys.executable, "-m", "deepspeed.launcher.runner",
                "--hostfile", str(session.workdir / "no_hostfile"), "--num_gpus", str(topology.world_size),
                "--master_port", port,
                "--no_local_rank", str(RANK_EXEC), str(script_path), *script_args,
            ]  # fmt: skip
            started = time.monotonic()
            session.start_launcher(launcher, env=rank_env, cwd=str(cwd or os.getcwd()))
            outcome = session.wait(timeout_s=timeout_s, failure_grace_s=failure_grace_s, stream=stream)
            if stream:
                session.stream_new_lines()
            return _finish(session, mode="local", commands=[launcher], started=started, outcome=outcome)
        finally:
            session.close()
            # a script that starts DeepSpeed itself leaves its CPU allreduce segments (shared_memory)
            release_shared_memory_names(
                range(topology.world_size), {"MASTER_ADDR": MASTER_ADDR, "MASTER_PORT": port}
            )


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=("netns", "local", "auto"),
        default="netns",
        help="netns: emulated nodes (root); local: plain local ranks; auto: netns when possible",
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--rate-mbit", type=float, default=200.0, help="inter-node link rate, each direction")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way inter-node delay (needs netem)")
    parser.add_argument(
        "--burst-kbyte", type=float, default=None, help="tbf burst (default: 10 ms of traffic)"
    )
    parser.add_argument("--timeout-s", type=float, default=600.0, help="hard limit for the whole run")
    parser.add_argument(
        "--failure-grace-s", type=float, default=None,
        help="once a node fails, stop the others after this long (default: wait for them up to --timeout-s)",
    )  # fmt: skip
    parser.add_argument("--no-local-rank", action="store_true", help="do not pass --local_rank to the script")
    parser.add_argument("--quiet", action="store_true", help="do not stream rank output while running")
    parser.add_argument("--json-out", default=None, help="write the whole run (every rank's output) here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep hostfile and logs for inspection")
    parser.add_argument(
        "--cleanup", action="store_true", help="remove namespaces left by killed runs (owner gone) and exit"
    )
    parser.add_argument(
        "--all-owners", action="store_true", help="with --cleanup: also remove namespaces of live runs"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")


def run_from_args(args: argparse.Namespace) -> int:
    if args.cleanup:
        removed, problems = cleanup_stale(include_live_owners=args.all_owners)
        for name in removed:
            print(f"removed namespace {name}")
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"cleanup: {len(removed)} namespace(s) removed, {len(problems)} problem(s)")
        return 1 if problems else 0
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("error: no script given; usage: ... [options] -- SCRIPT ARGS...", file=sys.stderr)
        return 2
    script, *script_args = command
    common = {
        "nodes": args.nodes,
        "ranks_per_node": args.ranks_per_node,
        "timeout_s": args.timeout_s,
        "failure_grace_s": args.failure_grace_s,
        "pass_local_rank": not args.no_local_rank,
        "stream": not args.quiet,
        "keep_workdir": args.keep_workdir,
    }
    mode = args.mode
    if mode == "auto":
        reason = netns_unavailable_reason()
        if reason is not None:
            print(f"emulated cluster unavailable ({reason}); using plain local ranks", file=sys.stderr)
        mode = "local" if reason else "netns"
    try:
        if mode == "netns":
            result = run_emulated(
                script, script_args, rate_mbit=args.rate_mbit, delay_ms=args.delay_ms,
                burst_kbyte=args.burst_kbyte, **common,
            )  # fmt: skip
        else:
            result = run_local_ranks(script, script_args, **common)
    except EmulationUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, NetworkSetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ClusterInterrupted as exc:
        print(f"{exc}; every process and namespace of the run was removed", file=sys.stderr)
        return 128 + exc.signum
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(result.to_dict(), indent=2, default=str))
    for line in result.summary_lines():
        print(line)
    if not result.ok:
        for node, (code, log) in enumerate(zip(result.launcher_exit_codes, result.launcher_logs)):
            if code != 0:
                print(f"--- node {node} launcher log (last 15 lines) ---")
                print("\n".join(log[-15:]))
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="emulated_cluster.py", description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1]
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
