"""Faults against the real app: a replica process killed under 8 open streams, a checkpoint redeployed under load.

Robots here are robot_client's ControlLoop + PolicyClient (stream mode) on
replayed observations, or plain gRPC streams where the test is about what the
server sends. Every call is timed: none may outlive its deadline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.errors import PolicyError
from robot_client.policy_client import PolicyClient
from robot_client.replay_robot import ReplayRobot, synthetic_recording
from serve_app.checkpoint import open_checkpoint
from serve_app.observation import ObservationBatch
from serve_app.parse import parse_observation
from serve_app.policies import load_policy
from tests.conftest import DEMO_CHECKPOINT, REPO_ROOT, wait_for_health
from tests.payloads import chunk_array, observation

pytestmark = pytest.mark.serve
ROBOTS = 8
HZ = 30
PERIOD = 1 / HZ
WATCHDOG_S = 0.1
# A tick can start late on a loaded 2-core machine with 8 loops running: allow that much on top.
SCHEDULING_SLACK_S = 0.1
# Redeploys and kills finish quickly: old replicas get 2 s to drain their streams.
FAST_DRAIN = {"graceful_shutdown_timeout_s": 2, "graceful_shutdown_wait_loop_s": 0.5}


# --- robots -----------------------------------------------------------------


class TimedClient(PolicyClient):
    """The real client, recording when each call was sent, how long it took, and what it returned."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sent: dict[str, float] = {}
        self.returned: dict[str, np.ndarray] = {}
        self.failures: list[float] = []
        self.calls: list[tuple[float, float]] = []  # (duration, deadline) of every infer/health call

    def _timed(self, fn, timeout, *args):
        started = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.calls.append((time.monotonic() - started, timeout or self.timeout_s))

    def health(self, timeout_s=None):
        return self._timed(super().health, timeout_s, timeout_s)

    def infer(self, request, timeout_s=None):
        self.sent[request.request_id] = time.monotonic()
        try:
            chunk = self._timed(super().infer, timeout_s, request, timeout_s)
        except PolicyError:
            self.failures.append(time.monotonic())
            raise
        self.returned[chunk.request_id] = chunk.actions
        return chunk


@dataclass
class Robot:
    loop: ControlLoop
    robot: ReplayRobot
    client: TimedClient
    stop: threading.Event = field(default_factory=threading.Event)
    outcome: dict = field(default_factory=dict)
    thread: threading.Thread | None = None

    @classmethod
    def start(cls, address: str, seed: int, **client_options) -> Robot:
        client = TimedClient(address, mode="stream", timeout_s=5.0, **client_options)
        robot = ReplayRobot(synthetic_recording(frames=10, height=96, width=96, state_dim=14, seed=seed))
        config = LoopConfig(prompt="pick up the cube", control_frequency=HZ, watchdog_timeout_s=WATCHDOG_S,
                            stats_interval_s=3600)
        me = cls(ControlLoop.connect(robot, client, config, 30), robot, client)
        me.thread = threading.Thread(target=me._run, name=f"robot-{seed}", daemon=True)
        me.thread.start()
        return me

    def _run(self):
        try:
            self.outcome["stats"] = self.loop.run(stop=self.stop)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.outcome["error"] = err

    def finish(self):
        self.stop.set()
        self.thread.join(timeout=15)
        self.client.close()
        assert not self.thread.is_alive(), "control loop did not stop"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["stats"]


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# --- a replica process killed under 8 streams ------------------------------------


