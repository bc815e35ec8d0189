"""ChunkExecutor: which action runs at each tick and when to ask for more. Pure logic, no clock, no sleeps."""

from __future__ import annotations

import numpy as np
import pytest

from robot_client.chunk_executor import ChunkExecutor, ExecutorConfig, Verdict

PERIOD = 1 / 30
DIM = 3


def chunk(tag: float, length: int = 16) -> np.ndarray:
    """Rows that say where they came from: row i of chunk `tag` is [tag, i, tag + i/100]."""
    rows = np.arange(length, dtype=np.float32)
    return np.stack([np.full(length, tag, np.float32), rows, tag + rows / 100], axis=1)


def executor(**kw) -> ChunkExecutor:
    kw.setdefault("max_delay", 16)
    kw.setdefault("max_prefix", 16)
    return ChunkExecutor(ExecutorConfig(control_period_s=PERIOD, **kw))


def run_ticks(ex: ChunkExecutor, first: int, last: int) -> list:
    return [ex.action_for(t) for t in range(first, last + 1)]


def test_first_chunk_starts_at_row_zero_on_the_tick_it_arrives():
    ex = executor()
    assert ex.action_for(0) is None and ex.should_request(0)
    req = ex.make_request(tick=0, now=0.0, request_id="a")
    assert ex.wire_prefix(req) == (None, 0)  # nothing planned yet: no prefix, no delay
    # Arrives after 5 ticks; the robot stood still meanwhile, so row 0 runs first.
    report = ex.accept(req, chunk(1), tick=5, now=5 * PERIOD)
    assert report.verdict is Verdict.ACCEPTED and report.first_row == 0
    actions = run_ticks(ex, 5, 20)
    assert [a.row for a in actions] == list(range(16))
    np.testing.assert_array_equal(np.stack([a.values for a in actions]), chunk(1))
    assert ex.action_for(21) is None  # the plan ran out: starved


def test_request_threshold_follows_the_measured_latency():
    ex = executor(initial_latency_s=0.1, margin_ticks=2)
    assert ex.latency_ticks() == 3 and ex.request_threshold() == 5  # 100 ms at 30 Hz
    req = ex.make_request(0, 0.0, "a")
    ex.accept(req, chunk(1), tick=1, now=PERIOD, received_at=0.010)  # 10 ms round trip
    assert ex.latency_estimate_s == pytest.approx(0.010)
    assert ex.latency_ticks() == 1 and ex.request_threshold() == 3
    for tick in range(1, 13):  # rows for ticks 1..16; at tick 12, 4 remain
        ex.action_for(tick)
        assert not ex.should_request(tick)
    ex.action_for(13)
    assert ex.remaining(13) == 3 and ex.should_request(13)
    # A slow round trip raises the estimate (90th percentile of the window) and so the threshold.
    req = ex.make_request(13, 13 * PERIOD, "b")
    assert not ex.should_request(13)  # one request in flight at a time
    ex.accept(req, chunk(2), tick=14, now=14 * PERIOD, received_at=13 * PERIOD + 0.2)
    assert ex.latency_ticks() >= 5


def test_prefix_is_the_rest_of_the_plan_and_delay_the_rows_that_run_meanwhile():
    ex = executor()
    ex.accept(ex.make_request(0, 0.0, "a"), chunk(1), tick=1, now=PERIOD, received_at=0.05)  # 2 ticks
    run_ticks(ex, 1, 10)  # rows 0..9 ran; rows 10..15 are planned for ticks 11..16
    req = ex.make_request(10, 10 * PERIOD, "b")
    prefix, delay = ex.wire_prefix(req)
    np.testing.assert_array_equal(prefix, chunk(1)[10:])
    assert delay == 2


def test_no_prefix_for_a_server_without_real_time_chunking():
    ex = executor(max_delay=0)  # OpenTau's server advertises no max_delay
    ex.accept(ex.make_request(0, 0.0, "a"), chunk(1), tick=1, now=PERIOD)
    run_ticks(ex, 1, 10)
    assert ex.wire_prefix(ex.make_request(10, 10 * PERIOD, "b")) == (None, 0)


