"""A rank script for the start-up launcher tests: the rank is killed (SIGKILL, so it cannot report)
during its start-up, either before it joined the rendezvous (`before-join`) or after it joined and
before its local checks finished (`after-join`)."""

from __future__ import annotations

import os
import signal
import sys
import time

if __name__ == "__main__":
    if "after-join" in sys.argv[1:]:  # the launcher adds --local_rank=N
        from ds_grace.comm.rendezvous import join_startup

        join_startup()
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
