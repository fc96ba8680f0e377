#!/usr/bin/env bash
# GPU check: GraceMoE vs DeepSpeed's MOELayer, one MoE layer forward in bf16 on one GPU
# (NCCL world of 1, all experts local). Checks that both give the same output (bf16 tolerance)
# and times both; prints a table and one JSON line, and writes benchmarks/results/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh            # needs a CUDA GPU; finishes in well under 8 minutes
#
# Exit status: 0 parity held for every size, 1 parity failed, 2 no GPU / setup problem.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

timeout 480 python - "$@" <<'PYEOF'
"""GraceMoE vs DeepSpeed MOELayer on one GPU (bf16, NCCL world of 1)."""

import json
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

if not torch.cuda.is_available():
    print("error: no CUDA GPU visible (torch.cuda.is_available() is False); this check needs one", file=sys.stderr)
    sys.exit(2)

import deepspeed
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from ds_grace.moe.layer import GraceMoE, RuntimeOptions
from ds_grace.planning.plan import LayerPlan
from ds_grace.topology import Topology

HIDDEN, FFN, EXPERTS, TOP_K = 2048, 1024, 64, 8  # OLMoE-sized layer
TOKENS = (256, 4096, 16384)
WARMUP, ITERS = 5, 20
RELATIVE_TOLERANCE = 3e-2  # bf16: partial sums are rounded differently (same bound as ds-grace selfcheck)

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
torch.cuda.set_device(0)
deepspeed.init_distributed(
    dist_backend="nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
    timeout=timedelta(seconds=120), auto_mpi_discovery=False, verbose=False,
)
device = torch.device("cuda", 0)
torch.manual_seed(0)
expert = nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))
moe = MoE(
    HIDDEN, expert, num_experts=EXPERTS, ep_size=1, k=TOP_K, drop_tokens=False, use_rts=False,
    top2_2nd_expert_sampling=False, min_capacity=0, eval_capacity_factor=1.0,
)
with torch.no_grad():
    for param in moe.deepspeed_moe.experts.parameters():
        param.copy_(torch.randn(param.shape) / param.shape[-1] ** 0.5)
    skew = torch.linspace(2.0, 0.0, EXPERTS).unsqueeze(1) / HIDDEN**0.5  # some experts favoured
    moe.deepspeed_moe.gate.wg.weight.copy_(torch.randn(EXPERTS, HIDDEN) / HIDDEN**0.5 + skew)
moe.set_deepspeed_parallelism()
moe = moe.to(device).eval()
for name, param in moe.named_parameters():
    if "gate" not in name:
        param.data = param.data.to(torch.bfloat16)
topology = Topology(1, 1)
plan = LayerPlan.from_lists(slots=[list(range(EXPERTS))], primary=[0] * EXPERTS)
grace = GraceMoE.from_deepspeed(
    moe, layer_plan=plan, topology=topology, ep_index=0, options=RuntimeOptions(hierarchical=False)
).to(device).eval()


def timed(layer, x):
    samples = []
    with torch.no_grad():
        for i in range(WARMUP + ITERS):
            torch.cuda.synchronize()
            start = time.perf_counter()
            layer(x)
            torch.cuda.synchronize()
            if i >= WARMUP:
                samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


rows, ok = [], True
for tokens in TOKENS:
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens)).to(device, torch.bfloat16)
    with torch.no_grad():
        y_ds = moe(x)[0].float()
        y_grace = grace(x)[0].float()
    diff = float((y_ds - y_grace).abs().max())
    scale = max(1.0, float(y_ds.abs().max()))
    parity = diff <= RELATIVE_TOLERANCE * scale
    ok &= parity
    ds_ms, grace_ms = timed(moe, x), timed(grace, x)
    rows.append({"tokens": tokens, "deepspeed_ms": ds_ms, "grace_ms": grace_ms, "speedup": ds_ms / grace_ms,
                 "max_abs_diff": diff, "tolerance": RELATIVE_TOLERANCE * scale, "parity": parity})

result = {
    "benchmark": "gpu_check", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
    "deepspeed": deepspeed.__version__, "dtype": "bf16", "hidden": HIDDEN, "ffn": FFN, "experts": EXPERTS,
    "top_k": TOP_K, "rows": rows, "parity": ok,
}
print(f"{'tokens':>7} {'DeepSpeed ms':>13} {'GRACE ms':>9} {'DS/GRACE':>9} {'max|dy|':>9} parity")
for r in rows:
    print(f"{r['tokens']:>7} {r['deepspeed_ms']:>13.3f} {r['grace_ms']:>9.3f} {r['speedup']:>9.2f} "
          f"{r['max_abs_diff']:>9.2e} {'yes' if r['parity'] else 'NO'}")
print(json.dumps(result))
out = Path("benchmarks/results/gpu_check.json")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=1))
dist.destroy_process_group()
sys.exit(0 if ok else 1)
PYEOF
