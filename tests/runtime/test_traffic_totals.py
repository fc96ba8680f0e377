"""engine.grace.traffic(total=True): every layer's counters summed over the layers and over all ranks."""

from __future__ import annotations

import pytest

from ds_grace.comm.counters import TrafficCounters, summed_traffic
from ds_grace.comm.local_ranks import RankContext, run_on_ranks
from ds_grace.topology import Topology

TOPOLOGY = Topology(num_nodes=2, gpus_per_node=1)


def _layer_counters(rank: int, layer: int) -> TrafficCounters:
    counters = TrafficCounters()
    peer = 1 - rank
    counters.record_exchange(
        "dispatch", send_rows=[0, 0], recv_rows=[0, 0], peer_ep_ranks=[rank, peer], ep_index=rank,
        topology=TOPOLOGY, bytes_per_row=4,
    )  # fmt: skip
    rows = [0, 0]
    rows[peer] = 10 * (rank + 1) + layer
    counters.record_exchange(
        "combine", send_rows=rows, recv_rows=rows, peer_ep_ranks=[0, 1], ep_index=rank, topology=TOPOLOGY,
        bytes_per_row=4,
    )  # fmt: skip
    counters.record_exchange(
        "sizes", send_rows=[1, 1], recv_rows=[1, 1], peer_ep_ranks=[0, 1], ep_index=rank, topology=TOPOLOGY,
        bytes_per_row=8,
    )  # fmt: skip
    return counters


def _totals_rank(ctx: RankContext) -> dict:
    return summed_traffic([_layer_counters(ctx.rank, layer).snapshot() for layer in range(3)])


@pytest.mark.multirank
def test_traffic_totals_sum_layers_and_ranks():
    results = run_on_ranks(_totals_rank, topology=TOPOLOGY, timeout_s=120)
    assert results[0] == results[1]  # every rank gets the same totals
    totals = results[0]
    # rank 0 sends 10, 11, 12 rows over its 3 layers, rank 1 sends 20, 21, 22: all across the node boundary
    assert totals["ranks"] == 2
    assert totals["stages"]["combine"]["rows_sent_inter"] == 33 + 63
    assert totals["total"]["bytes_sent_inter"] == 4 * (33 + 63)
    assert totals["stages"]["sizes"]["rows_sent_inter"] == 6  # counted in stages, left out of the total
    assert totals["total"]["rows_sent_intra"] == 0


def test_traffic_totals_without_a_process_group_are_this_ranks():
    totals = summed_traffic([_layer_counters(0, layer).snapshot() for layer in range(2)])
    assert totals["ranks"] == 1
    assert totals["total"]["rows_recv_inter"] == 10 + 11
