"""Names of DeepSpeed's CPU allreduce segments in /dev/shm (standard library only: the launcher side
imports it without torch)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

# DeepSpeed's CPU backend maps one shared-memory segment per rank for its allreduce when every rank of
# the job is on one machine (its shm comm op), named after the user, MASTER_ADDR, MASTER_PORT and the
# rank, and never unlinks it: each such job would leave one segment per rank in /dev/shm (tens of MB
# each) until the machine restarts
_SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = "deepspeed_allreduce_buffer"


def shared_memory_name(rank: int, env: Mapping[str, str]) -> Path:
    """The path of DeepSpeed's CPU allreduce segment of `rank` in a job started with `env`."""
    return (
        _SHM_DIR
        / f"{_SHM_PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    )


def release_shared_memory_names(ranks: Iterable[int], env: Mapping[str, str]) -> None:
    """Unlink the names of those ranks' segments. Every rank of the job must have finished starting
    (a collective after init, or the ranks are gone): a rank still starting opens its peers' segments
    by name. Mappings stay valid; the memory is freed when the last rank holding it exits."""
    for rank in ranks:
        shared_memory_name(rank, env).unlink(missing_ok=True)
