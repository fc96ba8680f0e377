"""Hardware profiles and the compute:link ratio each emulated setting mimics.

The ratio that decides how much of an MoE layer's time communication takes is

    kappa = (time to move one expert input row over the link, per GPU)
            / (time one GPU takes to run one expert on that row)

with the link shared by the GPUs behind it. For real hardware (peak dense bf16 rates, rows in bf16,
SwiGLU experts: 3 matrices, 2 flops per multiply-add):

    kappa_hw = (2 * D / (B_link / GPUs_per_link)) / (2 * 3 * D * F / peak_flops)

For the emulated cluster: one link of `rate` Mbit/s per node shared by its ranks, fp32 rows of the
benchmark's hidden size, and the expert time per row measured on this machine's cores during the run
(all ranks computing at once). A setting "mimics" the hardware profile whose kappa is closest (log scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchmarks.workloads import ModelShape


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    label: str
    peak_flops: float  # dense bf16, per GPU
    inter_node_bytes_per_s: float  # per link
    gpus_per_link: int  # GPUs sharing one inter-node link
    intra_node_bytes_per_s: float  # per GPU (NVLink, one direction)
    inter_latency_s: float
    intra_latency_s: float


A100_ETHERNET = HardwareProfile(
    name="a100_25gbe",
    label="A100 + 25 Gb/s Ethernet (one NIC per node of 8)",
    peak_flops=312e12,
    inter_node_bytes_per_s=25e9 / 8,
    gpus_per_link=8,
    intra_node_bytes_per_s=300e9,
    inter_latency_s=20e-6,
    intra_latency_s=5e-6,
)
H100_INFINIBAND = HardwareProfile(
    name="h100_400ib",
    label="H100 + 400 Gb/s InfiniBand (one NIC per GPU)",
    peak_flops=989e12,
    inter_node_bytes_per_s=400e9 / 8,
    gpus_per_link=1,
    intra_node_bytes_per_s=450e9,
    inter_latency_s=5e-6,
    intra_latency_s=3e-6,
)
PROFILES = (A100_ETHERNET, H100_INFINIBAND)


def hardware_kappa(shape: ModelShape, profile: HardwareProfile, *, gpus_per_link: int | None = None) -> float:
    """kappa of the real model `shape` on `profile` (see module docstring)."""
    sharing = profile.gpus_per_link if gpus_per_link is None else gpus_per_link
    row_bytes = 2 * shape.real_hidden
    link_s = row_bytes / (profile.inter_node_bytes_per_s / sharing)
    compute_s = 2 * shape.real_matrices * shape.real_hidden * shape.real_ffn / profile.peak_flops
    return link_s / compute_s


def emulated_kappa(
    shape: ModelShape, *, rate_mbit: float, ranks_per_node: int, expert_s_per_row: float
) -> float:
    row_bytes = 4 * shape.hidden
    link_s = row_bytes / (rate_mbit * 1e6 / 8 / ranks_per_node)
    return link_s / expert_s_per_row


def mimicked_profile(kappa: float, shape: ModelShape, *, gpus_per_node: int) -> dict[str, object]:
    """The hardware profile whose kappa is closest to `kappa` (log distance), each profile's link shared
    by at most `gpus_per_node` GPUs as in the emulated cluster (the paper's 2 x 2 A100 nodes share one
    25 GbE link per node; H100 nodes have one NIC per GPU)."""
    candidates = {
        p.name: hardware_kappa(shape, p, gpus_per_link=min(p.gpus_per_link, gpus_per_node)) for p in PROFILES
    }
    best = min(candidates, key=lambda name: abs(math.log(kappa / candidates[name])))
    return {"closest": best, "hardware_kappa": candidates}
