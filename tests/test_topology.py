import pytest

from ds_grace.topology import Topology, hierarchical_rank_layout


def test_hierarchical_rank_layout_2x2():
    assert hierarchical_rank_layout(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])


def test_hierarchical_rank_layout_extremes():
    assert hierarchical_rank_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    assert hierarchical_rank_layout(4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    assert hierarchical_rank_layout(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_hierarchical_rank_layout_rejects_ragged():
    with pytest.raises(
        ValueError, match=r"world_size \(6\) must be a positive multiple of gpus_per_node \(4\)"
    ):
        hierarchical_rank_layout(6, 4)


def test_topology_maps():
    topo = Topology(num_nodes=2, gpus_per_node=4)
    assert topo.world_size == 8
    assert [topo.node_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [topo.local_rank_of(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert topo.ranks_of_node(1) == [4, 5, 6, 7]
    assert topo.peer_rank(5, 0) == 1
    with pytest.raises(ValueError, match=r"rank \(8\) must be in \[0, 8\)"):
        topo.node_of(8)


def test_topology_validates():
    with pytest.raises(ValueError, match=r"topology.num_nodes \(0\) must be an integer >= 1"):
        Topology(num_nodes=0, gpus_per_node=2)
