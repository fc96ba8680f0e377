"""The runtime's measured rows per stage equal the traffic model's (ds_grace.comm.schedule): one
forward per path on 4 spawned gloo ranks (2 nodes x 2), uneven tokens, a route not taken."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.count_hot_path import TOP_K, make_layer
from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.comm.schedule import cross_node_mask, fixed_rows, path_rows
from ds_grace.routing import choose_instances
from ds_grace.topology import Topology

TOPOLOGY = Topology(2, 2)
PATHS = ("flat", "hierarchical", "low-latency")
ROWS_PER_PEER = 16


def _tokens(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    tokens = 4 + 3 * rank  # uneven
    ids_TK = torch.stack([torch.randperm(8, generator=generator)[:TOP_K] for _ in range(tokens)])
    if rank == 1:
        ids_TK[0, 1] = -1  # a route not taken
    return (
        torch.randn(tokens, 16, generator=generator),
        ids_TK,
        torch.rand(tokens, TOP_K, generator=generator),
    )


def _rank(ctx: RankContext) -> dict:
    x_TD, ids_TK, w_TK = _tokens(ctx.rank)
    out: dict = {}
    with torch.no_grad():
        for path in PATHS:
            layer, _ = make_layer(path, ctx.rank)
            moe = layer.deepspeed_moe
            table = moe.route_table(x_TD.device, low_latency=path == "low-latency")
            rank_TK, _ = choose_instances(table, ids_TK, origin_rank=ctx.rank)
            kwargs = {"low_latency_tokens": ROWS_PER_PEER} if path == "low-latency" else {}
            layer.forward_routed(x_TD, ids_TK, w_TK, **kwargs)
            assert moe.last_path == path
            out[path] = {"rank_TK": rank_TK.numpy(), "stages": layer.comm_counters.snapshot()["stages"]}
    return out


def _member_TR(rank_TK: np.ndarray) -> np.ndarray:
    member_TR = np.zeros((len(rank_TK), TOPOLOGY.world_size + 1), dtype=bool)
    member_TR[np.arange(len(rank_TK))[:, None], rank_TK] = True  # -1: the spare last column
    return member_TR[:, :-1]


def _expected(rows_RR: np.ndarray, rank: int) -> dict[str, int]:
    """A rank's counter fields for one stage whose rows are rows_RR[sender, receiver] (self left out)."""
    crosses_R, others_R = cross_node_mask(TOPOLOGY)[rank], np.arange(TOPOLOGY.world_size) != rank
    return {
        "rows_sent_intra": int(rows_RR[rank, others_R & ~crosses_R].sum()),
        "rows_sent_inter": int(rows_RR[rank, crosses_R].sum()),
        "rows_recv_intra": int(rows_RR[others_R & ~crosses_R, rank].sum()),
        "rows_recv_inter": int(rows_RR[crosses_R, rank].sum()),
    }


@pytest.mark.multirank
def test_measured_rows_per_stage_equal_the_schedule_rows():
    results = run_on_ranks(_rank, topology=TOPOLOGY, timeout_s=120)
    world = TOPOLOGY.world_size
    stage_names = {
        "flat": (["dispatch"], ["combine"]),
        "hierarchical": (["dispatch.stage1", "dispatch.stage2"], ["combine.stage1", "combine.stage2"]),
        "low-latency": (["dispatch.ll"], ["combine.ll"]),
    }
    for path in PATHS:
        if path == "low-latency":
            per_origin = [fixed_rows(ROWS_PER_PEER, topology=TOPOLOGY, origin=o) for o in range(world)]
        else:
            per_origin = [
                path_rows(_member_TR(results[o][path]["rank_TK"]), path=path, topology=TOPOLOGY, origin=o)
                for o in range(world)
            ]
        hops = [sum(rows[index] for rows in per_origin) for index in range(len(per_origin[0]))]
        dispatch, combine = stage_names[path]
        assert sum(hop.sum() for hop in hops) > 0
        for rank in range(world):
            measured = results[rank][path]["stages"]
            assert set(measured) == {*dispatch, *combine} | ({"sizes"} if path != "low-latency" else set())
            for name, rows_RR in zip(dispatch, hops):
                fields = {key: measured[name][key] for key in _expected(rows_RR, rank)}
                assert fields == _expected(rows_RR, rank), (path, name, rank)
            for name, rows_RR in zip(combine, hops):  # the same rows back
                fields = {key: measured[name][key] for key in _expected(rows_RR.T, rank)}
                assert fields == _expected(rows_RR.T, rank), (path, name, rank)
