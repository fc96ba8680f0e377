"""Build DeepSpeed's JIT-compiled CPU communication op once, before any ranks start.

Without this the first multi-rank run compiles it in every rank at once (tens of seconds each).
Run as `python -m ds_grace.commands.warmup`.
"""

from __future__ import annotations

import time


def main() -> None:
    start = time.perf_counter()
    from deepspeed.comm.torch import build_shm_op

    op = build_shm_op()
    state = "ready" if op is not None else "not available on this accelerator"
    print(f"deepspeed shm comm op {state} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