def test_answer_is_aligned_to_the_ticks_that_ran_while_it_was_in_flight():
    ex = executor(initial_latency_s=0.1)
    ex.accept(ex.make_request(0, 0.0, "a"), chunk(1), tick=1, now=PERIOD)
    run_ticks(ex, 1, 10)
    req = ex.make_request(10, 10 * PERIOD, "b")  # its row 0 is for tick 11
    run_ticks(ex, 11, 13)  # three rows of the old plan ran while it was in flight
    report = ex.accept(req, chunk(2), tick=14, now=14 * PERIOD)
    assert report.first_row == 3 and report.overlap == 3  # the old plan still had ticks 14, 15, 16
    actions = run_ticks(ex, 14, 26)
    assert [(a.request_id, a.row) for a in actions] == [("b", r) for r in range(3, 16)]


def test_after_the_plan_ran_out_the_answer_continues_where_the_robot_stopped():
    ex = executor()
    ex.accept(ex.make_request(0, 0.0, "a"), chunk(1), tick=1, now=PERIOD)
    run_ticks(ex, 1, 14)
    req = ex.make_request(14, 14 * PERIOD, "b")  # prefix: 2 rows (ticks 15, 16)
    assert len(req.prefix) == 2
    assert run_ticks(ex, 15, 16)[-1].row == 15
    assert run_ticks(ex, 17, 19) == [None] * 3  # starved: the robot stands at row 15 of "a"
    report = ex.accept(req, chunk(2), tick=20, now=14 * PERIOD + 0.2)
    # Rows 0-1 ran as the prefix; the robot did not move during the starved ticks,
    # so row 2 (not row 5) runs next.
    assert report.first_row == 2 and report.overlap == 0
    assert ex.action_for(20).row == 2


def test_the_robot_starves_at_the_tick_after_its_last_planned_action_and_an_answer_then_still_runs():
    ex = executor()
    assert ex.starvation_tick(0) is None  # nothing executing before the first chunk
    ex.accept(ex.make_request(0, 0.0, "a"), chunk(1), tick=1, now=PERIOD)  # rows for ticks 1..16
    run_ticks(ex, 1, 12)
    assert ex.remaining(12) == 4 and ex.starvation_tick(12) == 17  # ticks 13..16 planned, 17 is not
    req = ex.make_request(12, 12 * PERIOD, "b")
    run_ticks(ex, 13, 16)
    assert ex.starvation_tick(16) == 17  # the last action runs until tick 17 starts
    # An answer merged at the starving tick itself runs there, right after the prefix: no stall.
    report = ex.accept(req, chunk(2), tick=17, now=17 * PERIOD)
    assert report.verdict is Verdict.ACCEPTED and report.first_row == 4
    assert ex.action_for(17).request_id == "b"
    # Once the plan ran dry, nothing is executing any more.
    run_ticks(ex, 18, 28)
    assert ex.action_for(29) is None and ex.starvation_tick(29) is None


def test_replace_rule_switches_to_the_new_chunk_at_the_seam():
    ex = executor(merge="replace")
    ex.accept(ex.make_request(0, 0.0, "a"), chunk(1), tick=1, now=PERIOD)
    run_ticks(ex, 1, 10)
    req = ex.make_request(10, 10 * PERIOD, "b")
    ex.action_for(11)
    report = ex.accept(req, chunk(2), tick=12, now=12 * PERIOD)
    assert report.overlap == 5  # ticks 12..16 were still planned by "a"
    np.testing.assert_allclose(report.disagreement, np.abs(chunk(2)[1:6] - chunk(1)[11:16]).max())
    np.testing.assert_array_equal(ex.action_for(12).values, chunk(2)[1])


