"""Small collectives the serving and profiling code needs, and starting the process group.

Everything here is collective over the default (world) group: every rank must call it, in the same
order. Payloads are tiny (flags, counts, hashes); the token traffic lives in all_to_all.py.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(ValueError):  # a ValueError like the config errors it stands beside
    """The process group cannot be started from this environment."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, or (1, 0) without one."""
    if is_distributed():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def init_distributed(*, timeout_s: float) -> None:
    """Initialise DeepSpeed's communication backend (gloo on CPU) unless it is up: on the start-up
    rendezvous's store when the ranks met there (ds_grace.comm.rendezvous), else the launcher's env://
    when its variables are set, else a world of this one process."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ds_grace.comm.rendezvous import StartupRendezvous

    timeout = timedelta(seconds=timeout_s)
    startup = StartupRendezvous.current()
    if not dist.is_initialized() and startup is not None:  # the ranks met in the launcher's store already
        dist.init_process_group(
            get_accelerator().communication_backend_name(),
            store=startup.store,
            rank=startup.rank,
            world_size=startup.world_size,
            timeout=timeout,
        )
    if dist.is_initialized():
        deepspeed.init_distributed(dist_init_required=False, verbose=False, timeout=timeout)
        return
    present = [name for name in _LAUNCHER_ENV if name in os.environ]
    if len(present) == len(_LAUNCHER_ENV):
        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False, timeout=timeout)
    elif int(os.environ.get("WORLD_SIZE", "1")) == 1:
        deepspeed.init_distributed(
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            auto_mpi_discovery=False,
            verbose=False,
            timeout=timeout,
        )
    else:
        missing = [name for name in _LAUNCHER_ENV if name not in present]
        raise DistributedSetupError(
            f"WORLD_SIZE ({os.environ['WORLD_SIZE']}) > 1 but the launcher variables {missing} are unset; "
            "start with the deepspeed launcher or initialise torch.distributed first"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, by rank (picklable objects)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_objects_to_rank0(value: Any) -> list[Any]:
    """Every rank's `value` by rank on rank 0; an empty list elsewhere (without a group: [value])."""
    if not is_distributed():
        return [value]
    size, rank = world()
    gathered: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered or []


def all_ranks_true(flag: bool) -> bool:
    """True when `flag` is true on every rank."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def sum_over_ranks(values: list[int]) -> list[int]:
    """Element-wise sum of integer counts over all ranks."""
    total = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return [int(v) for v in total.tolist()]


def max_over_group(value: int, *, group: Any) -> int:
    """The largest `value` over the ranks of `group`."""
    count = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return int(count.item())


def shutdown_distributed(exit_code: int | None = None) -> None:
    """Leave the process group together: wait for every rank, then destroy it. A rank that exits while a
    peer's gloo connection is still open can abort in gloo's threads during the interpreter's teardown.
    With `exit_code`, the process then ends with it (``end_process``)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    if exit_code is not None:
        end_process(exit_code)


def end_process(code: int) -> NoReturn:
    """End this process with `code`: its atexit handlers run and stdout / stderr are flushed, but the
    interpreter's teardown is skipped, as multiprocessing's children skip it. A launched rank whose gloo
    process groups served it can abort in that teardown ("terminate called without an active exception",
    exit -6) after its work is done and its group destroyed, and the launcher then fails the whole launch;
    a rank that ends here does not reach it. Call it last: files still open are not flushed."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream must not keep the process alive
            stream.flush()
    os._exit(code)


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a group)."""
    if is_distributed():
        dist.barrier()


