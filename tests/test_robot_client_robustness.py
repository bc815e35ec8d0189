"""The client under faults it cannot see coming: its own exceptions, and an overloaded server.

A small gRPC server on loopback refuses calls the way Serve does when its queue
is full (RESOURCE_EXHAUSTED "Request dropped due to backpressure", see
docs/reliability.md) and records the connection each call came on, so the tests
see exactly what reached the wire. Faults inside the client are injected into
the real PolicyClient; the worker, the loop and the backoff are the real ones.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from robot_client.backoff import Backoff
from robot_client.chunk_executor import ChunkRequest
from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.errors import (
    ClientFault,
    ObservationRejected,
    ObservationUnencodable,
    PolicyError,
    ServerOverloaded,
    ServerUnavailable,
)
from robot_client.inference_worker import InferenceWorker
from robot_client.policy_client import PolicyClient
from robot_client.robot import Observation
from tests.conftest import free_port
from tests.payloads import frame
from tests.robot_client_fixtures import health_reply, run_in_thread, small_robot

BACKPRESSURE = "Request dropped due to backpressure"  # what Serve's ingress says with its queue full


class Overloaded(pb_grpc.RobotPolicyServiceServicer):
    """A policy server that answers `answer_first` observations, then refuses the next `refuse`
    for lack of capacity, then answers again. `where` the refusal comes: "call" (a unary call's
    status), "message" (in-band, one message of a stream) or "open" (the status of a new stream)."""

    def __init__(self, refuse: int = 0, where: str = "call", answer_first: int = 0):
        self.refuse, self.where, self.answer_first = refuse, where, answer_first
        self.health = 0
        self.streams = 0
        self.answered = 0
        self.peers: list[str] = []  # the client's address:port each call came from: one per connection
        self._lock = threading.Lock()

    def _refusing(self, where: str) -> bool:
        with self._lock:
            if where != self.where or self.answered < self.answer_first or self.refuse <= 0:
                return False
            self.refuse -= 1
            return True

    def _chunk(self, request) -> pb.ActionChunkResponse:
        with self._lock:
            self.answered += 1
        return pb.ActionChunkResponse(
            action_chunk=[pb.ActionVector(values=[0.1 * i] * 4) for i in range(8)], request_id=request.request_id
        )

    def HealthCheck(self, request, context):
        self.peers.append(context.peer())
        self.health += 1
        return health_reply("overloaded")

    def GetActionChunk(self, request, context):
        self.peers.append(context.peer())
        if self._refusing("call"):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, BACKPRESSURE)
        return self._chunk(request)

    def StreamActionChunks(self, request_iterator, context):
        self.peers.append(context.peer())
        self.streams += 1
        if self._refusing("open"):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, BACKPRESSURE)
        for request in request_iterator:
            if self._refusing("message"):
                yield pb.ActionChunkResponse(
                    request_id=request.request_id,
                    error_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                    error_message=BACKPRESSURE,
                )
            else:
                yield self._chunk(request)


class Server:
    def __init__(self, policy: Overloaded, options=()):
        self.policy = policy
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._server = grpc.server(ThreadPoolExecutor(8), options=options)
        pb_grpc.add_RobotPolicyServiceServicer_to_server(policy, self._server)
        assert self._server.add_insecure_port(self.address) == self.port

    def __enter__(self) -> Server:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(0).wait()


class FaultyClient(PolicyClient):
    """The real client, with `fault` raised from infer while it is set: a bug deep in the client."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.fault: Exception | None = None
        self.attempts: list[tuple[float, Exception | None]] = []

    def infer(self, request, timeout_s=None):
        fault = self.fault
        self.attempts.append((time.monotonic(), fault))
        if fault is not None:
            raise fault
        return super().infer(request, timeout_s)


def observation() -> Observation:
    return Observation(images=[frame(120, 160), frame(120, 160, seed=1)], state=np.linspace(-1, 1, 6))


def config() -> LoopConfig:
    return LoopConfig(prompt="pick", control_frequency=30, max_chunk_age_s=1.0, stats_interval_s=1e9)


def acts_between(loop, after, before=np.inf):
    return [r for r in loop.trace if r.kind == "act" and after < r.time < before]


# --- 1. the inference worker never dies silently ------------------------------------------------------


