"""Rank script of `ds-grace bench`: started once per rank by the deepspeed launcher (emulated
cluster or local ranks), it joins the job (env://, gloo), runs the spec and, on rank 0, prints the
results as one JSON line.

    python benchmarks/worker.py SPEC_JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import deepspeed
    import torch

    from benchmarks.runner import result_line, run_spec_on_rank
    from ds_grace.comm.shared_memory import release_shared_memory_names
    from ds_grace.topology import Topology

    torch.set_num_threads(1)
    spec = json.loads(args.spec.read_text())
    topology = Topology(int(spec["topology"]["num_nodes"]), int(spec["topology"]["gpus_per_node"]))
    deepspeed.init_distributed(
        dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
        timeout=timedelta(seconds=float(spec.get("timeout_s", 300.0))),
    )  # fmt: skip
    import torch.distributed as dist

    if dist.get_world_size() != topology.world_size:
        print(
            f"error: the job has {dist.get_world_size()} ranks but the spec's topology ({topology}) has "
            f"{topology.world_size}",
            file=sys.stderr,
        )
        return 2
    dist.barrier()  # every rank has started: none opens DeepSpeed's shared-memory segments by name again
    release_shared_memory_names([dist.get_rank()], os.environ)
    results = run_spec_on_rank(spec, rank=dist.get_rank(), topology=topology)
    if results is not None:
        print(result_line(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    from ds_grace.comm.collectives import end_process

    end_process(code)  # a rank: past the interpreter's teardown (see ds_grace.comm.collectives)
