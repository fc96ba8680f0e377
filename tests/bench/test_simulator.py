"""The scale simulator's cost model: a hand-computed tiny case and monotonicity in bandwidth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.simulator import LinkModel, Traffic, forward_time, grace_traffic, stage_terms, vanilla_traffic
from ds_grace.comm.all_to_all import header_row_bytes
from ds_grace.planning.plan import LayerPlan
from ds_grace.topology import Topology
from ds_grace.trace import synthetic


def test_hand_computed_two_nodes_one_gpu_each() -> None:
    # rank 0 (node 0) sends 1000 B to rank 1 (node 1), which sends 500 B back in the next stage;
    # compute: rank 1 runs 3 rows at 0.01 s, rank 0 one row.
    topology = Topology(2, 1)
    forward = np.array([[0.0, 1000.0], [0.0, 0.0]])
    back = np.array([[0.0, 0.0], [500.0, 0.0]])
    traffic = Traffic(stages=(forward, back), rows_R=np.array([1.0, 3.0]), row_stages=2)
    model = LinkModel(
        inter_bytes_per_s=1000.0,
        gpus_per_link=1,
        intra_bytes_per_s=1e9,
        alpha_s=0.1,
        row_s=0.01,
        overhead_s=0.05,
    )
    # stages: (0.1 + 1000/1000) + (0.1 + 500/1000); compute 3 x 0.01; overhead 0.05
    assert forward_time(traffic, topology, model) == pytest.approx(1.1 + 0.6 + 0.03 + 0.05)


def test_link_shared_by_the_gpus_of_a_node_and_larger_direction_counts() -> None:
    topology = Topology(2, 2)
    bytes_RR = np.zeros((4, 4))
    bytes_RR[0, 2] = 300.0  # node 0 -> node 1
    bytes_RR[1, 3] = 200.0  # node 0 -> node 1, same link
    bytes_RR[2, 0] = 100.0  # node 1 -> node 0
    bytes_RR[0, 1] = 50.0  # inside node 0
    inter, intra = stage_terms(bytes_RR, topology, gpus_per_link=2)
    assert inter == 500.0  # one link per node carries both ranks' bytes
    assert intra == 50.0
    inter_per_gpu, _ = stage_terms(bytes_RR, topology, gpus_per_link=1)
    assert inter_per_gpu == 300.0  # one link per GPU: the busiest GPU's link


def test_vanilla_traffic_is_the_padded_buffer() -> None:
    topology = Topology(2, 2)
    ids_RTK = np.array([[[0, 1], [0, 2]], [[0, 3], [4, 5]], [[6, 7], [0, 1]], [[2, 3], [4, 5]]])
    traffic = vanilla_traffic(
        ids_RTK, num_experts=8, hidden=4, itemsize=4, topology=topology, drop_tokens=False
    )
    capacity = 2  # expert 0 is chosen twice on rank 0: the group's largest count
    per_peer = 2 * capacity * 4 * 4  # 2 experts per rank
    assert traffic.stages[0][0, 1] == per_peer == traffic.stages[0][0, 0]  # its own block too
    assert stage_terms(traffic.stages[0], topology, 1) == (2 * per_peer, per_peer)  # own block: no link
    assert traffic.rows_R.tolist() == [8 * capacity] * 4


def test_grace_hierarchical_sends_a_token_once_per_remote_node() -> None:
    # 2 nodes x 2 GPUs; experts 0..3 on ranks 0..3; a token on rank 0 choosing experts 2 and 3 (both on node 1)
    topology = Topology(2, 2)
    layer = LayerPlan.from_lists(slots=[[0], [1], [2], [3]], primary=[0, 1, 2, 3])
    ids_RTK = np.array([[[2, 3]], [[0, 1]], [[0, 1]], [[2, 3]]])
    flat = grace_traffic(
        ids_RTK, layer=layer, topology=topology, policy="tar", path="flat", hidden=8, itemsize=4
    )
    hier = grace_traffic(
        ids_RTK, layer=layer, topology=topology, policy="tar", path="hierarchical", hidden=8, itemsize=4
    )
    row = 8 * 2 + 8 * 4  # K codes + K weights + hidden
    assert flat.stages[1][0, 2] == row and flat.stages[1][0, 3] == row  # flat: once per remote GPU
    stage1 = hier.stages[1]
    assert stage1[0, 2] == row and stage1[0, 3] == 0  # hierarchical: once to the peer GPU of node 1
    assert hier.stages[2][2, 3] == row  # then inside node 1 to the GPU hosting expert 3
    assert hier.stages[3][3, 2] == 8 * 4  # combine replays hop 2 back with the hidden vector only
    assert hier.rows_R.tolist() == flat.rows_R.tolist() == [2.0, 2.0, 2.0, 2.0]
    # one header round (the runtime's header row to every peer), then the payload hops there and back
    assert len(flat.stages) == 3 and len(hier.stages) == 5
    flat_header = header_row_bytes(gpus_per_node=2, slot_stride=1, extra=0, hierarchical=False)
    hier_header = header_row_bytes(gpus_per_node=2, slot_stride=1, extra=0, hierarchical=True)
    assert flat.stages[0][0, 3] == flat_header and hier.stages[0][1, 2] == hier_header > flat_header


def test_low_latency_sends_a_fixed_buffer_to_every_peer_without_a_header() -> None:
    topology = Topology(2, 2)
    layer = LayerPlan.from_lists(slots=[[0, 4], [1, 5], [2, 6], [3, 7]], primary=[0, 1, 2, 3, 0, 1, 2, 3])
    ids_RTK = np.array([[[2, 3], [0, 1]], [[0, 1], [4, 5]], [[0, 1], [6, 7]], [[2, 3], [2, 4]]])
    traffic = grace_traffic(ids_RTK, layer=layer, topology=topology, policy="tar", path="hierarchical",
                            hidden=8, itemsize=4, low_latency_rows=2)  # fmt: skip
    row = 8 * 2 + 8 * 4
    assert len(traffic.stages) == 2  # dispatch and combine buffers, no header round
    assert (traffic.stages[0] == 2 * row).all()  # 2 rows (every token) to every peer
    assert (traffic.stages[1] == 2 * 8 * 4).all()
    # the experts compute their routed rows (each expert has one instance: rank e % 4), not every row
    assert traffic.rows_R.tolist() == [5.0, 4.0, 4.0, 3.0] == np.bincount(ids_RTK.ravel() % 4).tolist()


def test_predictions_monotone_in_bandwidth() -> None:
    topology = Topology(2, 2)
    trace = synthetic(num_layers=1, num_experts=8, top_k=2, num_tokens=64, seed=1)
    ids_RTK = trace.topk_ids[0].reshape(4, 16, 2)
    layer = LayerPlan.from_lists(slots=[[0, 1], [2, 3], [4, 5], [6, 7]], primary=[0, 0, 1, 1, 2, 2, 3, 3])
    traffics = [
        vanilla_traffic(ids_RTK, num_experts=8, hidden=64, itemsize=4, topology=topology, drop_tokens=False),
        grace_traffic(
            ids_RTK, layer=layer, topology=topology, policy="tar", path="hierarchical", hidden=64, itemsize=4
        ),
    ]
    base = LinkModel(inter_bytes_per_s=1e6, gpus_per_link=2, intra_bytes_per_s=1e8, alpha_s=1e-4, row_s=1e-5)
    for traffic in traffics:
        times = [
            forward_time(traffic, topology, dataclasses.replace(base, inter_bytes_per_s=rate))
            for rate in (1e5, 1e6, 1e7, 1e8)
        ]
        assert all(a > b for a, b in zip(times, times[1:]))
    assert forward_time(traffics[1], topology, base) < forward_time(traffics[0], topology, base)