def check_robot_rode_out_the_kill(r: Robot, stats, killed_at: float) -> tuple[float, float]:
    """Asserts the robot's side of the fault; returns (hold lateness past its deadline, time to resume) in s."""
    loop, client = r.loop, r.client
    # 1. Held within one control period after its watchdog deadline.
    assert stats.holds >= 1 and stats.resumes >= 1, stats.line()
    hold_at = next(t for t in loop.hold_times if t >= killed_at - 1.0)
    last_fresh = max(rec.time for rec in loop.trace if rec.kind == "act" and rec.time < hold_at)
    deadline = last_fresh + WATCHDOG_S
    # The hold came at the first tick at or after the deadline (ticks are one period apart) ...
    (hold,) = [rec for rec in loop.trace if rec.time == hold_at]
    previous = max((rec for rec in loop.trace if rec.tick < hold.tick), key=lambda rec: rec.tick)
    assert previous.time < deadline <= hold_at
    # ... so within one control period of it, plus what the OS delayed that tick by.
    assert hold_at - deadline < PERIOD + SCHEDULING_SLACK_S, (hold_at - deadline)
    assert r.robot.holds and any(0 <= t - hold_at < 0.05 for t in r.robot.holds)
    # 2. Nothing moved it while it was held.
    resumed = [rec for rec in loop.trace if rec.kind == "act" and rec.time > hold_at]
    assert resumed, "never resumed after Serve replaced the replica"
    assert not [t for t, _ in r.robot.applied if hold_at <= t < resumed[0].time]
    # 3. No stale chunk: every action after the gap comes from a request sent after the last
    #    failure before resuming, i.e. on the new connection (epoch) to the new replica.
    last_failure = max(t for t in client.failures if t < resumed[0].time)
    assert all(client.sent[rec.request_id] > last_failure for rec in resumed)
    # 4. What ran is exactly what the server returned.
    acts = [rec for rec in loop.trace if rec.kind == "act"]
    assert len(acts) == len(r.robot.applied)
    for rec, (_, action) in zip(acts, r.robot.applied):
        np.testing.assert_array_equal(action, client.returned[rec.request_id][rec.row])
    # 5. No call hung: each ended (answer or status) within its deadline.
    late = [(d, t) for d, t in client.calls if d > t + 0.5]
    assert not late, f"calls outlived their deadline: {late}"
    return hold_at - deadline, resumed[0].time - killed_at


def test_replica_process_killed_under_8_streams(serve_harness):
    address = serve_harness.deploy(**FAST_DRAIN)
    (victim,) = serve_harness.replicas()
    before = wait_for_health(address).replica_id
    robots = [Robot.start(address, seed=i) for i in range(ROBOTS)]
    stats = []
    try:
        wait_until(lambda: all(len(r.robot.applied) >= HZ for r in robots), 30, "a second of motion on every robot")
        killed_at = time.monotonic()
        os.kill(serve_harness.replicas()[victim]["pid"], signal.SIGKILL)  # the replica's worker process, mid-stream
        wait_until(lambda: all(r.loop.hold_times for r in robots), 10, "every robot to hold")
        wait_until(lambda: set(serve_harness.replicas()) - {victim}, 60, "Serve to start a new replica")
        wait_until(lambda: all(r.loop.stats.resumes >= 1 for r in robots), 60, "every robot to resume")
        time.sleep(1.0)
    finally:
        stats = [r.finish() for r in robots]
    after = wait_for_health(address)
    assert after.replica_id != before and victim not in serve_harness.replicas()
    measured = np.array([check_robot_rode_out_the_kill(r, s, killed_at) for r, s in zip(robots, stats)])
    failures = sum(sum(s.failures.values()) for s in stats)
    print(f"replica kill, {ROBOTS} streams: hold {measured[:, 0].max() * 1e3:.0f} ms past the watchdog deadline "
          f"at worst (period {PERIOD * 1e3:.0f} ms); resumed {measured[:, 1].min():.1f}-{measured[:, 1].max():.1f} s "
          f"after the kill; {failures} failed calls, all statuses within their deadlines")


# --- a new checkpoint redeployed while robots run ----------------------------------


