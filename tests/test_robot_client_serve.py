"""robot_client against the real Serve app on loopback: closed loop, server stop/restart, clear failures.

Each test is bounded to a few seconds of control; the server outages are
real: the application deleted and redeployed (an operator restarting it) and
the replica process killed (a crash that Serve repairs on its own).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.errors import AuthenticationFailed, IncompatibleServer, ObservationRejected, PolicyError
from robot_client.policy_client import PolicyClient
from robot_client.replay_robot import ReplayRobot, synthetic_recording
from robot_client.robot import Observation
from tests.conftest import APP_NAME, REPO_ROOT, free_port
from tests.payloads import frame
from tests.robot_client_fixtures import run_in_thread

pytestmark = pytest.mark.serve
HZ = 30
PERIOD = 1 / HZ


class RecordingClient(PolicyClient):
    """The real client, keeping what each request sent and got back (for the assertions)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sent: dict[str, tuple[float, object]] = {}  # request_id -> (time sent, request)
        self.returned: dict[str, np.ndarray] = {}
        self.failures: list[float] = []

    def infer(self, request, timeout_s=None):
        self.sent[request.request_id] = (time.monotonic(), request)
        try:
            chunk = super().infer(request, timeout_s)
        except PolicyError:
            self.failures.append(time.monotonic())
            raise
        self.returned[chunk.request_id] = chunk.actions
        return chunk


def replay_robot(**kw) -> ReplayRobot:
    return ReplayRobot(synthetic_recording(frames=30, height=120, width=160, state_dim=kw.pop("state_dim", 14)), **kw)


def start_loop(address, mode, robot=None, **config):
    client = RecordingClient(address, mode=mode, timeout_s=5.0)
    robot = robot or replay_robot()
    loop = ControlLoop.connect(robot, client, LoopConfig(prompt="pick up the cube", control_frequency=HZ, **config), 20)
    stop, thread, outcome = run_in_thread(loop)
    return loop, robot, client, stop, thread, outcome


def finish(stop, thread, client, outcome):
    stop.set()
    thread.join(timeout=10)
    client.close()
    assert not thread.is_alive(), "control loop did not stop"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["stats"]


def assert_actions_are_rows_the_server_returned(loop, robot, client):
    acts = [r for r in loop.trace if r.kind == "act"]
    assert len(acts) == len(robot.applied)
    for record, (_, action) in zip(acts, robot.applied):
        np.testing.assert_array_equal(action, client.returned[record.request_id][record.row])
    return acts