def test_an_unexpected_exception_in_the_client_is_logged_counted_held_and_retried_until_it_clears(caplog):
    with Server(Overloaded()) as server:
        client = FaultyClient(server.address, timeout_s=2.0)
        robot = small_robot(time.monotonic)
        worker = InferenceWorker(client, "pick", timeout_s=1.0, backoff=Backoff(initial_s=0.05, max_s=1.0, jitter=0))
        try:
            loop = ControlLoop.connect(robot, client, config(), ready_timeout_s=5, worker=worker)
            with caplog.at_level(logging.DEBUG, logger="robot_client"):
                stop, thread, outcome = run_in_thread(loop)
                time.sleep(0.7)
                broke_at = time.monotonic()
                client.fault = RuntimeError("boom in the encoder")
                time.sleep(0.5)
                client.fault = KeyError("camera_0")
                time.sleep(0.8)
                client.fault = None
                cleared_at = time.monotonic()
                time.sleep(1.5)
                assert thread.is_alive() and not worker.busy  # the loop ran on; the worker is free again
                stop.set()
                thread.join(timeout=5)
        finally:
            client.close()
    assert not thread.is_alive() and "error" not in outcome, outcome
    stats = outcome["stats"]

    faulty = [(t, f) for t, f in client.attempts if f is not None]
    # Counted: every attempt that raised reached the loop as a ClientFault, and nothing else failed.
    assert stats.failures == {"ClientFault": len(faulty)} and loop.error is None
    # Retried, paced by the worker's backoff: 2 s of faults at 30 Hz would be 60 attempts unpaced.
    assert 4 <= len(faulty) <= 10
    gaps = np.diff([t for t, _ in faulty])
    assert gaps.max() > 3 * gaps[0], gaps
    assert worker.backoff.failures == 0  # reset by the first success
    # Logged once per distinct error, with its traceback, not at every retry.
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "inference worker: unexpected" in r.message]
    assert [r.exc_info[0] for r in logged] == [RuntimeError, KeyError]
    assert "boom in the encoder" in logged[0].message and "'camera_0'" in logged[1].message
    # Held: the robot stopped at the watchdog's deadline and nothing moved it until the fault cleared.
    hold_at = next(t for t in loop.hold_times if t > broke_at)
    assert hold_at < broke_at + 1.0 and stats.resumes >= 1
    assert any(0 <= t - hold_at < 0.05 for t in robot.holds)  # robot.hold() was called on that tick
    resumed = acts_between(loop, hold_at)
    assert resumed and resumed[0].time > cleared_at
    assert not [t for t, _ in robot.applied if hold_at <= t < resumed[0].time]
    assert len(resumed) > 10  # and it kept going on fresh chunks


@pytest.mark.parametrize(
    "bad, why",
    [
        (Observation(images=[frame(24, 32)[:, :, :2], frame(24, 32)], state=np.zeros(6)), "camera frame has shape"),
        (Observation(images=[frame(24, 32), frame(24, 32)], state=["elbow", "wrist"]), "could not convert"),
        (Observation(images=[frame(24, 32), frame(24, 32)], state=object()), "float"),
        (Observation(images=None, state=np.zeros(6)), "not iterable"),
    ],
)
def test_an_observation_that_cannot_be_encoded_is_a_configuration_error_not_retried(bad, why):
    client = PolicyClient(f"127.0.0.1:{free_port()}", timeout_s=1.0)  # never contacted: encoding fails first
    worker = InferenceWorker(client, "pick", timeout_s=1.0)
    worker.start()
    try:
        request = ChunkRequest("bad", tick=0, epoch=0, sent_at=0.0, prefix=np.zeros((0, 4)), delay=0)
        worker.submit(request, bad, None, 0)
        deadline = time.monotonic() + 5
        while worker.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        (result,) = worker.poll()
    finally:
        worker.close()
        client.close()
    error = result.error
    assert isinstance(error, ObservationUnencodable) and not error.transient and result.chunk is None
    assert str(error).startswith("cannot encode the robot's observation: ") and why in str(error)
    assert "\n" not in str(error)  # __main__ prints it as `robot_client: error: <one line>`


def test_a_control_loop_whose_robot_sends_an_unencodable_frame_holds_and_stops_with_one_line():
    with Server(Overloaded()) as server:
        client = PolicyClient(server.address, timeout_s=2.0)
        robot = small_robot(time.monotonic)
        broken_after = time.monotonic() + 0.5
        observe = robot.observe

        def observe_then_break():
            obs = observe()
            if time.monotonic() > broken_after:  # e.g. a driver starts publishing two-channel frames
                obs.images = [np.zeros((24, 32, 2), np.uint8), *obs.images[1:]]
            return obs

        robot.observe = observe_then_break
        try:
            loop = ControlLoop.connect(robot, client, config(), ready_timeout_s=5)
            with pytest.raises(ObservationUnencodable, match=r"camera frame has shape \(24, 32, 2\)") as caught:
                loop.run(duration_s=5.0)
            stopped_after = time.monotonic() - broken_after
        finally:
            client.close()
    assert isinstance(caught.value, PolicyError) and "\n" not in str(caught.value)
    assert loop.stats.failures == {"ObservationUnencodable": 1} and stopped_after < 1.0  # the first one stops it
    assert robot.applied and robot.holds and robot.holds[-1] >= robot.applied[-1][0]


# --- 2. RESOURCE_EXHAUSTED backs off on the same channel -----------------------------------------------


