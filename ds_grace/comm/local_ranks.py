"""Run a function on N local gloo ranks: the test harness and `ds-grace selfcheck` use it.

Each rank is a process forked from a server that imported torch and DeepSpeed once (the
``forkserver`` start method with those modules preloaded, so a rank starts without importing them
again), in the caller's environment and working directory. It joins a file-based rendezvous,
initialises DeepSpeed's communication backend (gloo on CPU) and calls ``fn(ctx, *args)``. The parent
enforces a hard timeout, kills every rank on the first failure and re-raises with the failing rank's
traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from ds_grace.comm.shared_memory import release_shared_memory_names
from ds_grace.topology import Topology

# imported once by the start-up server that every rank is forked from
PRELOADED_MODULES = ("torch", "deepspeed")


class RankFailure(RuntimeError):
    """One or more ranks raised, died or timed out."""


@dataclass(frozen=True)
class RankContext:
    rank: int
    topology: Topology
    workdir: str

    @property
    def world_size(self) -> int:
        return self.topology.world_size


def _rank_main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    rank: int,
    topology: Topology,
    workdir: str,
    collective_timeout_s: float,
    results: Any,
    caller_env: dict[str, str],
) -> None:
    os.environ.clear()  # the server's environment is the one it started in: take the caller's
    os.environ.update(caller_env)
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(topology.local_rank_of(rank)),
        "WORLD_SIZE": str(topology.world_size),
        "LOCAL_SIZE": str(topology.gpus_per_node),
        "CROSS_RANK": str(topology.node_of(rank)),
        "CROSS_SIZE": str(topology.num_nodes),
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update(env)
    try:
        import torch

        torch.set_num_threads(1)
        import deepspeed

        deepspeed.init_distributed(
            dist_backend="gloo",
            init_method=f"file://{Path(workdir) / 'rendezvous'}",
            rank=rank,
            world_size=topology.world_size,
            timeout=timedelta(seconds=collective_timeout_s),
            verbose=False,
            auto_mpi_discovery=False,
        )
        value = fn(RankContext(rank=rank, topology=topology, workdir=workdir), *args)
        # Plain pickle bytes: torch's queue pickler would share tensor storage through file
        # descriptors that vanish when this process exits before the parent reads them.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        report = None
        if isinstance(exc, Exception):
            from ds_grace.comm.collectives import lost_rank_report

            report = lost_rank_report(exc, wait_s=2.0)
        results.put((rank, "error", traceback.format_exc() + (f"\n{report}\n" if report else "")))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_on_ranks(
    fn: Callable[..., Any],
    *,
    topology: Topology,
    args: tuple[Any, ...] = (),
    timeout_s: float = 180.0,
    collective_timeout_s: float = 60.0,
    workdir: str | os.PathLike[str] | None = None,
) -> list[Any]:
    """Call ``fn(RankContext, *args)`` on every rank of `topology`; return values by rank.

    `fn` must be importable at module level (it is sent to the rank processes by reference).
    """
    ctx = rank_start_context()
    results = ctx.Queue()
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="ds_grace_ranks_")
        workdir = own_tmp.name
    workdir = str(workdir)
    Path(workdir, "rendezvous").unlink(missing_ok=True)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, args, rank, topology, workdir, collective_timeout_s, results, dict(os.environ)),
            daemon=True,
        )
        for rank in range(topology.world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) + len(errors) < len(procs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(len(procs))) - values.keys() - errors.keys())
                errors.setdefault(-1, f"timed out after {timeout_s:.0f} s waiting for ranks {missing}")
                break
            try:
                rank, status, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive()
                    and r not in values
                    and r not in errors
                    and p.exitcode not in (0, None)
                ]
                for r in dead:
                    errors[r] = (
                        f"rank {r} (host {socket.gethostname()}, pid {procs[r].pid}) stopped answering: "
                        f"{_exit_text(procs[r].exitcode)}, without reporting"
                    )
                if dead:
                    break
                continue
            if status == "ok":
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                break
        if errors and _mentions_lost_peer(errors):
            # a survivor may report its broken connection before the lost rank is seen to be gone
            _collect_lost(procs, values, errors, wait_s=3.0)
    finally:
        for proc in procs:
            if errors:
                proc.kill()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        if not any(proc.is_alive() for proc in procs):  # no rank left that could still open one
            release_shared_memory_names(range(topology.world_size), os.environ)
        if own_tmp is not None:
            own_tmp.cleanup()
    if errors:
        details = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items()))
        raise RankFailure(f"{_headline(errors, procs, topology)}:\n{details}")
    return [values[r] for r in range(len(procs))]


def rank_start_context() -> Any:
    """The multiprocessing context ranks start from: a fork server with torch and DeepSpeed imported
    (started on first use, once per process), where the platform has one; spawn elsewhere."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOADED_MODULES))
    return ctx


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _mentions_lost_peer(errors: dict[int, str]) -> bool:
    from ds_grace.comm.collectives import LOST_PEER_TEXT

    return any(text in message for message in errors.values() for text in LOST_PEER_TEXT)


def _collect_lost(procs: list[Any], values: dict[int, Any], errors: dict[int, str], *, wait_s: float) -> None:
    """Record ranks whose process is gone without reporting, waiting up to `wait_s` for them to go."""
    deadline = time.monotonic() + wait_s
    while True:
        for r, proc in enumerate(procs):
            if r not in values and r not in errors and not proc.is_alive() and proc.exitcode not in (0, None):
                errors[r] = (
                    f"rank {r} (host {socket.gethostname()}, pid {proc.pid}) stopped answering: "
                    f"{_exit_text(proc.exitcode)}, without reporting"
                )
        lost = [r for r in errors if "stopped answering:" in errors[r] and "without reporting" in errors[r]]
        if lost or time.monotonic() >= deadline:
            return
        time.sleep(0.2)


def _headline(errors: dict[int, str], procs: list[Any], topology: Topology) -> str:
    lost = sorted(r for r, msg in errors.items() if r >= 0 and msg.endswith("without reporting"))
    others = [r for r in range(len(procs)) if r not in lost]
    if lost:
        names = ", ".join(f"rank {r} ({_exit_text(procs[r].exitcode)})" for r in lost)
        return (
            f"{names} stopped answering on {topology}; the other ranks ({', '.join(map(str, others))}) "
            "were shut down"
        )
    return f"{len(errors)} rank(s) failed on {topology}; the other ranks were shut down"