def wait_until(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_closed_loop_executes_the_servers_chunks_at_the_control_rate(demo_app, mode):
    loop, robot, client, stop, thread, outcome = start_loop(demo_app, mode)
    time.sleep(2.5)
    stats = finish(stop, thread, client, outcome)

    acts = assert_actions_are_rows_the_server_returned(loop, robot, client)
    assert len(acts) >= 2.0 * HZ and stats.requests >= 5 and not stats.failures
    # Requests go out early enough that the plan never runs dry (a few ticks of slack
    # for a loaded CI machine; the 60 s run in the README has none, the fake-clock tests none).
    assert stats.starved <= len(acts) // 20 and stats.holds == 0
    # One action per tick, on consecutive ticks after the first chunk came, except ticks the
    # schedule skipped because the OS ran the loop more than a period late (counted in stats).
    ticks = [r.tick for r in loop.trace if r.tick >= acts[0].tick]
    gaps = sum(b - a - 1 for a, b in itertools.pairwise(ticks))
    assert all(b > a for a, b in itertools.pairwise(ticks)) and gaps <= stats.skipped_ticks
    assert len(ticks) - len(acts) == stats.starved  # every other tick had a fresh action
    # The server continued the motion: the first `delay` rows of each answer are the prefix sent.
    continued = 0
    for request_id, (_, request) in client.sent.items():
        if request.delay and request_id in client.returned:
            prefix = np.array([r.values for r in request.prefix_action], np.float32)
            np.testing.assert_array_equal(client.returned[request_id][: request.delay], prefix[: request.delay])
            continued += 1
    assert continued >= 4
    # Frames were fitted to the advertised 96x96 before JPEG encoding.
    _, request = next(iter(client.sent.values()))
    assert len(request.images) == 2 and all(c.encoding == "jpeg" for c in request.images)
    assert all(len(c.image_data) < 8000 for c in request.images)


def check_hold_and_resume(loop, robot, client, stats, back_at):
    assert stats.holds >= 1 and stats.resumes >= 1
    hold_at = loop.hold_times[0]
    before = [r for r in loop.trace if r.time < hold_at]
    (hold,) = [r for r in loop.trace if r.time == hold_at]
    last_fresh = [r for r in before if r.kind == "act"][-1].time
    deadline = last_fresh + loop.watchdog.timeout_s
    # The hold came at the first tick at or after the deadline, and ticks are one period apart,
    # so it came within one control period of the deadline (plus whatever the OS delayed that
    # tick by: the absolute bound below leaves room for a loaded 2-core machine).
    assert before[-1].tick == hold.tick - 1 and before[-1].time < deadline <= hold_at
    assert hold_at - deadline < PERIOD + 0.05
    assert robot.holds and 0 <= robot.holds[0] - hold_at < 0.01  # robot.hold() was called on that tick
    resumed = [r for r in loop.trace if r.kind == "act" and r.time > hold_at]
    assert resumed, "the robot never resumed after the server came back"
    assert not [t for t, _ in robot.applied if hold_at <= t < resumed[0].time]  # nothing moved it while held
    # No stale chunk: every action after the gap comes from a request sent after the last failure
    # before it resumed (so after the connection epoch moved on), and after the server was back.
    last_failure = max(t for t in client.failures if t < resumed[0].time)
    for record in resumed:
        sent_at, _ = client.sent[record.request_id]
        assert sent_at > last_failure
    assert client.sent[resumed[0].request_id][0] >= back_at - 0.5
    assert_actions_are_rows_the_server_returned(loop, robot, client)


def test_server_deleted_mid_run_holds_the_robot_and_resumes_after_redeploy(serve_harness, demo_app):
    from ray import serve

    loop, robot, client, stop, thread, outcome = start_loop(demo_app, "unary")
    try:
        wait_until(lambda: len(robot.applied) >= HZ, 10, "a second of motion")
        serve_harness.forget()
        serve.delete(APP_NAME)
        wait_until(lambda: loop.hold_times, 10, "the watchdog to hold the robot")
        time.sleep(0.5)
        assert len(robot.holds) == 1 and not [t for t, _ in robot.applied if t > loop.hold_times[0]]
        # From here the app may answer: it can be serving before deploy() sees it RUNNING
        # (CI saw a chunk requested 0.6 s before deploy() returned).
        back_at = time.monotonic()
        serve_harness.deploy()
        wait_until(lambda: loop.stats.resumes >= 1, 60, "the robot to resume")
        time.sleep(1.0)
    finally:
        stats = finish(stop, thread, client, outcome)
        serve_harness.deploy()  # leave the app running for the next test
    check_hold_and_resume(loop, robot, client, stats, back_at)
    assert set(stats.failures) & {"NOT_FOUND", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"}


def test_replica_killed_mid_stream_holds_the_robot_and_resumes_when_serve_replaces_it(serve_harness, demo_app):
    ((victim, details),) = serve_harness.replicas().items()
    loop, robot, client, stop, thread, outcome = start_loop(demo_app, "stream")
    try:
        wait_until(lambda: len(robot.applied) >= HZ, 10, "a second of motion")
        os.kill(details["pid"], signal.SIGKILL)  # the replica's worker process crashes mid-stream
        wait_until(lambda: loop.hold_times, 10, "the watchdog to hold the robot")
        wait_until(lambda: set(serve_harness.replicas()) - {victim}, 60, "Serve to start a new replica")
        back_at = time.monotonic()
        wait_until(lambda: loop.stats.resumes >= 1, 60, "the robot to resume")
        time.sleep(1.0)
    finally:
        stats = finish(stop, thread, client, outcome)
        serve_harness.deploy()
    check_hold_and_resume(loop, robot, client, stats, back_at)


def run_cli(*args, timeout=60, env=None):
    return subprocess.run(
        [sys.executable, "-m", "robot_client", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )


def test_cli_runs_the_replay_robot_closed_loop(demo_app, tmp_path):
    out = tmp_path / "stats.json"
    result = run_cli(
        "--server_address",
        demo_app,
        "--prompt",
        "pick up the red block",
        "--control_frequency",
        "30",
        "--num_cameras",
        "2",
        "--timeout",
        "10",
        "--robot",
        "replay",
        "--duration",
        "2",
        "--stats_json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(out.read_text())
    assert stats["acted"] >= 50 and stats["starved"] <= 3 and stats["chunks_accepted"] >= 4
    assert "final stats: ticks=" in result.stderr  # the numbers are logged, not only written
    assert "mode stream" in result.stderr  # the default


def test_wrong_address_gives_a_clear_message():
    wrong = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_cli("--server_address", wrong, "--prompt", "x", "--timeout", "1.5", "--robot", "replay")
    assert result.returncode == 2
    assert f"policy server at {wrong} not ready after 1.5 s: cannot reach the policy server at {wrong}" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 15


def test_wrong_or_missing_key_gives_a_clear_message_and_the_right_key_works(serve_harness, tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text("correct-horse\n")
    address = serve_harness.deploy({"api_key_file": str(key_file)}, metadata=(("x-api-key", "correct-horse"),))
    try:
        wrong = run_cli(
            "--server_address",
            address,
            "--prompt",
            "x",
            "--timeout",
            "5",
            "--robot",
            "replay",
            "--api-key",
            "battery-staple",
        )
        assert wrong.returncode == 2 and "API key given was refused" in wrong.stderr, wrong.stderr
        missing = run_cli(
            "--server_address",
            address,
            "--prompt",
            "x",
            "--timeout",
            "5",
            "--robot",
            "replay",
            env={"INFERENCE_API_KEY": ""},
        )
        assert missing.returncode == 2 and "the server requires an API key; pass --api-key" in missing.stderr
        client = PolicyClient(address, api_key="correct-horse", timeout_s=5)
        try:
            client.wait_ready(10)
            obs = Observation(images=[frame(96, 96), frame(96, 96, seed=1)], state=np.zeros(8))
            assert client.get_action_chunk(obs, "x").actions.shape == (16, 8)
            started = time.monotonic()
            with pytest.raises(AuthenticationFailed):
                PolicyClient(address, api_key="nope", timeout_s=5).wait_ready(10)
            assert time.monotonic() - started < 2  # refused at once, never retried
        finally:
            client.close()
    finally:
        serve_harness.deploy()


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_a_rejected_observation_gives_the_servers_reason(demo_app, mode):
    client = PolicyClient(demo_app, mode=mode, timeout_s=5)
    try:
        client.wait_ready(10)
        obs = Observation(images=[frame(96, 96), frame(96, 96, seed=1)], state=np.zeros(40))  # model takes 32
        with pytest.raises(ObservationRejected, match="robot_state: 40 values but the model takes at most 32"):
            client.get_action_chunk(obs, "x", attempts=3)
        assert client.epoch == 0  # not a connection problem: no reconnect, no retry
    finally:
        client.close()


def test_the_control_loop_stops_and_holds_on_a_rejected_observation(demo_app):
    client = PolicyClient(demo_app, timeout_s=5)
    good = replay_robot()
    try:
        spec = client.wait_ready(10)
        loop = ControlLoop(good, client, spec, LoopConfig(prompt="pick", control_frequency=HZ))
        bad_after = time.monotonic() + 0.5
        observe = good.observe

        def observe_then_break():
            obs = observe()
            if time.monotonic() > bad_after:  # e.g. a driver starts publishing extra joints
                obs.state = np.zeros(40, np.float32)
            return obs

        good.observe = observe_then_break
        with pytest.raises(ObservationRejected, match="robot_state: 40 values"):
            loop.run(duration_s=5)
        assert good.applied and good.holds and good.holds[-1] >= good.applied[-1][0]
    finally:
        client.close()


def test_a_robot_the_model_cannot_serve_is_refused_before_it_moves(demo_app, tmp_path):
    path = replay_robot(state_dim=40).recording.save(tmp_path / "wide.npz")
    result = run_cli(
        "--server_address", demo_app, "--prompt", "x", "--timeout", "5", "--robot", "replay", "--replay_file", str(path)
    )
    assert result.returncode == 2
    assert "cannot serve this robot: the robot state has 40 values, the model takes at most 32" in result.stderr
    client = PolicyClient(demo_app, timeout_s=5)
    three_cameras = ReplayRobot(synthetic_recording(frames=2, num_cameras=3, height=8, width=8))
    try:
        with pytest.raises(IncompatibleServer, match="the robot sends 3 cameras, the model has 2"):
            ControlLoop.connect(three_cameras, client, LoopConfig(prompt="x"), 5)
    finally:
        client.close()