@pytest.mark.parametrize(("mode", "where"), [("unary", "call"), ("stream", "message"), ("stream", "open")])
def test_an_overloaded_server_is_backed_off_on_the_same_connection_without_a_health_check(mode, where):
    refusals = 4
    with Server(Overloaded(refuse=refusals, where=where)) as server:
        client = PolicyClient(server.address, mode=mode, timeout_s=2.0, backoff=Backoff(0.02, 1.0, jitter=0))
        try:
            client.wait_ready(5)
            errors, waits = [], []
            while True:
                try:
                    chunk = client.infer(client.build_request(observation(), "pick"))
                    break
                except ServerOverloaded as err:
                    errors.append(err)
                    waits.append(client.retry_delay())
                    assert len(errors) <= refusals, "the refusals are over; the next call must be answered"
                    time.sleep(waits[-1])
            after = client.retry_delay(), client.backoff.failures
            client.infer(client.build_request(observation(), "pick"))  # and the next call goes straight on
        finally:
            client.close()

    assert len(errors) == refusals and chunk.actions.shape == (8, 4)
    for err in errors:
        assert isinstance(err, ServerUnavailable) and err.transient and err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(err) == (
            f"the policy server at {server.address} is overloaded and refused the call "
            f"(RESOURCE_EXHAUSTED: {BACKPRESSURE}); backing off on the same connection"
        )
    # The waits grew with consecutive refusals, and the first success reset them.
    assert waits == pytest.approx([0.02, 0.04, 0.08, 0.16], abs=0.005)
    assert after == (0.0, 0)
    # The connection was never given up: one connection, no HealthCheck after wait_ready's, no new epoch.
    assert len(set(server.policy.peers)) == 1 and server.policy.health == 1
    assert client.epoch == 0 and chunk.request_id.split("-")[1] == "0"
    # In a stream an in-band refusal leaves the stream open; a stream refused at open is replaced.
    assert server.policy.streams == {"call": 0, "message": 1, "open": refusals + 1}[where]


@pytest.mark.parametrize(("mode", "where"), [("unary", "call"), ("stream", "message")])
def test_a_control_loop_rides_out_an_overload_holding_the_robot_and_resumes_on_the_same_connection(mode, where):
    refusals = 6
    with Server(Overloaded(refuse=refusals, where=where, answer_first=3)) as server:
        client = PolicyClient(server.address, mode=mode, timeout_s=2.0, backoff=Backoff(0.02, 0.2, jitter=0))
        robot = small_robot(time.monotonic)
        try:
            loop = ControlLoop.connect(robot, client, config(), ready_timeout_s=5)
            stats = loop.run(duration_s=2.5)
        finally:
            client.close()
    # Counted under its code; the robot held while refused (the waits add up to 0.7 s) and resumed.
    assert stats.failures == {"RESOURCE_EXHAUSTED": refusals} and loop.error is None
    assert stats.holds >= 1 and stats.resumes >= 1 and acts_between(loop, loop.hold_times[-1])
    assert client.epoch == 0 and server.policy.health == 1 and len(set(server.policy.peers)) == 1
    assert server.policy.streams == (1 if mode == "stream" else 0)
    # Nor did the loop treat a refusal as a gap: chunks asked for before it still count.
    assert loop.executor.epoch == 0


def test_a_message_over_the_servers_size_limit_is_refused_for_good_not_backed_off():
    # gRPC answers RESOURCE_EXHAUSTED for this too, but the same observation is refused every time.
    with Server(Overloaded(), options=[("grpc.max_receive_message_length", 2000)]) as server:
        client = PolicyClient(server.address, mode="unary", timeout_s=2.0)
        try:
            client.wait_ready(5)
            with pytest.raises(ObservationRejected, match="larger than the policy server at .* accepts") as caught:
                client.infer(client.build_request(observation(), "pick"))
        finally:
            client.close()
    assert not caught.value.transient and "Received message larger than max" in str(caught.value)
    assert client.epoch == 0 and client.retry_delay() == 0


def test_a_fault_of_the_worker_is_paced_by_its_own_backoff_and_the_servers_refusals_by_the_clients():
    with Server(Overloaded(refuse=1, where="call")) as server:
        client = FaultyClient(server.address, mode="unary", timeout_s=2.0, backoff=Backoff(0.3, 1.0, jitter=0))
        worker = InferenceWorker(client, "pick", timeout_s=1.0, backoff=Backoff(0.2, 1.0, jitter=0))
        worker.start()
        try:
            client.wait_ready(5)
            outcomes = []
            for n, fault in enumerate((ValueError("a bug, not the observation"), None, None)):
                client.fault = fault
                request = ChunkRequest(f"w{n}", tick=0, epoch=0, sent_at=0.0, prefix=np.zeros((0, 4)), delay=0)
                worker.submit(request, observation(), None, 0)
                started = time.monotonic()
                while not (results := worker.poll()):
                    time.sleep(0.002)
                while worker.busy:
                    time.sleep(0.002)
                outcomes.append((results[0].error, time.monotonic() - started))
        finally:
            worker.close()
            client.close()
    (fault, fault_s), (refusal, refusal_s), (answer, answer_s) = outcomes
    # A ValueError from infer is a bug in the client, not a configuration error: retried.
    assert isinstance(fault, ClientFault) and fault.transient and "unexpected ValueError" in str(fault)
    assert 0.2 <= fault_s < 0.4  # the worker's backoff
    assert isinstance(refusal, ServerOverloaded) and 0.3 <= refusal_s < 0.5  # the client's
    assert answer is None and answer_s < 0.2
