import numpy as np
import pytest

from ds_grace.planning.metrics import METRIC_KEYS, evaluate_plan, expected_gpu_loads, routing_probabilities
from ds_grace.planning.plan import GracePlan, LayerPlan, PlanError
from ds_grace.topology import Topology
from ds_grace.trace import ExpertLoads, RoutingTrace

TOPO = Topology(num_nodes=2, gpus_per_node=2)
TRACE = RoutingTrace(topk_ids=(np.array([[0, 1], [0, 2]]),), num_experts=4)


def _plan(slots: list[list[int]], primary: list[int]) -> GracePlan:
    return GracePlan(
        topology=TOPO,
        layers=(LayerPlan.from_lists(slots=slots, primary=primary),),
        meta={"routing_policy": "tar"},
    )


def test_hand_computed_metrics_without_replicas():
    metrics = evaluate_plan(TRACE, _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))
    # token [0, 1]: both on node 0, remote for the 2 origins of node 1 -> 0.5; token [0, 2]: always 1
    assert metrics["cross_node_copies_per_token"] == pytest.approx(0.75)
    assert metrics["cross_gpu_copies_per_token"] == pytest.approx(1.5)
    assert metrics["vanilla_cross_node_copies_per_token"] == pytest.approx(1.0)
    # GPU loads [2, 1, 1, 0]
    assert metrics["balancedness"] == pytest.approx(0.5)
    assert metrics["max_gpu_load_ratio"] == pytest.approx(2.0)
    assert set(METRIC_KEYS) <= set(metrics)


def test_a_remote_replica_saves_cross_node_copies():
    metrics = evaluate_plan(TRACE, _plan([[0], [1], [2, 0], [3]], [0, 1, 2, 3]))
    # token [0, 2] from node 1 now finds both experts at home
    assert metrics["cross_node_copies_per_token"] == pytest.approx(0.5)
    loads = expected_gpu_loads(
        np.array([2.0, 1.0, 1.0, 0.0]), _plan([[0], [1], [2, 0], [3]], [0, 1, 2, 3]).layers[0], TOPO, "tar"
    )
    assert loads.tolist() == pytest.approx([1.0, 1.0, 2.0, 0.0])


def test_routing_probabilities_rows_sum_to_one():
    prob = routing_probabilities(
        LayerPlan.from_lists(
            slots=[[0, 1], [1], [2, 0], [3]],
            primary=[0, 1, 2, 3],
            slot_weights=[[3.0, 1.0], [1.0], [1.0, 1.0], [1.0]],
        ),
        TOPO,
        "wrr",
    )
    assert np.allclose(prob.sum(axis=2), 1.0)
    assert prob[3, 0].tolist() == pytest.approx([0.75, 0.0, 0.25, 0.0])


def test_loads_only_sources_give_null_copies():
    loads = ExpertLoads(loads=np.array([[2.0, 1.0, 1.0, 0.0]]), top_k=2)
    metrics = evaluate_plan(loads, _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))
    assert metrics["cross_node_copies_per_token"] is None and metrics["cross_gpu_copies_per_token"] is None
    assert metrics["balancedness"] == pytest.approx(0.5)
    assert metrics["vanilla_cross_node_copies_per_token"] == pytest.approx(1.0)
    no_k = evaluate_plan(np.array([[2.0, 1.0, 1.0, 0.0]]), _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))
    assert no_k["vanilla_cross_node_copies_per_token"] is None


def test_mismatched_trace_and_plan_is_an_error():
    other = RoutingTrace(topk_ids=(np.array([[0, 1]]), np.array([[0, 1]])), num_experts=4)
    with pytest.raises(PlanError, match="trace has 2 MoE layers but the plan has 1"):
        evaluate_plan(other, _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))
    wider = RoutingTrace(topk_ids=(np.array([[0, 5]]),), num_experts=6)
    with pytest.raises(PlanError, match="trace has 6 experts per layer but the plan has 4"):
        evaluate_plan(wider, _plan([[0], [1], [2], [3]], [0, 1, 2, 3]))


def _route_table_by_loops(layer: LayerPlan, topology: Topology, policy: str):
    """The routing rule written out per (origin, expert): the reference the array version must equal."""
    insts = [layer.instances(e) for e in range(layer.num_experts)]
    weights = [layer.instance_weights(e) for e in range(layer.num_experts)]
    width = max(len(i) for i in insts)
    cand_rank = np.full((topology.world_size, layer.num_experts, width), -1)
    cand_cdf = np.ones((topology.world_size, layer.num_experts, width))
    for g in range(topology.world_size):
        for e in range(layer.num_experts):
            pairs = list(zip(insts[e], weights[e]))
            if policy == "primary":
                chosen = pairs[:1]
            elif policy == "wrr":
                chosen = pairs
            elif g in insts[e]:
                chosen = [(g, 1.0)]
            else:
                local = [(r, w) for r, w in pairs if topology.node_of(r) == topology.node_of(g)]
                chosen = local or pairs
            total = sum(w for _, w in chosen)
            cdf = np.cumsum([w / total for _, w in chosen])
            cdf[-1] = 1.0
            cand_rank[g, e, : len(chosen)] = [r for r, _ in chosen]
            cand_cdf[g, e, : len(chosen)] = cdf
    return cand_rank, cand_cdf