def test_blend_rule_cross_fades_over_the_overlap():
    ex = executor(merge="blend")
    ex.accept(ex.make_request(0, 0.0, "a"), chunk(1), tick=1, now=PERIOD)
    run_ticks(ex, 1, 12)
    req = ex.make_request(12, 12 * PERIOD, "b")  # "a" still plans ticks 13..16
    report = ex.accept(req, chunk(2), tick=13, now=13 * PERIOD)
    assert report.overlap == 4
    got = np.stack([a.values for a in run_ticks(ex, 13, 18)])
    w = np.array([1, 2, 3, 4], np.float32)[:, None] / 5
    np.testing.assert_allclose(got[:4], (1 - w) * chunk(1)[12:16] + w * chunk(2)[0:4], rtol=1e-6)
    np.testing.assert_array_equal(got[4:], chunk(2)[4:6])  # past the overlap: the new chunk alone
    # The step the robot feels at the seam is smaller than a hard switch's.
    hard_switch = np.abs(chunk(2)[0] - chunk(1)[11]).max()
    assert report.seam_step < hard_switch


def test_rows_equal_to_the_prefix_make_a_seamless_switch():
    """A server honouring prefix/delay: rows before `delay` repeat the plan, so neither rule jumps."""
    for rule in ("replace", "blend"):
        ex = executor(merge=rule)
        # 60 ms round trip: answers are expected 2 ticks after the request. Rows of "a" run at ticks 2..17.
        ex.accept(ex.make_request(0, 0.0, "a"), chunk(1), tick=2, now=2 * PERIOD, received_at=0.06)
        run_ticks(ex, 2, 10)  # rows 0..8 ran
        req = ex.make_request(10, 10 * PERIOD, "b")
        prefix, delay = ex.wire_prefix(req)
        assert delay == 2
        np.testing.assert_array_equal(prefix, chunk(1)[9:])
        answer = chunk(2)
        answer[:delay] = prefix[:delay]  # what the server guarantees
        ex.action_for(11)  # row 9 of "a"
        report = ex.accept(req, answer, tick=12, now=12 * PERIOD)
        assert report.first_row == 1 < delay
        np.testing.assert_allclose(ex.action_for(12).values, chunk(1)[10], rtol=1e-6)  # what "a" planned
        assert report.seam_step == pytest.approx(np.abs(chunk(1)[10] - chunk(1)[9]).max())  # a normal step


def test_answer_from_before_a_connection_gap_is_never_executed():
    ex = executor()
    ex.accept(ex.make_request(0, 0.0, "a"), chunk(1), tick=1, now=PERIOD)
    run_ticks(ex, 1, 12)
    stale = ex.make_request(12, 12 * PERIOD, "b")
    ex.connection_lost()
    report = ex.accept(stale, chunk(2), tick=13, now=13 * PERIOD)
    assert report.verdict is Verdict.STALE_EPOCH
    assert all(a is None or a.request_id == "a" for a in run_ticks(ex, 13, 40))
    fresh = ex.make_request(40, 40 * PERIOD, "c")
    assert fresh.epoch == stale.epoch + 1
    assert ex.accept(fresh, chunk(3), tick=41, now=41 * PERIOD).verdict is Verdict.ACCEPTED
    assert ex.action_for(41).request_id == "c"


def test_answer_older_than_max_chunk_age_is_dropped():
    ex = executor(max_chunk_age_s=0.3)
    req = ex.make_request(0, 0.0, "a")
    assert ex.accept(req, chunk(1), tick=10, now=0.31).verdict is Verdict.TOO_OLD
    assert ex.action_for(10) is None and ex.in_flight is None
    req = ex.make_request(10, 0.31, "b")
    assert ex.accept(req, chunk(2), tick=18, now=0.31 + 0.29).verdict is Verdict.ACCEPTED


def test_answer_whose_rows_are_all_in_the_past_is_dropped():
    ex = executor(max_chunk_age_s=10)
    ex.accept(ex.make_request(0, 0.0, "a"), chunk(1, length=4), tick=1, now=PERIOD)
    run_ticks(ex, 1, 2)
    req = ex.make_request(2, 2 * PERIOD, "b")  # prefix: 2 rows
    report = ex.accept(req, chunk(2, length=2), tick=9, now=9 * PERIOD)
    assert report.verdict is Verdict.EXPIRED


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="merge rule"):
        ExecutorConfig(control_period_s=PERIOD, merge="average")
    with pytest.raises(ValueError, match="period"):
        ExecutorConfig(control_period_s=0)
