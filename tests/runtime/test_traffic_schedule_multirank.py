"""The runtime's measured rows per stage equal the traffic model's (ds_grace.comm.schedule): one
dispatch and combine per path by the DispatchExecutor on 4 spawned gloo ranks (2 nodes x 2), uneven
tokens, a route not taken."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_grace.comm.all_to_all import DispatchExecutor, RowLayout
from ds_grace.comm.counters import TrafficCounters
from ds_grace.comm.groups import create_grace_groups
from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.comm.schedule import cross_node_mask, fixed_rows, path_rows
from ds_grace.routing import route_codes
from ds_grace.topology import Topology

TOPOLOGY = Topology(2, 2)
PATHS = ("flat", "hierarchical", "low-latency")
SLOTS, TOP_K, HIDDEN, ROWS_PER_PEER = 2, 3, 8, 16
STAGES = {
    "flat": (("dispatch",), ("combine",)),
    "hierarchical": (("dispatch.stage1", "dispatch.stage2"), ("combine.stage1", "combine.stage2")),
    "low-latency": (("dispatch.ll",), ("combine.ll",)),
}


def _routes(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dest_TK, slot_TK: distinct (rank, slot) routes per token, uneven token counts, one route not taken."""
    generator = torch.Generator().manual_seed(100 + rank)
    tokens = 4 + 3 * rank
    flat_TK = torch.stack(
        [torch.randperm(TOPOLOGY.world_size * SLOTS, generator=generator)[:TOP_K] for _ in range(tokens)]
    )
    dest_TK, slot_TK = flat_TK // SLOTS, flat_TK % SLOTS
    if rank == 1:
        dest_TK[0, 1] = slot_TK[0, 1] = -1
    return dest_TK, slot_TK


def _rank(ctx: RankContext) -> dict:
    groups = create_grace_groups(ctx.topology, timeout_s=60)
    dest_TK, slot_TK = _routes(ctx.rank)
    code_TK = route_codes(dest_TK, slot_TK, SLOTS)
    layout = RowLayout(k=TOP_K, hidden=HIDDEN, dtype=torch.float32)
    rows_TW = layout.pack(torch.randn(len(dest_TK), HIDDEN), code_TK, torch.rand(len(dest_TK), TOP_K))
    out: dict = {"dest_TK": dest_TK.numpy()}
    for path in PATHS:
        counters = TrafficCounters()
        executor = DispatchExecutor(
            groups=groups, slot_stride=SLOTS, num_local_slots=SLOTS, counters=counters
        )
        if path == "low-latency":
            x_VD, meta = executor.dispatch_low_latency(rows_TW, rows_per_peer=ROWS_PER_PEER, layout=layout)
            executor.combine_low_latency(x_VD, meta)
        else:
            id_range_2 = torch.tensor([0, 0])  # the ids are not checked here, only carried
            header = executor.exchange_header(code_TK, id_range_2, hierarchical=path == "hierarchical")
            x_QD, meta = executor.dispatch(rows_TW, path=path, header=header, layout=layout)
            executor.combine(x_QD, meta)
        out[path] = counters.snapshot()["stages"]
    return out


def _member_TR(dest_TK: np.ndarray) -> np.ndarray:
    member_TR = np.zeros((len(dest_TK), TOPOLOGY.world_size + 1), dtype=bool)
    member_TR[np.arange(len(dest_TK))[:, None], dest_TK] = True  # -1: the spare last column
    return member_TR[:, :-1]


def _fields(rows_RR: np.ndarray, rank: int) -> dict[str, int]:
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
    for path in PATHS:
        if path == "low-latency":
            per_origin = [fixed_rows(ROWS_PER_PEER, topology=TOPOLOGY, origin=o) for o in range(world)]
        else:
            per_origin = [
                path_rows(_member_TR(results[o]["dest_TK"]), path=path, topology=TOPOLOGY, origin=o)
                for o in range(world)
            ]
        hops = [sum(rows[index] for rows in per_origin) for index in range(len(per_origin[0]))]
        assert len(hops) == len(STAGES[path][0]) and all(hop.sum() > 0 for hop in hops)
        dispatch, combine = STAGES[path]
        for rank in range(world):
            measured = results[rank][path]
            assert set(measured) == {*dispatch, *combine} | ({"sizes"} if path != "low-latency" else set())
            for name, rows_RR in [*zip(dispatch, hops), *zip(combine, (hop.T for hop in hops))]:
                expected = _fields(rows_RR, rank)  # combine: the same rows back
                assert {key: measured[name][key] for key in expected} == expected, (path, name, rank)
