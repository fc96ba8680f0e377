"""The ``ds_grace`` logger (the standard logging module) and DeepSpeed's start-up notices.

``rank_logger(rank)`` gives the "ds_grace" logger, given a stderr handler on first use when the
application configured none: INFO on rank 0 and WARNING on the other ranks, so that one rank tells the
operator what happened (plan loaded and its hash, bytes each rank read, handshake passed, online
re-plans, each layer's all-to-all paths at exit). ``DS_GRACE_LOG_LEVEL`` (DEBUG, INFO, WARNING, ...)
sets the level on every rank; an application's own handlers and levels are left as they are.

``quiet_deepspeed_accelerator()`` names the accelerator for DeepSpeed (``DS_ACCELERATOR=cpu``) when no
CUDA device is visible, before DeepSpeed is imported: its auto-detection otherwise warns on every
process that it fell back to the CPU. The variable is inherited by ranks the command starts.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER_NAME = "ds_grace"
ENV_LOG_LEVEL = "DS_GRACE_LOG_LEVEL"
ENV_ACCELERATOR = "DS_ACCELERATOR"

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

logger = logging.getLogger(LOGGER_NAME)


def rank_logger(rank: int) -> logging.Logger:
    """The ds_grace logger, set up once for this process's rank (see the module docstring)."""
    if not logger.handlers and not logging.getLogger().handlers:
        level = os.environ.get(ENV_LOG_LEVEL, "INFO" if rank == 0 else "WARNING").upper()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[ds_grace rank {rank}] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        if level not in LEVELS:
            from ds_grace.config import GraceConfigError

            raise GraceConfigError(
                f"environment variable {ENV_LOG_LEVEL} ({os.environ[ENV_LOG_LEVEL]!r}) must be one of {', '.join(LEVELS)}"
            )
        logger.setLevel(level)
    return logger


def quiet_deepspeed_accelerator() -> None:
    """DS_ACCELERATOR=cpu when it is unset and torch sees no CUDA device (call before importing deepspeed)."""
    if ENV_ACCELERATOR in os.environ or "deepspeed" in sys.modules:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ[ENV_ACCELERATOR] = "cpu"


def format_bytes(count: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
