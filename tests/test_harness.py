"""ds_grace.comm.local_ranks.run_on_ranks: results by rank, and every way a rank can fail."""

from __future__ import annotations

import os
import re
import time

import pytest

from ds_grace.comm.local_ranks import RankContext, RankFailure, run_on_ranks
from ds_grace.topology import Topology

pytestmark = pytest.mark.multirank

OTHER_RANKS_SLEEP_S = 120.0


def _describe_rank(ctx: RankContext) -> dict[str, object]:
    import torch
    import torch.distributed as dist

    total = torch.tensor([ctx.rank + 1])
    dist.all_reduce(total)
    return {
        "rank": ctx.rank,
        "dist_rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "node": int(os.environ["CROSS_RANK"]),
        "local_size": int(os.environ["LOCAL_SIZE"]),
        "sum_of_rank_plus_one": int(total.item()),
        "pid": os.getpid(),
        # a tensor outliving its process: the parent must still read it after the rank exits
        "tensor": torch.full((256, 256), float(ctx.rank)),
    }


def _raise_on_rank_one(ctx: RankContext) -> int:
    if ctx.rank == 1:
        raise ValueError("rank 1 refuses: sentinel-42")
    time.sleep(OTHER_RANKS_SLEEP_S)
    return ctx.rank


def _hang_on_rank_one(ctx: RankContext) -> int:
    if ctx.rank == 1:
        time.sleep(3600)
    return ctx.rank


def _die_on_rank_one(ctx: RankContext) -> int:
    if ctx.rank == 1:
        os._exit(7)
    time.sleep(OTHER_RANKS_SLEEP_S)
    return ctx.rank


def test_results_come_back_by_rank_with_comm_initialised():
    topology = Topology(num_nodes=2, gpus_per_node=2)
    results = run_on_ranks(_describe_rank, topology=topology, timeout_s=120)
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    assert [r["dist_rank"] for r in results] == [0, 1, 2, 3]
    assert [r["world_size"] for r in results] == [4, 4, 4, 4]
    assert [r["local_rank"] for r in results] == [0, 1, 0, 1]
    assert [r["node"] for r in results] == [0, 0, 1, 1]
    assert [r["local_size"] for r in results] == [2, 2, 2, 2]
    assert [r["sum_of_rank_plus_one"] for r in results] == [10, 10, 10, 10]
    assert len({r["pid"] for r in results}) == 4 and os.getpid() not in {r["pid"] for r in results}
    assert [float(r["tensor"].mean()) for r in results] == [0.0, 1.0, 2.0, 3.0]


def test_raising_rank_traceback_reaches_parent_and_stops_the_others():
    start = time.monotonic()
    with pytest.raises(RankFailure) as excinfo:
        run_on_ranks(_raise_on_rank_one, topology=Topology(num_nodes=1, gpus_per_node=2), timeout_s=180)
    elapsed = time.monotonic() - start
    message = str(excinfo.value)
    assert "1 rank(s) failed on 1 nodes x 2 GPUs" in message
    assert "--- rank 1 ---" in message
    assert "Traceback (most recent call last)" in message
    assert "in _raise_on_rank_one" in message
    assert "ValueError: rank 1 refuses: sentinel-42" in message
    # rank 0 sleeps OTHER_RANKS_SLEEP_S; it must have been killed, not waited for
    assert elapsed < OTHER_RANKS_SLEEP_S / 2, f"took {elapsed:.1f} s"


def test_hanging_rank_hits_the_hard_timeout():
    timeout_s = 10
    start = time.monotonic()
    with pytest.raises(RankFailure) as excinfo:
        run_on_ranks(_hang_on_rank_one, topology=Topology(num_nodes=1, gpus_per_node=2), timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    message = str(excinfo.value)
    assert re.search(r"timed out after 10 s waiting for ranks \[(0, )?1\]", message), message
    assert timeout_s <= elapsed < timeout_s + 20, f"took {elapsed:.1f} s"


def test_dying_rank_is_reported_with_its_exit_code():
    start = time.monotonic()
    with pytest.raises(RankFailure) as excinfo:
        run_on_ranks(_die_on_rank_one, topology=Topology(num_nodes=1, gpus_per_node=2), timeout_s=180)
    elapsed = time.monotonic() - start
    message = str(excinfo.value)
    assert "--- rank 1 ---" in message
    assert re.search(
        r"rank 1 \(host \S+, pid \d+\) stopped answering: exit code 7, without reporting", message
    )
    assert (
        "rank 1 (exit code 7) stopped answering on 1 nodes x 2 GPUs; the other ranks (0) were shut down"
        in message
    )
    assert elapsed < OTHER_RANKS_SLEEP_S / 2, f"took {elapsed:.1f} s"


def _environment_of_rank(ctx: RankContext, name: str) -> tuple[str | None, str, bool]:
    import sys

    return os.environ.get(name), os.getcwd(), "deepspeed" in sys.modules


@pytest.mark.parametrize("value", ["first", "second"])
def test_ranks_start_in_the_callers_environment_and_directory(monkeypatch, tmp_path, value):
    """Ranks fork from a server started once (torch and DeepSpeed imported there): each run still
    sees the environment and working directory of its caller at the time of the call."""
    monkeypatch.setenv("DS_GRACE_HARNESS_MARK", value)
    monkeypatch.chdir(tmp_path)
    seen = run_on_ranks(
        _environment_of_rank, topology=Topology(num_nodes=1, gpus_per_node=2), args=("DS_GRACE_HARNESS_MARK",)
    )
    assert seen == [(value, str(tmp_path), True)] * 2


def _shared_memory_of_rank(ctx: RankContext, serve: str) -> tuple[bool, bool, str]:
    """(DeepSpeed's CPU allreduce segment of this rank is named in /dev/shm after the process group
    started, and still after init_inference's start-up handshake, the error it raised) when `serve`
    is "agree" (the ranks pass the same launch fields) or "mismatch" (each rank its own)."""
    import ds_grace
    from ds_grace.comm.agreement import RankMismatchError
    from ds_grace.comm.shared_memory import shared_memory_name
    from ds_grace.models.toy import ToyMoEConfig, ToyMoEModel

    started, error = shared_memory_name(ctx.rank, os.environ).exists(), ""
    if serve != "no":
        model = ToyMoEModel(ToyMoEConfig(num_experts=4, ep_size=1))
        prompt = ctx.rank if serve == "mismatch" else 0
        try:
            ds_grace.init_inference(model, config={"dtype": "fp32"}, agree_on={"prompt": prompt})
        except RankMismatchError as exc:
            error = type(exc).__name__
    return started, shared_memory_name(ctx.rank, os.environ).exists(), error


@pytest.mark.parametrize("serve", ["no", "agree", "mismatch"], ids=["ranks", "init_inference", "refused"])
def test_no_shared_memory_segment_outlives_its_ranks(serve):
    """DeepSpeed maps one /dev/shm segment per rank when every rank is on one machine and never unlinks
    it: init_inference unlinks its rank's name once the handshake shows every rank started (whether the
    ranks agree or not), and run_on_ranks every rank's once they are gone (the memory is freed with the
    last mapping)."""
    from ds_grace.comm.shared_memory import shared_memory_name

    topology = Topology(num_nodes=1, gpus_per_node=2)  # every rank local: DeepSpeed's shm allreduce
    seen = run_on_ranks(_shared_memory_of_rank, topology=topology, args=(serve,))
    error = "RankMismatchError" if serve == "mismatch" else ""
    assert seen == [(True, serve == "no", error)] * 2
    assert not any(shared_memory_name(rank, os.environ).exists() for rank in range(2))
