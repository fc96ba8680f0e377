import numpy as np
import pytest

from ds_grace.planning.grouping import (
    GroupingError,
    balance_group_loads,
    gpu_size_bounds,
    hierarchical_grouping,
    kept_affinity,
    knee_index,
    repair_group_sizes,
    spectral_labels,
)
from ds_grace.planning.stats import affinity_matrices
from ds_grace.topology import Topology
from ds_grace.trace import synthetic


def _planted(
    sizes: list[int], inside: float = 10.0, outside: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(truth))
    truth = truth[perm]
    affinity = np.where(truth[:, None] == truth[None, :], inside, outside) * rng.uniform(
        0.8, 1.2, (len(truth),) * 2
    )
    affinity = (affinity + affinity.T) / 2
    np.fill_diagonal(affinity, 0.0)
    return affinity, truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 6, 9], [8, 8]])
def test_spectral_recovers_planted_groups_of_any_size(sizes):
    affinity, truth = _planted(sizes)
    assert _same_partition(spectral_labels(affinity, len(sizes)), truth)


def test_repair_follows_the_overflow_and_fill_rule():
    affinity, truth = _planted([2, 2, 8], seed=1)
    labels = repair_group_sizes(truth, affinity, num_groups=3, min_size=3, max_size=5)
    sizes = np.bincount(labels, minlength=3)
    assert sizes.min() >= 3 and sizes.max() <= 5 and sizes.sum() == 12
    big = np.flatnonzero(np.bincount(truth) == 8)[0]
    # the oversized group keeps 5 of its own members; its overflow fills the small groups
    assert np.bincount(labels[truth == big]).max() == 5
    with pytest.raises(GroupingError, match=r"12 experts cannot form 3 groups of size in \[5, 6\]"):
        repair_group_sizes(truth, affinity, num_groups=3, min_size=5, max_size=6)


def test_repair_keeps_groups_that_fit():
    affinity, truth = _planted([4, 5, 6])
    assert np.array_equal(repair_group_sizes(truth, affinity, num_groups=3, min_size=4, max_size=6), truth)


def test_gpu_size_bounds():
    assert gpu_size_bounds(16, 4, 0.0, None) == (3, 5)  # delta is at least 1
    assert gpu_size_bounds(16, 4, 0.5, None) == (2, 6)
    assert gpu_size_bounds(40, 4, 0.15, None) == (8, 12)  # S = 10, delta = round(1.5) = 2
    assert gpu_size_bounds(16, 4, 1.0, 5) == (1, 5)  # memory cap


def test_knee_of_a_concave_curve_and_flat_curves():
    deviation = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert knee_index(deviation, [0.0, 0.8, 0.9, 0.95, 1.0]) == 1
    assert knee_index(deviation, [0.5] * 5) == 0
    assert knee_index([0.0] * 3, [0.1, 0.3, 0.2]) == 1


def test_balance_moves_load_off_the_heaviest_group_within_size_bounds():
    affinity, truth = _planted([4, 4, 4], seed=2)
    load = np.ones(12)
    load[truth == 0] = 5.0
    before = np.bincount(truth, weights=load)
    labels = balance_group_loads(truth, affinity, load, num_groups=3, min_size=3, max_size=5, slack=0.0)
    after = np.bincount(labels, weights=load)
    sizes = np.bincount(labels, minlength=3)
    assert after.max() < before.max()
    assert sizes.min() >= 3 and sizes.max() <= 5
    forbidden = np.zeros((12, 3), dtype=bool)
    forbidden[:, 1:] = True  # nobody may join groups 1 and 2
    frozen = balance_group_loads(
        truth, affinity, load, num_groups=3, min_size=3, max_size=5, slack=0.0, forbidden_nG=forbidden
    )
    assert np.array_equal(frozen, truth)


def test_hierarchical_grouping_sizes_cap_and_ratio():
    trace = synthetic(
        num_layers=2, num_experts=32, top_k=4, num_tokens=3000, co_activation=0.8, num_clusters=4
    )
    affinity = affinity_matrices(trace)
    topo = Topology(num_nodes=2, gpus_per_node=2)
    result = hierarchical_grouping(affinity, topo, ratio="auto", max_experts_per_gpu=10)
    assert result.ratio in [point[0] for point in result.ratio_curve]
    for layer, expert2rank in enumerate(result.expert2rank_LE):
        sizes = np.bincount(expert2rank, minlength=4)
        assert sizes.min() >= 1 and sizes.max() <= 10
        for node in range(2):
            node_sizes = sizes[2 * node : 2 * node + 2]
            lo, hi = gpu_size_bounds(int(node_sizes.sum()), 2, result.ratio, 10)
            assert lo <= node_sizes.min() and node_sizes.max() <= hi, (layer, node_sizes)
    assert 0.0 < result.kept_gpu_affinity <= result.kept_node_affinity <= 1.0
    equal = hierarchical_grouping(affinity, topo, equal_sizes=True)
    assert all(np.bincount(e2r).tolist() == [8, 8, 8, 8] for e2r in equal.expert2rank_LE)


def test_grouping_beats_contiguous_on_planted_clusters():
    trace = synthetic(
        num_layers=1,
        num_experts=16,
        top_k=4,
        num_tokens=4000,
        skew=0.0,
        co_activation=1.0,
        num_clusters=4,
        seed=5,
    )
    affinity = affinity_matrices(trace)[0]
    result = hierarchical_grouping([affinity], Topology(num_nodes=2, gpus_per_node=2), ratio=0.0)
    contiguous = np.arange(16) // 4
    assert kept_affinity(affinity, result.expert2rank_LE[0]) > 1.5 * kept_affinity(affinity, contiguous)


@pytest.mark.parametrize(
    ("experts", "cap", "message"),
    [
        (3, None, r"num_experts \(3\) must be >= the world size \(4\)"),
        (
            16,
            3,
            r"grace.grouping.max_experts_per_gpu \(3\) is too small: 16 experts on 4 GPUs need at least 4",
        ),
    ],
)
def test_impossible_placements_are_errors(experts, cap, message):
    affinity = np.ones((experts, experts)) - np.eye(experts)
    with pytest.raises(GroupingError, match=message):
        hierarchical_grouping([affinity], Topology(num_nodes=2, gpus_per_node=2), max_experts_per_gpu=cap)
