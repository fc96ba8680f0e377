"""What the GPU check measures per layer forward, apart from parity: time, host syncs, kernels, GPU idle.

Shape legend: T tokens, D hidden.

Every function takes the forward as a zero-argument callable. On a CPU device the CUDA-only numbers are
the string NOT_ON_CPU, never a number or a pass. Under a process group every rank calls the timing
function together (a barrier before each forward, the slowest rank's time kept).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

NOT_ON_CPU = "not measured on cpu"
# torch.cuda.set_sync_debug_mode("warn") issues this warning once per synchronizing CUDA call
SYNC_WARNING = "called a synchronizing CUDA operation"
FORWARD_LABEL = "layer_forward"
# CPU-side calls that launch a kernel (the CUDA runtime's and the driver's entry points)
LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"})


@dataclass(frozen=True)
class Timing:
    median_ms: float
    iters: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    forward: Callable[[], Any],
    *,
    device: torch.device,
    warmup: int,
    max_iters: int,
    budget_s: float,
) -> Timing:
    """Median wall time of `forward` (device synchronised before and after each call), after `warmup` calls.

    Stops early once the timed calls add up to `budget_s` (at least one is timed). With a process group
    each forward starts from a barrier and counts the slowest rank, so every rank stops at the same call.
    """
    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    samples: list[float] = []
    for call in range(warmup + max_iters):
        if grouped:
            dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        forward()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if grouped:
            slowest = torch.tensor([elapsed], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            elapsed = float(slowest.item())
        if call >= warmup:
            samples.append(elapsed)
            if sum(samples) >= budget_s:
                break
    return Timing(median_ms=statistics.median(samples) * 1e3, iters=len(samples))


def count_sync_warnings(messages: Iterable[str]) -> int:
    return sum(SYNC_WARNING in message for message in messages)


def host_syncs(forward: Callable[[], Any], *, device: torch.device) -> int | str:
    """Synchronizing CUDA calls in one forward, as torch.cuda.set_sync_debug_mode("warn") reports them."""
    if device.type != "cuda":
        return NOT_ON_CPU
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return count_sync_warnings(str(w.message) for w in caught)


def busy_us(intervals: Sequence[tuple[float, float]], *, start: float, end: float) -> float:
    """Length of the union of [a, b) intervals, clipped to [start, end)."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def idle_share(intervals: Sequence[tuple[float, float]], *, start: float) -> float:
    """Share of [start, last interval end) in which no interval runs (the GPU idle within a forward)."""
    if not intervals:
        return 1.0
    end = max(b for _, b in intervals)
    if end <= start:
        return 0.0
    return 1.0 - busy_us(intervals, start=start, end=end) / (end - start)


def _top_level_aten(event: Any) -> bool:
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def profile_forward(forward: Callable[[], Any], *, device: torch.device) -> dict[str, Any]:
    """One forward under torch.profiler: top-level aten ops (both devices); on CUDA also the kernels run,
    the kernel-launch calls, the memory copies and sets, and the GPU's idle share of the forward (from the
    forward's start on the host to its last GPU activity)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        with record_function(FORWARD_LABEL):
            forward()
        synchronize(device)
    events = list(prof.events())
    counts: dict[str, Any] = {
        "aten_ops": sum(_top_level_aten(e) for e in events if e.device_type == DeviceType.CPU)
    }
    if device.type != "cuda":
        counts.update(
            kernels=NOT_ON_CPU, launch_calls=NOT_ON_CPU, memcpy_memset=NOT_ON_CPU, gpu_idle_share=NOT_ON_CPU
        )
        return counts
    gpu = [e for e in events if e.device_type == DeviceType.CUDA and e.name != FORWARD_LABEL]
    copies = [e for e in gpu if e.name.startswith(("Memcpy", "Memset"))]
    window = [
        e.time_range.start for e in events if e.name == FORWARD_LABEL and e.device_type == DeviceType.CPU
    ]
    intervals = [(float(e.time_range.start), float(e.time_range.end)) for e in gpu]
    counts.update(
        kernels=len(gpu) - len(copies),
        launch_calls=sum(e.name in LAUNCH_CALLS for e in events),
        memcpy_memset=len(copies),
        gpu_idle_share=idle_share(intervals, start=float(min(window)))
        if window
        else "no forward range recorded",
    )
    return counts


def cuda_graph_replays(
    run: Callable[[torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    tolerance: Callable[[torch.Tensor], float],
    warmup: int,
    max_iters: int,
    budget_s: float,
) -> dict[str, Any]:
    """Capture `run` on inputs[0] in a CUDA graph, replay it on every input and compare with eager `run`.

    Returns status "passed" (every replay within `tolerance(eager output)` of eager), "failed" (with the
    stage, capture or replay, and the error or the worst difference), and the replay and eager times.
    """
    device = inputs[0].device
    static_x_TD = inputs[0].clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up off the default stream, as capture wants
            run(static_x_TD)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_y_TD = run(static_x_TD)
    except Exception as exc:  # noqa: BLE001 - a capture error is this check's result, reported as such
        return {
            "status": "failed",
            "stage": "capture",
            "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
        }
    worst: list[dict[str, float]] = []
    for x_TD in inputs:
        static_x_TD.copy_(x_TD)
        graph.replay()
        torch.cuda.synchronize(device)
        eager_y_TD = run(x_TD)
        diff = float((static_y_TD.float() - eager_y_TD.float()).abs().max())
        worst.append({"max_abs_diff": diff, "tolerance": tolerance(eager_y_TD)})
    passed = all(w["max_abs_diff"] <= w["tolerance"] for w in worst)
    replay = time_forward(graph.replay, device=device, warmup=warmup, max_iters=max_iters, budget_s=budget_s)
    eager = time_forward(
        lambda: run(static_x_TD), device=device, warmup=warmup, max_iters=max_iters, budget_s=budget_s
    )
    return {
        "status": "passed" if passed else "failed",
        "stage": "replay",
        "replays": worst,
        "replay_ms": replay.median_ms,
        "eager_ms": eager.median_ms,
    }
