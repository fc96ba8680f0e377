"""The path cost model without processes: the summary each rank sends, and the decision from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_grace.comm.path_model import (
    EXPLORE_BACKOFF_MAX,
    EXPLORE_UNMEASURED_WITHIN,
    PathFeedback,
    PathModel,
    PathPolicy,
    choose_hierarchical,
    choose_path,
    corrected_costs,
    link_fit,
    path_costs,
    prefers_hierarchical,
    rank_summary,
)
from ds_grace.config import GraceConfigError, parse_grace_block
from ds_grace.moe.layer import RuntimeOptions
from ds_grace.topology import Topology

TOPO = Topology(2, 2)


def test_summary_counts_flat_stage1_and_stage2_rows_by_hand() -> None:
    # rank 0 (node 0, local 0): t0 -> ranks 1, 2, 3; t1 -> rank 0 only; t2 -> ranks 2 and 3
    member_TR = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    summary = rank_summary(member_TR, ep_index=0, topology=TOPO).tolist()
    flat, stage1, stage2 = summary[0:2], summary[2:4], summary[4:6]
    assert flat == [1, 4]  # to node 0: t0 -> rank 1 (rank 0 itself excluded); to node 1: 2 + 2 rows
    assert stage1 == [0, 2]  # t0 and t2 cross to node 1 once each; nothing crosses to its own node
    # relay of node 1 for local rank 0 is rank 2: forwards t0 and t2 to rank 3; node 0: t0 to rank 1
    assert stage2 == [1, 2]


ROWS = {"dispatch_row_bytes": 600, "combine_row_bytes": 400}


def test_costs_prefer_hierarchical_when_dedup_saves_link_bytes_and_flat_when_rounds_dominate() -> None:
    # every rank: 10 flat rows to the other node, 4 after per-node dedup, 6 forwarded inside the node
    summary_RC = np.array([[0, 10, 0, 4, 0, 6] if r < 2 else [10, 0, 4, 0, 6, 0] for r in range(4)])
    link_bound = PathModel(alpha_ep_s=1e-3, alpha_intra_s=1e-3, inter_s_per_byte=1e-6, intra_s_per_byte=1e-9)
    flat, hier = path_costs(summary_RC, topology=TOPO, model=link_bound, **ROWS)
    # flat: 2 alpha + (600 + 400) B x (busiest link 20 rows x 1e-6 + no intra rows x 1e-9), each byte once
    assert flat == pytest.approx(2e-3 + 1000 * 20 * 1e-6)
    # hierarchical: + 2 intra rounds; link 8 rows; the busiest relay forwards 6 rows inside its node
    assert hier == pytest.approx(4e-3 + 1000 * (8 * 1e-6 + 6 * 1e-9))
    assert choose_hierarchical(summary_RC, topology=TOPO, model=link_bound, **ROWS)
    round_bound = PathModel(alpha_ep_s=1e-3, alpha_intra_s=5e-3, inter_s_per_byte=1e-9, intra_s_per_byte=1e-9)
    assert not choose_hierarchical(summary_RC, topology=TOPO, model=round_bound, **ROWS)
    # nothing predicted on either path keeps the flat path (fewer rounds)
    zero = PathModel(0.0, 0.0, 0.0, 0.0)
    assert not choose_hierarchical(summary_RC, topology=TOPO, model=zero, **ROWS)


def test_link_burst_is_free_per_round_and_can_turn_the_decision_to_flat() -> None:
    summary_RC = np.array([[0, 10, 0, 4, 0, 6] if r < 2 else [10, 0, 4, 0, 6, 0] for r in range(4)])
    # burst 12000 B per round: flat's dispatch round (20 x 600 B) fits it, its combine (8000 B) too;
    # the hierarchical rounds (4800 B, 3200 B) fit as well, so only its two extra intra rounds remain
    bursty = PathModel(1e-3, 1e-3, 1e-6, 1e-9, inter_burst_bytes=12000.0)
    flat, hier = path_costs(summary_RC, topology=TOPO, model=bursty, **ROWS)
    assert flat == pytest.approx(2e-3)
    assert hier == pytest.approx(4e-3 + 6000 * 1e-9)
    assert not choose_hierarchical(summary_RC, topology=TOPO, model=bursty, **ROWS)
    # a smaller burst: only the bytes beyond it cost the link's rate, round by round
    partial = PathModel(1e-3, 1e-3, 1e-6, 1e-9, inter_burst_bytes=5000.0)
    flat, hier = path_costs(summary_RC, topology=TOPO, model=partial, **ROWS)
    assert flat == pytest.approx(2e-3 + (7000 + 3000) * 1e-6)
    assert hier == pytest.approx(4e-3 + 6000 * 1e-9)  # 4800 and 3200 B are both within the burst
    assert partial.link_s(4000.0) == 0.0 and partial.link_s(5500.0) == pytest.approx(500 * 1e-6)


def test_link_fit_recovers_rate_and_burst_of_a_token_bucket() -> None:
    rate_s, burst, alpha = 1 / 25e6, 250_000.0, 2e-3  # 200 Mbit/s, 10 ms of traffic

    def t(n: float) -> float:
        return alpha + max(0.0, n - burst) * rate_s

    s_per_byte, fitted = link_fit(small_bytes=512e3, small_s=t(512e3), large_bytes=1536e3, large_s=t(1536e3),
                                  alpha_s=alpha)  # fmt: skip
    assert s_per_byte == pytest.approx(rate_s) and fitted == pytest.approx(burst)
    # an unshaped link: no burst; a transfer slower than the fit predicts never gives a negative burst
    assert link_fit(small_bytes=1e3, small_s=alpha + 1e-3, large_bytes=2e3, large_s=alpha + 2e-3,
                    alpha_s=alpha)[1] == pytest.approx(0.0, abs=1e-6)  # fmt: skip
    assert link_fit(small_bytes=1e3, small_s=1.0, large_bytes=2e3, large_s=1.001, alpha_s=alpha)[1] == 0.0
    # no slope (both sizes within a burst): neither a rate nor a burst can be told
    assert link_fit(small_bytes=1e3, small_s=alpha, large_bytes=2e3, large_s=alpha, alpha_s=alpha) == (
        0.0,
        0.0,
    )
    with pytest.raises(ValueError, match=r"link_fit sizes \(2000.0, 1000.0\) must satisfy 0 < small < large"):
        link_fit(small_bytes=2e3, small_s=0.0, large_bytes=1e3, large_s=0.0, alpha_s=0.0)


def test_feedback_residuals_correct_the_model_until_the_measured_faster_path_sticks() -> None:
    feedback = PathFeedback(weight=0.5)
    assert feedback.as_micros() == (0, 0)  # no measurement: the model's prediction stands
    model_s = (0.012, 0.007)  # the model prefers hierarchical by 5 ms
    assert prefers_hierarchical(corrected_costs(model_s, np.array([feedback.as_micros()] * 4)))
    # hierarchical measured at 20 ms: its first residual is taken whole (+13 ms)
    feedback.update(hierarchical=True, measured_s=0.020, predicted_s=0.007)
    assert feedback.as_micros() == (0, 13000)
    corrected = corrected_costs(model_s, np.array([feedback.as_micros()] * 4))
    assert corrected == pytest.approx((0.012, 0.020)) and not prefers_hierarchical(corrected)
    # flat measured at 14 ms, then hierarchical again at 16 ms: running mean with weight 0.5
    feedback.update(hierarchical=False, measured_s=0.014, predicted_s=0.012)
    feedback.update(hierarchical=True, measured_s=0.016, predicted_s=0.007)
    assert feedback.as_micros() == (2000, 11000) and feedback.samples == [1, 2]
    # every rank corrects by the group's mean residual, so one slow rank moves all alike
    mean = corrected_costs((0.0, 0.0), np.array([[4000, 0], [0, 0], [0, 8000], [0, 0]]))
    assert mean == pytest.approx((0.001, 0.002))
    with pytest.raises(ValueError, match=r"weight \(0\.0\) must be in \(0, 1\]"):
        PathFeedback(weight=0.0)


def test_config_fields_validated_and_mapped_to_the_runtime() -> None:
    options = RuntimeOptions.from_config(parse_grace_block({}))
    assert options.path == "auto" and options.low_latency_max_tokens == 64
    flat = RuntimeOptions.from_config(parse_grace_block({"communication": {"path": "flat", "dedup": False}}))
    assert flat.path == "flat" and flat.low_latency_max_tokens == 0
    with pytest.raises(
        GraceConfigError,
        match=r"grace\.communication\.low_latency_max_tokens \(-1\) .*greater than or equal to 0",
    ):
        parse_grace_block({"communication": {"low_latency_max_tokens": -1}})
    with pytest.raises(
        GraceConfigError,
        match=r"low_latency_max_tokens \(8\) must be 0 when grace\.communication\.dedup is false",
    ):
        parse_grace_block({"communication": {"path": "flat", "dedup": False, "low_latency_max_tokens": 8}})
    with pytest.raises(GraceConfigError, match=r"grace\.communication\.path \(\"yes\"\) must be 'flat'"):
        parse_grace_block({"communication": {"path": "yes"}})
    # the former keys name their replacement
    with pytest.raises(
        GraceConfigError,
        match=r"^grace\.communication\.adaptive_path \(true\) is no longer a field: use grace\.communication\.path: auto$",
    ):
        parse_grace_block({"communication": {"adaptive_path": True}})
    with pytest.raises(GraceConfigError, match=r"grace\.communication\.hierarchical \(false\) is no longer a field: use "
                       r"grace\.communication\.path \(flat \| hierarchical \| auto\)"):  # fmt: skip
        parse_grace_block({"communication": {"hierarchical": False}})
    with pytest.raises(
        ValueError, match=r"low_latency_max_tokens \(4\) must be 0 when grace\.communication\.dedup"
    ):
        RuntimeOptions(path="flat", dedup=False, low_latency_max_tokens=4)
    with pytest.raises(
        ValueError, match=r"grace\.communication\.path \('both'\) must be one of flat, hierarchical, auto"
    ):
        RuntimeOptions(path="both")


def test_near_ties_go_to_the_hierarchical_path() -> None:
    assert prefers_hierarchical((1.0, 1.05))  # within NEAR_TIE: fewer bytes across nodes
    assert prefers_hierarchical((1.0, 0.5))
    assert not prefers_hierarchical((1.0, 1.2))  # flat clearly faster
    assert not prefers_hierarchical((0.0, 0.0))  # nothing to send: the flat path's fewer rounds


def test_exploration_re_measures_a_close_path_that_a_stale_residual_keeps_untaken() -> None:
    # flat's residual comes from one slow forward (+15 ms): without exploration it is never re-measured
    feedback = PathFeedback(weight=0.3, explore_every=4)
    feedback.update(hierarchical=False, measured_s=0.035, predicted_s=0.020)
    model_s = (0.020, 0.030)  # the model: flat 20 ms, hierarchical 30 ms
    due = []
    for _ in range(7):
        due.append(feedback.explore_due())
        corrected = corrected_costs(model_s, np.array([feedback.as_micros()] * 4))  # (35 ms, ~31 ms)
        hierarchical, explored = choose_path(corrected, explore=due[-1])
        measured = 0.021 if not hierarchical else 0.031
        feedback.update(hierarchical=hierarchical, measured_s=measured, predicted_s=model_s[int(hierarchical)],
                        explored=explored)  # fmt: skip
        if explored:
            break
    # the 4th choice after the first forward explores flat; its residual is replaced, not averaged
    assert due == [False, False, True] and not hierarchical and explored
    assert feedback.as_micros()[0] == 1000
    corrected = corrected_costs(model_s, np.array([feedback.as_micros()] * 4))
    assert choose_path(corrected, explore=False) == (False, False)  # flat from now on
    # a path far slower than the chosen one is not explored; nor when the chosen one costs nothing
    assert choose_path((0.010, 0.030), explore=True) == (False, False)
    assert choose_path((0.010, 0.012), explore=True) == (True, True)  # flat preferred, hierarchical close
    assert choose_path((0.0, 0.0), explore=True) == (False, False)
    assert not PathFeedback(explore_every=0).explore_due()
    with pytest.raises(ValueError, match=r"explore_every \(-1\) must be >= 0"):
        PathFeedback(explore_every=-1)


def _explored_at(feedback: PathFeedback, preferred: list[bool], forwards: int) -> list[int]:
    """Forwards (0-based) at which `feedback` asks to explore when the preferred path of forward i is
    preferred[i % len(preferred)] (True: hierarchical) and exploration is always honoured."""
    explored_at = []
    for i in range(forwards):
        hierarchical, explored = preferred[i % len(preferred)], False
        if feedback.explore_due():
            hierarchical, explored = not hierarchical, True
            explored_at.append(i)
        feedback.update(hierarchical=hierarchical, measured_s=0.01, predicted_s=0.01, explored=explored)
    return explored_at


def test_an_exploration_confirmed_slower_doubles_the_interval_to_the_next_and_one_kept_resets_it() -> None:
    # hierarchical stays preferred: each exploration of flat is left again, so the gaps double to the cap
    slower = _explored_at(PathFeedback(explore_every=2), [True], 80)
    assert slower == [1, 5, 13, 29, 45, 61, 77]  # gaps 2, 4, 8, then the cap
    assert EXPLORE_BACKOFF_MAX * 2 == 16
    # the preference follows every exploration (a close race): the interval stays at explore_every
    feedback = PathFeedback(explore_every=2)
    close = []
    hierarchical = True
    for i in range(12):
        explored = feedback.explore_due()
        if explored:
            hierarchical = not hierarchical  # explored, and the next choice keeps the new path
            close.append(i)
        feedback.update(hierarchical=hierarchical, measured_s=0.01, predicted_s=0.01, explored=explored)
    assert close == [1, 3, 5, 7, 9, 11]


def test_a_path_never_measured_is_explored_only_within_the_models_own_error() -> None:
    # hierarchical preferred; flat predicted 1.5x: explored once measured (a stale residual), not before
    costs_s = (0.150, 0.100)
    assert choose_path(costs_s, explore=True, measured=(True, True)) == (False, True)
    assert choose_path(costs_s, explore=True, measured=(False, True)) == (True, False)
    # within EXPLORE_UNMEASURED_WITHIN it is explored although never measured
    close_s = (0.100 * EXPLORE_UNMEASURED_WITHIN * 0.99, 0.100)
    assert choose_path(close_s, explore=True, measured=(False, True)) == (False, True)
    # the measured flag of the path taken does not matter, only the other one's
    assert choose_path(costs_s, explore=True, measured=(True, False)) == (False, True)
    feedback = PathFeedback()
    assert feedback.measured() == (False, False)
    feedback.update(hierarchical=True, measured_s=0.01, predicted_s=0.01)
    assert feedback.measured() == (False, True)


def test_path_policy_is_owned_by_its_layer_and_resets_explicitly() -> None:
    """No state shared between policies (layers, workloads); reset() forgets what was measured."""
    model = PathModel(alpha_ep_s=0.0, alpha_intra_s=0.0, inter_s_per_byte=1e-9, intra_s_per_byte=1e-9)
    first = PathPolicy("auto", topology=TOPO, model=lambda: model)
    second = PathPolicy("auto", topology=TOPO, model=lambda: model)
    first.feedback.update(hierarchical=False, measured_s=0.02, predicted_s=0.01)
    assert first.feedback.measured() == (True, False) and second.feedback.measured() == (False, False)
    first.reset()
    assert first.feedback.measured() == (False, False) and first.feedback.as_micros() == (0, 0)
    # fixed modes decide without the header's policy columns; one node has only the flat path
    empty = np.zeros((4, 0), dtype=np.int64)
    assert (
        PathPolicy("flat", topology=TOPO).decide(empty, dispatch_row_bytes=8, combine_row_bytes=8) == "flat"
    )
    hier = PathPolicy("hierarchical", topology=TOPO)
    assert hier.decide(empty, dispatch_row_bytes=8, combine_row_bytes=8) == "hierarchical"
    assert not PathPolicy("auto", topology=Topology(1, 4)).adaptive
    # auto: every rank's columns (summary, residuals, explore, measured) give the same decision
    member_TR = torch.tensor([[True, False, True, False], [False, True, False, True]])
    columns = torch.stack([first.header_columns(member_TR, rank) for rank in range(4)]).numpy()
    path = first.decide(columns, dispatch_row_bytes=64, combine_row_bytes=32)
    assert path in ("flat", "hierarchical") and first.last_costs_s is not None


def test_header_columns_stage_the_feedback_without_an_upload() -> None:
    """The feedback columns come from a host buffer the policy owns (pinned for CUDA, copied without
    blocking): each call's columns hold that call's values, and nothing is made from host data."""
    from benchmarks.counting import count_hot_path

    model = PathModel(alpha_ep_s=0.0, alpha_intra_s=0.0, inter_s_per_byte=1e-9, intra_s_per_byte=1e-9)
    policy = PathPolicy("auto", topology=TOPO, model=lambda: model)
    member_TR = torch.tensor([[True, False, True, False], [False, True, False, True]])
    with count_hot_path() as counts:
        before = policy.header_columns(member_TR, 0)
    assert counts.num_host_reads == 0
    policy.feedback.update(hierarchical=False, measured_s=0.02, predicted_s=0.01)
    after = policy.header_columns(member_TR, 0)
    width = 3 * TOPO.num_nodes
    assert before[width:].tolist() == [0, 0, 0, 0]  # unchanged by the next call's write
    assert after[width:].tolist()[0] == policy.feedback.as_micros()[0] != 0
    assert after[width:].tolist()[3] == 1  # the flat path measured
