"""Nodes as separate `deepspeed` launchers on this machine: one launcher per node, each started with its
own node rank, as on a cluster without ssh.

    deepspeed --hostfile H --no_ssh --node_rank I --master_addr 127.0.0.1 --master_port P SCRIPT ARGS...

`run_node_launchers` writes the hostfile (`node<i> slots=<ranks_per_node>`), starts node i's launcher
with `node_scripts[i]` (each in its own process group, stdout and stderr into one log per node), waits
for each launcher in turn up to `timeout_s` and returns every launcher's exit code, its whole output and
the wall time. Whatever still runs when it returns or raises (also subprocess.TimeoutExpired from a
launcher that outlived `timeout_s`) is killed with its process group, so a rank that died cannot leave
the other nodes' ranks behind. When a rank fails, its node's launcher stops that node's ranks itself.

No network emulation and no root: every node's ranks reach each other over loopback (see
emulated_cluster.py for nodes in network namespaces with shaped links).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ds_grace.comm.shared_memory import release_shared_memory_names

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding ds_grace
MASTER_ADDR = "127.0.0.1"


class LauncherNotFound(RuntimeError):
    """The `deepspeed` command is not on PATH."""


@dataclass(frozen=True)
class NodeLaunch:
    exit_codes: list[int]  # per node: its launcher's exit code
    outputs: list[str]  # per node: its launcher's stdout and stderr (its ranks' output included)
    wall_s: float  # from starting the first launcher to having read the last output

    def shown(self, *, tail_chars: int) -> str:
        """Every node's output tail under a `--- node I ---` heading, for an assertion message."""
        return "\n".join(f"--- node {i} ---\n{text[-tail_chars:]}" for i, text in enumerate(self.outputs))


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((MASTER_ADDR, 0))
        return int(sock.getsockname()[1])


def run_node_launchers(
    *,
    node_scripts: Sequence[Sequence[str]],
    ranks_per_node: int,
    workdir: Path,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    log_prefix: str = "",
) -> NodeLaunch:
    """Run `node_scripts[i]` (SCRIPT ARGS...) on node i of len(node_scripts) nodes x `ranks_per_node` ranks.

    The hostfile and the logs (`<log_prefix>node<i>.log`) go to `workdir`; the launchers run in the
    repository root with this process's environment, OMP_NUM_THREADS=1 and `env` on top. Raises
    LauncherNotFound without a `deepspeed` command, subprocess.TimeoutExpired when a launcher is still
    running `timeout_s` after the wait for it began (every launcher is killed first)."""
    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise LauncherNotFound("the deepspeed launcher is not on PATH")
    hostfile = workdir / "hostfile"
    hostfile.write_text("".join(f"node{i} slots={ranks_per_node}\n" for i in range(len(node_scripts))))
    port = str(free_port())
    launcher_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    begin = time.monotonic()
    try:
        for node_rank, script in enumerate(node_scripts):
            log = open(workdir / f"{log_prefix}node{node_rank}.log", "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            command = [
                launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                "--master_addr", MASTER_ADDR, "--master_port", port, *script,
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(
                    command,
                    cwd=PACKAGE_PARENT,
                    env=launcher_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        codes = [proc.wait(timeout=timeout_s) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        # ranks that failed before init_inference's handshake never unlinked DeepSpeed's segments
        world = range(len(node_scripts) * ranks_per_node)
        release_shared_memory_names(world, {"MASTER_ADDR": MASTER_ADDR, "MASTER_PORT": port})
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    return NodeLaunch(exit_codes=codes, outputs=outputs, wall_s=time.monotonic() - begin)
