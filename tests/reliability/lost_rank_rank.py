"""A rank script for the lost-rank launcher test: start-up handshake, then the last rank kills itself
while the others are in an all-reduce; survivors report through ds-grace's one-line error path."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

from ds_grace.cli import exit_code_for
from ds_grace.comm.collectives import check_ranks_agree, init_distributed, world


def main() -> int:
    init_distributed(timeout_s=60)
    size, rank = world()
    check_ranks_agree(
        {"script": "lost_rank"},
        {"rank": rank, "node": rank, "host": socket.gethostname(), "pid": os.getpid()},
    )
    dist.all_reduce(torch.ones(1))
    if rank == size - 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(100):
        dist.all_reduce(torch.ones(1))
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - the path under test
        sys.exit(exit_code_for(exc))
