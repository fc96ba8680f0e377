"""The drift-balance probes (benchmarks/drift_balance_probe.py): the linear-program instance choice is a
valid choice at the lowest max GPU load, the re-arrangements inside nodes keep every node's experts, and the
node-by-node fit holds the grouping's experts on each node in S slots per GPU."""

from collections import Counter

import numpy as np
import pytest

from benchmarks.drift_balance_probe import lp_routing, node_fitted, repacked, swap_within_nodes
from ds_grace.planning.metrics import routing_probabilities
from ds_grace.planning.per_node import node_members
from ds_grace.planning.plan import LayerPlan
from ds_grace.topology import Topology

TOPOLOGY = Topology(num_nodes=2, gpus_per_node=2)
# 6 experts on 4 GPUs, 2 slots each: experts 0 and 3 have a copy on each node
LAYER = LayerPlan.from_lists(slots=[[0, 1], [2, 3], [4, 0], [5, 3]], primary=[0, 0, 1, 1, 2, 3])
LOADS_E = np.array([40.0, 5.0, 10.0, 30.0, 8.0, 7.0])


def _max_load(prob_GER: np.ndarray) -> float:
    return float((LOADS_E @ prob_GER.mean(axis=0)).max())


def test_lp_routing_is_a_choice_over_hosting_ranks_at_the_lowest_max_load():
    prob_GER = lp_routing(LAYER, TOPOLOGY, LOADS_E)
    np.testing.assert_allclose(prob_GER.sum(axis=2), 1.0, atol=1e-6)
    hosts_ER = np.array([[e in slots for slots in LAYER.slots] for e in range(LAYER.num_experts)])
    assert (prob_GER[:, ~hosts_ER] < 1e-9).all()
    for policy in ("tar", "wrr", "primary"):
        assert _max_load(prob_GER) <= _max_load(routing_probabilities(LAYER, TOPOLOGY, policy)) + 1e-6
    # the lowest possible here: ranks 0 and 2 share expert 0 (5 + x = 8 + 40 - x), ranks 1 and 3 expert 3
    # (10 + y = 7 + 30 - y): 26.5 and 23.5, where TAR (each node its own copy) leaves 25 / 28 and 25 / 22
    assert _max_load(prob_GER) == pytest.approx(26.5, abs=1e-4)


def test_lp_routing_keeps_tokens_on_their_node_where_balance_allows():
    even_E = np.full(LAYER.num_experts, 10.0)
    prob_GER = lp_routing(LAYER, TOPOLOGY, even_E)
    node_of_R = np.arange(4) // 2
    cross_GE = (prob_GER * (node_of_R[None, None, :] != node_of_R[:, None, None])).sum(axis=2)
    # experts 0 and 3 have a copy on every node: none of their routes needs to cross
    assert cross_GE[:, [0, 3]].max() < 1e-6


def _node_experts(layer: LayerPlan) -> list[Counter]:
    return [Counter(e for r in (2 * n, 2 * n + 1) for e in layer.slots[r]) for n in range(2)]


def test_rearrangements_inside_nodes_keep_every_nodes_experts():
    chunks_CE = np.array([[40.0, 5.0, 10.0, 30.0, 8.0, 7.0], [10.0, 30.0, 5.0, 8.0, 40.0, 7.0]])
    for layer in (swap_within_nodes(LAYER, TOPOLOGY, chunks_CE), repacked(LAYER, TOPOLOGY, LOADS_E)):
        layer.validate()
        assert _node_experts(layer) == _node_experts(LAYER)
        assert [len(s) for s in layer.slots] == [len(s) for s in LAYER.slots]
    assert repacked(LAYER, TOPOLOGY, LOADS_E) != LAYER  # load-only packing moves experts here


def test_node_fitted_holds_each_nodes_grouped_experts_in_s_slots_per_gpu():
    rng = np.random.default_rng(0)
    loads_E = rng.integers(5, 50, size=10).astype(np.float64)
    affinity_EE = rng.random((10, 10))
    affinity_EE = affinity_EE + affinity_EE.T
    layer = node_fitted(loads_E, TOPOLOGY, 3, affinity_EE)
    layer.validate()
    assert [len(s) for s in layer.slots] == [3, 3, 3, 3]
    members = node_members(loads_E, affinity_EE, TOPOLOGY, 3)
    for node in range(2):
        held = {e for r in (2 * node, 2 * node + 1) for e in layer.slots[r]}
        assert held == set(members[node].tolist())
