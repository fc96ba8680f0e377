"""GRACE against vanilla DeepSpeed-MoE in one launch (``launch/generate.py --compare-vanilla``).

Latencies are never single samples: after the warm-up, the generation is timed ``repeats`` times and
each latency is summarised by its median and its range (min..max); a speedup is the ratio of the
medians, with the range it can take between the two runs' extremes. Vanilla DeepSpeed-MoE may refuse
a set-up GRACE serves (its experts must divide evenly over the ranks): the refusal is one line in the
report, and GRACE's results stand.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

Result = TypeVar("Result")


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one latency (ms)."""

    samples_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("a timing needs at least one sample")

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples_ms))

    @property
    def low(self) -> float:
        return float(min(self.samples_ms))

    @property
    def high(self) -> float:
        return float(max(self.samples_ms))

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "samples": list(self.samples_ms)}


def timed_repeats(run: Callable[[], tuple[float, float]], *, repeats: int) -> tuple[Timing, Timing]:
    """(prefill, decode per token) Timings of `repeats` calls of `run`, each returning (prefill_ms,
    decode_ms_per_token) as agreed by every rank (the slowest rank's)."""
    if repeats < 1:
        raise ValueError(f"repeats ({repeats}) must be >= 1")
    prefill, decode = zip(*(run() for _ in range(repeats)))
    return Timing(tuple(prefill)), Timing(tuple(decode))


def speedup(baseline: Timing, ours: Timing) -> dict[str, float]:
    """baseline / ours: the ratio of the medians, and the lowest and highest ratio the samples allow."""
    tiny = 1e-9
    return {
        "median": baseline.median / max(ours.median, tiny),
        "min": baseline.low / max(ours.high, tiny),
        "max": baseline.high / max(ours.low, tiny),
    }


def unless_refused(serve: Callable[[], Result]) -> tuple[Result | None, str | None]:
    """(serve(), None), or (None, the reason) when serving is refused for its input (a config, plan or
    checkpoint error, raised by every rank before any collective). Anything else propagates."""
    from ds_grace.cli import error_line, is_input_error

    try:
        return serve(), None
    except Exception as exc:  # noqa: BLE001 - only input errors are kept as a refusal, the rest re-raise
        if not is_input_error(exc):
            raise
        return None, error_line(exc).removeprefix("error: ")


def comparison_line(report: dict[str, Any]) -> str:
    """The last line of a --compare-vanilla run: speedups with their range, or why vanilla was refused."""
    if report.get("vanilla_refused"):
        return f"vanilla DeepSpeed-MoE refused this set-up ({report['vanilla_refused']}); GRACE's results above stand"
    parts = []
    for phase in ("prefill", "decode"):
        ratio = report["speedup"][phase]
        parts.append(f"{phase} x{ratio['median']:.2f} (x{ratio['min']:.2f}-x{ratio['max']:.2f})")
    return (
        f"GRACE vs vanilla (median of {report['repeats']} runs, range over them): {', '.join(parts)}, "
        f"same tokens: {report['same_tokens']}"
    )
