"""The planner variants measured and not adopted (benchmarks/planner_variants.py): still rebuilt as they
were measured, and the product's steps inside them are the product's."""

from dataclasses import replace

import numpy as np
import pytest

from benchmarks.planner_variants import (
    VARIANTS,
    block_loads,
    block_spread_within_nodes,
    experiment_plan,
    load_spread,
    per_copy_placement,
    plan_variant,
    product_variant,
    robust_gpu_loads,
)
from ds_grace.planning.build import build_plan
from ds_grace.planning.grouping import spread_within_nodes
from ds_grace.planning.replication import replicate
from ds_grace.planning.robust import ROBUST_VARIANT, SAMPLE_FITTED
from ds_grace.topology import Topology
from ds_grace.trace import RoutingTrace, load_route_logs, packaged_traces_dir, split_trace, synthetic


def test_experiment_pipeline_rebuilds_the_product_plan():
    root = packaged_traces_dir() / "qwen15_moe"
    fit, _ = split_trace(
        load_route_logs([root / f"moe_layer{layer}.jsonl" for layer in (0, 8)]), fraction=0.5
    )
    topology = Topology(num_nodes=2, gpus_per_node=2)
    assert product_variant(VARIANTS["robust"]) == ROBUST_VARIANT
    assert product_variant(VARIANTS["sample_fitted"]) == SAMPLE_FITTED
    assert product_variant(VARIANTS["drift_per_copy"]) is None
    product = build_plan(fit, topology=topology)
    rebuilt = experiment_plan(fit, topology=topology, variant=VARIANTS["robust"])  # swaps on drifting layers
    assert [layer.slots for layer in rebuilt.layers] == [layer.slots for layer in product.layers]
    assert str(rebuilt.layers) == str(product.layers)  # weights too


def test_spread_and_drift_pick_the_replica_rule_per_layer():
    steady = synthetic(num_layers=1, num_experts=16, top_k=2, num_tokens=4000, skew=1.2, seed=1)
    first = synthetic(num_layers=1, num_experts=16, top_k=2, num_tokens=2000, skew=1.2, seed=1)
    other = synthetic(num_layers=1, num_experts=16, top_k=2, num_tokens=2000, skew=1.2, seed=7)
    shifted = np.concatenate([first.topk_ids[0], other.topk_ids[0]])
    both = RoutingTrace(topk_ids=(steady.topk_ids[0], shifted), num_experts=16)
    spread_LE = load_spread(both)
    assert spread_LE.shape == (2, 16) and (spread_LE >= 0).all()
    assert spread_LE[1].sum() > 3 * spread_LE[0].sum()  # the shifted layer's halves disagree
    plan = plan_variant(
        both, topology=Topology(num_nodes=2, gpus_per_node=2), variant=VARIANTS["drift_per_copy"]
    )
    assert plan.meta["replication"]["drifting_layers"] == [1]  # steady layer: the budget greedy
    assert plan.meta["variant"]["replicas"] == "per_copy" and plan.meta["variant"]["drift_shrinkage"] == 0.3
    assert {len(s) for layer in plan.layers for s in layer.slots} == {5}


def test_block_loads_follow_recorded_order():
    ids = np.array([[0, 2]] * 30 + [[1, 2]] * 10)  # expert 0 early, expert 1 late
    blocks = block_loads(RoutingTrace(topk_ids=(ids,), num_experts=3), 4)[0]
    assert blocks.shape == (4, 3)
    assert np.allclose(blocks.sum(axis=1), 80.0)  # every block scaled to the layer's total
    assert blocks[:3].tolist() == [[40.0, 0.0, 40.0]] * 3 and blocks[3].tolist() == [0.0, 40.0, 40.0]


def test_block_spread_bounds_the_worst_block_inside_a_node():
    # experts 0 and 1 swap their load half-way; 2 and 3 are steady: the whole-sample loads are equal
    blocks_BE = np.array([[4.0, 0.0, 2.0, 2.0], [0.0, 4.0, 2.0, 2.0]])
    loads_E = blocks_BE.mean(axis=0)
    topology = Topology(num_nodes=1, gpus_per_node=2)
    zero = np.zeros((4, 4))

    def worst_block(expert2rank_E: np.ndarray) -> float:
        return max(blocks_BE[b][expert2rank_E == g].sum() for b in range(2) for g in range(2))

    plain = spread_within_nodes(np.zeros(4, dtype=np.int64), loads_E, zero, topology)
    robust = block_spread_within_nodes(np.zeros(4, dtype=np.int64), loads_E, zero, topology, blocks_BE)
    assert np.bincount(robust, minlength=2).tolist() == [2, 2]
    assert worst_block(plain) == 6.0 and worst_block(robust) == 4.0


def test_weight_bound_and_jitter_are_applied_deterministically():
    trace = synthetic(num_layers=1, num_experts=16, top_k=2, num_tokens=3000, skew=1.5, seed=3)
    topology = Topology(num_nodes=2, gpus_per_node=2)
    primary = np.arange(16) % 4
    options = {"slots_per_gpu": 5, "routing_policy": "tar"}

    def per_copy(**weights: float) -> tuple[tuple[float, ...], tuple[int, ...]]:
        placement = per_copy_placement(
            trace.loads()[0], primary, topology, seeds=[], options=options, **weights
        )
        return placement.rank_weights, placement.replica_ranks

    (bounded, slots), (free, free_slots), (even, even_slots) = (
        per_copy(fitted_weights=True, weight_bound=1.05),
        per_copy(fitted_weights=True, weight_bound=1e3),
        per_copy(fitted_weights=False, weight_bound=1e3),
    )
    assert max(bounded) / min(bounded) <= 1.05**2 + 1e-9  # each within [1 / 1.05, 1.05] x a mean
    assert max(free) / min(free) > 1.2  # the bound is what keeps them in
    assert set(even) == {1.0} and slots == free_slots == even_slots  # weights only, same replicas
    product = replicate(trace.loads()[0], primary, topology, initial=[], greedy=False, **options)
    assert product.rank_weights == free  # the product's bound (1e3) restored after the bounded call
    jittered = replace(VARIANTS["robust"], jitter=0.01, jitter_seed=1)
    one, two = (plan_variant(trace, topology=topology, variant=jittered) for _ in range(2))
    assert [layer.slots for layer in one.layers] == [layer.slots for layer in two.layers]
    assert one.meta["variant"]["jitter"] == 0.01


def test_robust_gpu_loads_penalise_a_gpu_that_hangs_on_one_uncertain_expert():
    topology = Topology(num_nodes=1, gpus_per_node=2)
    hosts = np.array([[True, False], [False, True], [False, True]])
    loads, spread = np.array([2.0, 1.0, 1.0]), np.array([1.0, 0.5, 0.5])
    assert robust_gpu_loads(loads, spread, hosts, topology, z=0.0).tolist() == [2.0, 2.0]
    robust = robust_gpu_loads(loads, spread, hosts, topology, z=2.0)
    assert robust == pytest.approx([4.0, 2.0 + 2.0 * np.sqrt(0.5)])
