"""Run one rank's script for the emulated cluster, keeping its stdout, stderr and exit code in files.

The deepspeed launcher starts this once per rank (`rank_exec.py SCRIPT ARGS...`); it runs
`python -u SCRIPT [--local_rank=L] ARGS...` with the rank's environment, writes
rank<R>.out, rank<R>.err and rank<R>.exit under $DS_GRACE_RANK_LOG_DIR, forwards SIGTERM/SIGINT
(the launcher's way to stop a node's ranks) and exits with the script's status (128 + signal
number when a signal ended it), so the launcher sees every failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: rank_exec.py SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    log_dir = Path(os.environ["DS_GRACE_RANK_LOG_DIR"])
    rank = os.environ["RANK"]
    script, *script_args = sys.argv[1:]
    if os.environ.get("DS_GRACE_PASS_LOCAL_RANK") == "1":
        script_args = [f"--local_rank={os.environ['LOCAL_RANK']}", *script_args]
    with open(log_dir / f"rank{rank}.out", "wb") as out, open(log_dir / f"rank{rank}.err", "wb") as err:
        child = subprocess.Popen([sys.executable, "-u", script, *script_args], stdout=out, stderr=err)

    def forward(signum: int, _frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    (log_dir / f"rank{rank}.exit").write_text(f"{code}\n")
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
