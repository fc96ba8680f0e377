"""ds_grace.comm.groups: the rank layout as data (no processes)."""

from __future__ import annotations

import pytest

from ds_grace.comm.groups import create_grace_groups, grace_group_layout
from ds_grace.topology import Topology


def test_layout_2x2():
    assert grace_group_layout([0, 1, 2, 3], Topology(2, 2)) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])


def test_layout_1x4_and_4x1():
    assert grace_group_layout([0, 1, 2, 3], Topology(1, 4)) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    assert grace_group_layout([0, 1, 2, 3], Topology(4, 1)) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])


def test_layout_maps_ep_indices_to_global_ranks():
    # second EP group of a job with two data-parallel replicas of a 2 x 2 expert-parallel group
    assert grace_group_layout([4, 5, 6, 7], Topology(2, 2)) == ([[4, 5], [6, 7]], [[4, 6], [5, 7]])
    assert grace_group_layout([1, 3, 5, 7, 9, 11], Topology(2, 3)) == (
        [[1, 3, 5], [7, 9, 11]],
        [[1, 7], [3, 9], [5, 11]],
    )


def test_layout_errors_name_the_argument():
    with pytest.raises(
        ValueError, match=r"ep_ranks has 3 ranks but the topology \(2 nodes x 2 GPUs\) needs 4"
    ):
        grace_group_layout([0, 1, 2], Topology(2, 2))
    with pytest.raises(ValueError, match=r"ep_ranks \(\[0, 1, 1, 2\]\) must be distinct non-negative ranks"):
        grace_group_layout([0, 1, 1, 2], Topology(2, 2))


def test_single_process_groups_need_no_distributed():
    groups = create_grace_groups(Topology(1, 1), timeout_s=5.0)
    assert groups.ep_index == 0 and groups.ep_group is None and groups.intra_group is None


def test_group_creation_errors():
    with pytest.raises(ValueError, match=r"grace.communication.timeout_s \(0\) must be > 0"):
        create_grace_groups(Topology(1, 1), timeout_s=0)
    with pytest.raises(
        RuntimeError, match=r"torch.distributed is not initialised; a topology of 2 nodes x 2 GPUs"
    ):
        create_grace_groups(Topology(2, 2), timeout_s=5.0)
