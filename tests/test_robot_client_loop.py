"""ControlLoop timing with a fake clock and a scripted server: deterministic, no sleeps, no network."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from robot_client.chunk_executor import Verdict
from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.errors import ObservationDropped, ObservationRejected
from robot_client.robot import ObservationUnavailable
from tests.robot_client_fixtures import FakeClock, ScriptedWorker, demo_spec, small_robot

HZ = 30
PERIOD = 1 / HZ


def make_loop(clock, worker, robot=None, **config):
    robot = robot or small_robot(clock)
    config.setdefault("stats_interval_s", 1e9)
    loop = ControlLoop(
        robot,
        None,
        demo_spec(),
        LoopConfig(prompt="pick", control_frequency=HZ, **config),
        clock=clock,
        sleep=clock.sleep,
        worker=worker,
    )
    return loop, robot


def acted(loop, after=-np.inf, before=np.inf):
    return [r for r in loop.trace if r.kind == "act" and after <= r.time < before]


def test_steady_state_runs_one_row_per_tick_from_the_chunks_the_server_returned():
    clock = FakeClock()
    worker = ScriptedWorker(clock, latency_s=0.05)
    loop, robot = make_loop(clock, worker)
    t0 = clock()
    stats = loop.run(duration_s=3.0)

    assert stats.ticks == 91 and stats.skipped_ticks == 0
    assert stats.starved == 0 and stats.holds == 0  # never ran dry once started
    records = acted(loop)
    assert len(records) == len(robot.applied) == stats.acted
    # Every action sent to the robot is exactly a row of an answer, at one per tick.
    for record, (t, action) in zip(records, robot.applied):
        assert t == record.time
        np.testing.assert_array_equal(action, worker.answers[record.request_id][record.row])
    ticks = [r.tick for r in records]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    # Ticks ran on schedule.
    assert all(abs(r.time - (t0 + r.tick * PERIOD)) < 1e-9 for r in records)
    # Requests went out early enough (latency 50 ms = 2 ticks, margin 3) and carried the plan as prefix.
    for sent in worker.sent[1:]:
        assert len(sent.prefix) <= 2 + 3 and sent.delay == min(2, len(sent.prefix))
    assert stats.verdicts[Verdict.ACCEPTED] == len(worker.sent) - (1 if worker._pending else 0)


def test_server_stop_holds_within_one_period_of_the_deadline_and_resumes_without_stale_chunks():
    clock = FakeClock()
    t0 = clock()
    down, up = t0 + 1.0, t0 + 2.0
    worker = ScriptedWorker(clock, latency_s=0.05, outages=[(down, up)])
    loop, robot = make_loop(clock, worker, watchdog_timeout_s=0.1)
    stats = loop.run(duration_s=3.0)

    assert stats.holds == 1 and stats.resumes == 1
    hold_at = loop.hold_times[0]
    last_fresh = acted(loop, before=hold_at)[-1].time
    deadline = last_fresh + 0.1
    assert deadline <= hold_at <= deadline + PERIOD  # within one control period after the deadline
    assert robot.holds == [hold_at, loop.trace[-1].time]  # the watchdog's hold, then the one at exit
    # Nothing moved the robot between the hold and the server coming back.
    resumed = acted(loop, after=hold_at)
    assert resumed and resumed[0].time >= up
    assert not [t for t, _ in robot.applied if hold_at <= t < resumed[0].time]
    # No action after the gap comes from a request sent before the server came back.
    sent_at = {s.request.request_id: s.at for s in worker.sent}
    assert all(sent_at[r.request_id] >= up for r in resumed)
    assert stats.failures and stats.starved > 0
    assert loop.executor.epoch == sum(stats.failures.values())


def test_chunk_older_than_max_age_is_not_executed_and_the_robot_holds_meanwhile():
    clock = FakeClock()
    worker = ScriptedWorker(clock, latency_s=0.04, slow={4: 0.7})  # the 4th answer takes 700 ms
    loop, _ = make_loop(clock, worker, max_chunk_age_s=0.5, watchdog_timeout_s=0.1)
    stats = loop.run(duration_s=2.5)

    slow_id = worker.sent[3].request.request_id
    assert stats.verdicts[Verdict.TOO_OLD] == 1
    assert slow_id not in {r.request_id for r in loop.trace}
    assert stats.holds == 1 and stats.resumes == 1


def test_last_position_hold_keeps_commanding_the_last_action():
    clock = FakeClock()
    t0 = clock()
    worker = ScriptedWorker(clock, outages=[(t0 + 1.0, t0 + 5.0)])
    loop, robot = make_loop(clock, worker, hold_mode="last_position", watchdog_timeout_s=0.1)
    loop.run(duration_s=2.0)

    assert robot.holds == []  # the robot's own stop was not used
    hold_at = loop.hold_times[0]
    last = acted(loop, before=hold_at)[-1]
    held = [a for t, a in robot.applied if t >= hold_at]
    assert len(held) == sum(r.kind == "hold" for r in loop.trace) > 10  # every tick of the hold
    for action in held:
        np.testing.assert_array_equal(action, worker.answers[last.request_id][last.row])


def test_a_rejected_observation_stops_the_loop_with_the_servers_message_and_holds_the_robot():
    clock = FakeClock()
    error = ObservationRejected("the policy server rejected the observation: robot_state: 40 values (INVALID_ARGUMENT)")
    worker = ScriptedWorker(clock, errors={5: error})
    loop, robot = make_loop(clock, worker)
    with pytest.raises(ObservationRejected, match="robot_state: 40 values"):
        loop.run(duration_s=5.0)
    assert len(worker.sent) == 5  # no retry after a refusal
    assert len(robot.holds) == 1 and robot.holds[0] > robot.applied[-1][0] - 1e-9


def test_a_late_tick_skips_ahead_on_the_plan_instead_of_lagging():
    clock = FakeClock()
    worker = ScriptedWorker(clock, latency_s=0.02)
    loop, _ = make_loop(clock, worker)
    t0 = clock()
    hiccup = {"done": False}

    def sleep(seconds):
        clock.sleep(seconds)
        if not hiccup["done"] and clock() - t0 > 1.0:
            hiccup["done"] = True
            clock.sleep(0.2)  # the OS kept us off the CPU for 200 ms

    loop.sleep = sleep
    stats = loop.run(duration_s=2.0)
    assert stats.skipped_ticks == 6
    ticks = [r.tick for r in loop.trace]
    assert len(ticks) == len(set(ticks)) and max(ticks) == round(2.0 * HZ)  # still on schedule at the end
    assert max(np.diff(ticks)) == 7


def test_no_request_until_the_robot_can_observe():
    clock = FakeClock()
    robot = small_robot(clock)
    ready_at = clock() + 0.5
    observe = robot.observe

    def flaky_observe():
        if clock() < ready_at:
            raise ObservationUnavailable("/joint_states: no position yet for joints ['elbow']")
        return observe()

    robot.observe = flaky_observe
    worker = ScriptedWorker(clock)
    loop, _ = make_loop(clock, worker, robot=robot)
    loop.run(duration_s=1.0)
    assert worker.sent and worker.sent[0].at >= ready_at


def test_each_observation_carries_the_time_until_the_robot_would_run_out_of_actions():
    clock = FakeClock()
    t0 = clock()
    worker = ScriptedWorker(clock, latency_s=0.05, timeout_s=0.5)
    loop, _ = make_loop(clock, worker)
    late = {"done": False}

    def sleep(seconds):
        clock.sleep(seconds)
        if not late["done"] and clock() >= t0 + 12 * PERIOD - 1e-9:
            late["done"] = True
            clock.sleep(0.005)  # tick 12 starts 5 ms late

    loop.sleep = sleep
    loop.run(duration_s=1.0)

    first, second = worker.sent[:2]
    # Before the first chunk nothing is executing: the budget is the wait for an answer.
    assert first.request.tick == 0 and first.time_to_starvation_ms == pytest.approx(500.0)
    # The 16-row chunk answered in 50 ms runs at ticks 2..17; with 2 ticks of latency + 3 of margin
    # the next request goes out at tick 12, with ticks 13..17 planned: 5 actions after this tick's.
    # The robot executes tick 12's action until tick 13 and the last until tick 18, where it
    # starves; an answer merged there still runs: 6 periods from tick 12's start, counted from
    # the moment the observation is sent, 5 ms into that tick.
    assert second.request.tick == 12 and len(second.request.prefix) == 5
    assert second.at == pytest.approx(t0 + 12 * PERIOD + 0.005)
    assert second.time_to_starvation_ms == pytest.approx(6 * PERIOD * 1e3 - 5.0)
    for sent in worker.sent[2:]:  # on schedule from here on
        assert sent.time_to_starvation_ms == pytest.approx((len(sent.request.prefix) + 1) * PERIOD * 1e3)


def test_while_the_robot_stands_still_the_budget_is_the_wait_for_an_answer():
    clock = FakeClock()
    t0 = clock()
    worker = ScriptedWorker(clock, latency_s=0.05, timeout_s=0.4, outages=[(t0 + 1.0, t0 + 2.0)])
    loop, _ = make_loop(clock, worker, watchdog_timeout_s=0.1)
    loop.run(duration_s=3.0)

    kind = {r.tick: r.kind for r in loop.trace}
    standing = [s for s in worker.sent if kind[s.request.tick] != "act"]
    assert len(standing) > 5  # every retry during the outage, and the first request
    assert all(s.time_to_starvation_ms == pytest.approx(400.0) for s in standing)
    moving = [s for s in worker.sent if kind[s.request.tick] == "act"]
    assert all(s.time_to_starvation_ms == pytest.approx((len(s.request.prefix) + 1) * PERIOD * 1e3) for s in moving)


def test_an_observation_the_server_dropped_is_not_a_gap_the_plan_runs_on_and_the_next_one_goes_out(caplog):
    clock = FakeClock()
    dropped = ObservationDropped(
        "observation dropped by the server: time to starvation 5 ms is shorter than the next pass (DEADLINE_EXCEEDED)"
    )
    worker = ScriptedWorker(clock, latency_s=0.05, errors={2: dropped})
    loop, _ = make_loop(clock, worker)
    with caplog.at_level(logging.WARNING, logger="robot_client"):
        stats = loop.run(duration_s=1.5)

    assert stats.server_drops == 1 and not stats.failures and stats.summary()["server_drops"] == 1
    assert loop.executor.epoch == 0  # no new connection epoch: answers in flight stay good
    assert "dropped by the server: time to starvation 5 ms" in caplog.text and "reconnecting" not in caplog.text
    r1, r2, r3 = (s.request for s in worker.sent[:3])
    assert r3.tick == r2.tick + 1  # the drop came back within the tick; the next tick asked again
    # The robot kept executing the first chunk, then the third: no stall, nothing from the dropped one.
    executed = [(r.tick, r.request_id) for r in loop.trace if r.kind == "act"]
    assert stats.starved == 0 and stats.holds == 0
    assert r2.request_id not in {rid for _, rid in executed}
    switch = next(t for t, rid in executed if rid == r3.request_id)
    assert all(rid == r1.request_id for t, rid in executed if t < switch) and switch <= r3.tick + 3
    assert "server_drops=1" in stats.line()