@pytest.mark.parametrize("policy", ["tar", "wrr", "primary"])
@pytest.mark.parametrize("planner", ["grace", "eplb"])
def test_route_table_equals_the_rule_and_builds_without_a_loop_per_expert(policy, planner, monkeypatch):
    from ds_grace.planning.build import build_plan
    from ds_grace.planning.plan import route_table
    from ds_grace.trace import synthetic

    topology = Topology(num_nodes=3, gpus_per_node=2)
    plan = build_plan(
        synthetic(num_layers=2, num_experts=12, top_k=2, num_tokens=600, seed=3),
        topology=topology,
        policy=planner,
    )
    assert any(layer.replica_count() for layer in plan.layers)
    for layer in plan.layers:
        expected_rank, expected_cdf = _route_table_by_loops(layer, topology, policy)
        cand_rank, cand_cdf = route_table(layer, topology, policy)
        assert np.array_equal(cand_rank, expected_rank)
        assert np.array_equal(cand_cdf, expected_cdf)
    # array ops over all (origin, expert) pairs: no per-expert instance lookups
    calls = []
    monkeypatch.setattr(LayerPlan, "instances", lambda self, e: calls.append(e) or ())
    route_table(plan.layers[0], topology, policy)
    assert calls == []


def test_expected_reach_equals_the_per_token_product_with_fractional_reach():
    from ds_grace.planning.metrics import expected_reach

    rng = np.random.default_rng(0)
    reach_GEX = rng.random((4, 6, 4))
    reach_GEX[:, :, 0] = np.where(reach_GEX[:, :, 0] > 0.5, 1.0, 0.0)  # certain and impossible reaches too
    reach_GEX[3] = reach_GEX[1]  # origins with equal rows share work
    ids_TK = np.stack([rng.choice(6, size=3, replace=False) for _ in range(50)])
    expected_GX = np.stack(
        [np.sum([1.0 - np.prod(1.0 - reach_GEX[g][ids], axis=0) for ids in ids_TK], axis=0) for g in range(4)]
    )
    assert np.allclose(expected_reach(ids_TK, reach_GEX), expected_GX, rtol=1e-12, atol=0)


def _distinct_copies(topk_ids_TK, reach_GEX, own_G):
    """The copies as counted before the schedule's hops: distinct destinations other than the origin's,
    per token, averaged over origins (the reference the hop-based count must equal)."""
    total = 0.0
    for g in range(len(own_G)):
        reach_EX = reach_GEX[g].copy()
        reach_EX[:, own_G[g]] = 0.0
        log_missed_TX = np.log(np.clip(1.0 - reach_EX, 1e-300, None))[topk_ids_TK].sum(axis=1)
        total += (1.0 - np.exp(log_missed_TX)).sum() / len(topk_ids_TK)
    return total / len(own_G)


def _pair_copies(topk_ids_TK, reach_GEX, own_G):
    remote_GE = reach_GEX.sum(axis=2) - reach_GEX[np.arange(len(own_G)), :, own_G]
    count_E = np.bincount(topk_ids_TK.ravel(), minlength=reach_GEX.shape[1])
    return float((remote_GE @ count_E).mean()) / len(topk_ids_TK)


@pytest.mark.parametrize("topology", [Topology(2, 2), Topology(2, 4)])
def test_copies_from_the_schedule_equal_the_distinct_destination_count_on_a_real_trace(topology):
    """Cross-node / cross-GPU copies counted as hop rows (ds_grace.comm.schedule) equal the distinct
    remote nodes / GPUs per token, with and without dedup, and vanilla equals K (N - 1) / N."""
    from ds_grace.planning.build import build_plan
    from ds_grace.trace import load_mixtral_jsonl, packaged_traces_dir

    full = load_mixtral_jsonl(packaged_traces_dir() / "mixtral" / "gsm8k_2_routing.jsonl", num_experts=8)
    trace = RoutingTrace(topk_ids=tuple(ids[:1500] for ids in full.topk_ids[:3]), num_experts=8)
    nodes, gpus = topology.num_nodes, topology.gpus_per_node
    for planner, policy in (("grace", "tar"), ("eplb", "wrr"), ("contiguous", "primary")):
        plan = build_plan(trace, topology=topology, policy=planner)
        for dedup, reference in ((True, _distinct_copies), (False, _pair_copies)):
            metrics = evaluate_plan(trace, plan, routing_policy=policy, per_layer=True, dedup=dedup)
            for ids_TK, layer, row in zip(trace.topk_ids, plan.layers, metrics["per_layer"]):
                prob_GER = routing_probabilities(layer, topology, policy)
                prob_GEN = prob_GER.reshape(*prob_GER.shape[:2], nodes, gpus).sum(axis=3)
                own_node_G = np.arange(topology.world_size) // gpus
                assert row["cross_node_copies_per_token"] == pytest.approx(
                    reference(ids_TK, prob_GEN, own_node_G), rel=1e-9
                )
                assert row["cross_gpu_copies_per_token"] == pytest.approx(
                    reference(ids_TK, prob_GER, np.arange(topology.world_size)), rel=1e-9
                )
            assert metrics["vanilla_cross_node_copies_per_token"] == pytest.approx(
                2 * (nodes - 1) / nodes, rel=1e-12
            )