def max_over_ranks(value: float) -> float:
    """The largest `value` over all ranks (the value itself without a group)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


_PEERS: list[dict[str, Any]] = []


def check_ranks_agree(fields: Mapping[str, Any], identity: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The start-up handshake: one all-gather of every rank's `fields` ({name: JSON-able value}, what every
    rank must hold the same of) and `identity` (rank, node, host, pid). Any difference raises
    RankMismatchError on every rank, naming each field and every rank's value (ds_grace.comm.agreement),
    before any MoE collective. Returns the identities by rank (also kept for fault messages, see
    ``peers``). Without a process group there is nothing to compare."""
    from ds_grace.comm.agreement import disagreements, mismatch_error

    if not is_distributed():
        gathered = [{"fields": dict(fields), "identity": dict(identity)}]
    else:
        gathered = all_gather_objects({"fields": dict(fields), "identity": dict(identity)})
    identities = [entry["identity"] for entry in gathered]
    problems = disagreements([entry["fields"] for entry in gathered], identities)
    if problems:
        raise mismatch_error(problems)
    _PEERS[:] = identities
    return identities


def peers() -> list[dict[str, Any]]:
    """Every rank's identity (rank, node, host) from the last handshake; empty before one."""
    return list(_PEERS)


# gloo's words for a peer that went away (a crash, a kill) or stopped answering (timeout)
LOST_PEER_TEXT = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
)


def _process_state(pid: int) -> str | None:
    """'running', 'stopped' or None (gone, or a zombie waiting for its parent) for a process of this host."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "running"
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return None
    return "stopped" if state in ("T", "t") else "running"


def _report_marker(rank: int) -> Path:
    """The file a rank leaves on its host when it stops after reporting a lost peer, so that peers on
    the same host tell it from the rank that was lost (one launch: the handshake's table names it)."""
    launch = hashlib.sha256(json.dumps(_PEERS, sort_keys=True).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "ds_grace_stopped" / f"{launch}-rank{rank}"


def lost_rank_report(exc: BaseException, *, wait_s: float = 3.0) -> str | None:
    """For a collective that failed because a peer went away: which ranks of the last handshake stopped
    answering, as far as this rank can tell, or None when `exc` is not such a failure or no handshake ran.

    Peers on this host are looked up by process id: one that is gone or stopped, and that did not leave a
    report itself (a survivor that stopped after its own report), is the lost one. Peers on other hosts
    cannot be looked up. Waits up to `wait_s` for a dying peer to go; leaves this rank's own marker."""
    from ds_grace.comm.rendezvous import PeerLostError

    if isinstance(exc, PeerLostError):  # lost before the handshake: the rendezvous named the rank
        return str(exc)
    text = str(exc)
    if not _PEERS or not isinstance(exc, RuntimeError) or not any(t in text for t in LOST_PEER_TEXT):
        return None
    me = socket.gethostname()
    own_pid = os.getpid()
    own = next((p["rank"] for p in _PEERS if p.get("pid") == own_pid and p["host"] == me), None)
    local = [p for p in _PEERS if p["host"] == me and p.get("pid") not in (None, own_pid)]
    deadline = time.monotonic() + wait_s
    while True:
        states = {p["rank"]: _process_state(int(p["pid"])) for p in local}
        lost = [p for p in local if states[p["rank"]] != "running" and not _report_marker(p["rank"]).exists()]
        if lost or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if own is not None:
        with contextlib.suppress(OSError):
            marker = _report_marker(own)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    parts = []
    for p in lost:
        how = "is stopped (not running)" if states[p["rank"]] == "stopped" else "exited"
        parts.append(
            f"rank {p['rank']} (host {p['host']}, pid {p['pid']}) stopped answering: its process {how}"
        )
    if not lost:
        others = sorted({p["host"] for p in _PEERS if p["host"] != me})
        if not others:
            return None
        ranks = [p["rank"] for p in _PEERS if p["host"] != me]
        parts.append(
            f"a rank on another host stopped answering (every rank on {me} still runs; ranks {ranks} on "
            f"{', '.join(others)} cannot be checked from here)"
        )
    return (
        "; ".join(parts)
        + f". Rank {own} stopped serving too; the launcher shuts down the remaining ranks (collective error: "
        + " ".join(text.split())[:200]
        + ")"
    )