def load_make_demo():
    spec = importlib.util.spec_from_file_location("make_demo_checkpoint", REPO_ROOT / "scripts" / "make_demo_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_demo


def checkpoint_id(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()[:16]


@dataclass
class Answer:
    at: float
    checkpoint_id: str
    replica_id: str
    chunk: np.ndarray


def stream_robot(address: str, request: pb.ObservationRequest, stop: threading.Event, answers: list, failures: list):
    """Streams the same observation over and over; on a cut, reconnects with a new stream."""
    while not stop.is_set():
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RobotPolicyServiceStub(channel)
            try:
                def requests():
                    while not stop.is_set():
                        yield request
                        time.sleep(0.03)

                for response in stub.StreamActionChunks(requests(), timeout=60):
                    answers.append(Answer(time.monotonic(), response.checkpoint_id, response.replica_id, chunk_array(response)))
            except grpc.RpcError as err:
                failures.append((time.monotonic(), err.code(), 0.0))
                time.sleep(0.1)


def unary_robot(address: str, request: pb.ObservationRequest, stop: threading.Event, answers: list, failures: list):
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = stub.GetActionChunk(request, timeout=5)
                answers.append(Answer(time.monotonic(), response.checkpoint_id, response.replica_id, chunk_array(response)))
            except grpc.RpcError as err:
                failures.append((time.monotonic(), err.code(), time.monotonic() - started))
                time.sleep(0.1)
            time.sleep(0.03)


def test_redeploy_with_a_new_checkpoint_while_robots_run(serve_harness, tmp_path):
    new_ckpt = tmp_path / "seed1"
    shutil.copytree(DEMO_CHECKPOINT, new_ckpt)
    load_make_demo()(new_ckpt, seed=1)
    old_id, new_id = checkpoint_id(DEMO_CHECKPOINT), checkpoint_id(new_ckpt)
    assert old_id != new_id
    # What each checkpoint answers to the one observation every robot sends.
    request = observation(seed=5, request_id="same")
    expected = {}
    for ckpt, cid in ((DEMO_CHECKPOINT, old_id), (new_ckpt, new_id)):
        policy = load_policy(open_checkpoint(ckpt), "cpu")
        expected[cid] = policy.predict(ObservationBatch.stack([parse_observation(request, policy.spec, policy.frames)]))[0]
    assert not np.allclose(expected[old_id], expected[new_id])

    address = serve_harness.deploy(**FAST_DRAIN)
    stop = threading.Event()
    robots = [(stream_robot if i < 6 else unary_robot, [], []) for i in range(8)]
    threads = [threading.Thread(target=fn, args=(address, request, stop, answers, failures), daemon=True)
               for fn, answers, failures in robots]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(len(a) >= 5 for _, a, _ in robots), 30, "every robot to get answers")
        deploy_at = time.monotonic()
        serve_harness.deploy({"checkpoint": str(new_ckpt)}, **FAST_DRAIN)
        health = wait_for_health(address, until=lambda h: h.checkpoint_id == new_id, timeout_s=120)
        switched_at = time.monotonic()
        wait_until(lambda: all(any(x.checkpoint_id == new_id and x.at > switched_at for x in a) for _, a, _ in robots),
                   30, "every robot to get answers from the new checkpoint")
        moved_at = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        serve_harness.deploy()
    assert not any(t.is_alive() for t in threads), "a robot's call hung"
    print(f"redeploy: HealthCheck reported {new_id} {switched_at - deploy_at:.1f} s after the deploy, all "
          f"{len(robots)} robots were on it {moved_at - switched_at:.1f} s later; {sum(len(f) for _, _, f in robots)} calls failed during the switch "
          f"({sorted({c.name for _, _, f in robots for _, c, _ in f})}), "
          f"{sum(len(a) for _, a, _ in robots)} chunks checked against their checkpoint")
    assert health.checkpoint_id == new_id and health.healthy

    for kind, answers, failures in robots:
        ids = [a.checkpoint_id for a in answers]
        # Every chunk came from exactly one checkpoint and is exactly that checkpoint's output.
        assert set(ids) <= {old_id, new_id}, set(ids)
        for a in answers:
            np.testing.assert_allclose(a.chunk, expected[a.checkpoint_id], atol=1e-5)
        # Each robot moved once, from the old checkpoint to the new, and never back.
        first_new = ids.index(new_id)
        assert set(ids[first_new:]) == {new_id}, f"{kind.__name__}: went back to the old checkpoint"
        # Failures during the switch (a stream cut when its old replica drained) are statuses, not hangs.
        # A unary call caught on a draining replica may run to its deadline (CI saw one on 2 shared
        # cores: HAProxy had routed it to the old replica as it stopped); what is promised is that no
        # call outlives its deadline and no chunk is stale (checked above), not that each fails fast.
        assert all(code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED)
                   for _, code, _ in failures), failures
        assert all(took < 5.5 for _, _, took in failures), "a unary call outlived its 5 s deadline"
