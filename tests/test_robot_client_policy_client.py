"""PolicyClient mechanics against a small in-process gRPC server on loopback.

A plain grpcio server lets these tests count calls and script failures
exactly (refusals, hangs, restarts) in milliseconds. The same client against
the real Serve app is in test_robot_client_serve.py.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from robot_client.chunk_executor import ChunkRequest
from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.errors import (
    AuthenticationFailed,
    IncompatibleServer,
    InvalidChunk,
    ObservationDropped,
    ObservationRejected,
    ServerUnavailable,
)
from robot_client.inference_worker import InferenceWorker
from robot_client.policy_client import PolicyClient
from robot_client.robot import Observation
from tests.conftest import free_port
from tests.payloads import frame
from tests.robot_client_fixtures import FakeClock, health_reply, small_robot

DROP_REASON = "time to starvation 4 ms is shorter than the next pass (38 ms): dropped before the forward pass"


class FakePolicy(pb_grpc.RobotPolicyServiceServicer):
    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.keys: list[str | None] = []
        self.requests: list[pb.ObservationRequest] = []
        self.behaviour = "ok"  # ok | reject | unauth | hang | nan
        self.chunk_length = 8
        self.drop: set[int] = set()  # unary calls / stream messages (1-based) answered DEADLINE_EXCEEDED, unanswered
        self.release = threading.Event()

    def _key(self, context):
        self.keys.append(dict(context.invocation_metadata()).get("x-api-key"))
        if self.behaviour == "unauth":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong API key: send metadata 'x-api-key'")

    def HealthCheck(self, request, context):
        self.calls["health"] += 1
        self._key(context)
        return health_reply("fake", self.chunk_length)

    def _answer(self, request) -> pb.ActionChunkResponse:
        self.requests.append(request)
        if self.behaviour == "hang":
            self.release.wait(5)
        value = float("nan") if self.behaviour == "nan" else 0.5
        return pb.ActionChunkResponse(
            action_chunk=[pb.ActionVector(values=[value] * 4) for _ in range(8)], request_id=request.request_id
        )

    def GetActionChunk(self, request, context):
        self.calls["unary"] += 1
        self._key(context)
        if self.behaviour == "reject":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "robot_state: 40 values but the model takes at most 32")
        if self.calls["unary"] in self.drop:
            self.requests.append(request)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, DROP_REASON)
        return self._answer(request)

    def StreamActionChunks(self, request_iterator, context):
        self.calls["stream"] += 1
        self._key(context)
        for request in request_iterator:
            self.calls["stream_message"] += 1
            if self.behaviour == "reject":
                yield pb.ActionChunkResponse(
                    request_id=request.request_id,
                    error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    error_message="camera 0: 12 bytes labelled 'jpeg' are not a JPEG or PNG image",
                )
                continue
            if self.calls["stream_message"] in self.drop:
                self.requests.append(request)
                yield pb.ActionChunkResponse(
                    request_id=request.request_id,
                    error_code=grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
                    error_message=DROP_REASON,
                )
                continue
            yield self._answer(request)
        self.calls["stream_ended_by_client"] += 1  # the client half-closed; the call ends with OK


class FakeServer:
    def __init__(self):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.policy = FakePolicy()
        self._server = None

    def start(self):
        self._server = grpc.server(ThreadPoolExecutor(8))
        pb_grpc.add_RobotPolicyServiceServicer_to_server(self.policy, self._server)
        assert self._server.add_insecure_port(self.address) == self.port
        self._server.start()

    def stop(self):
        if self._server is not None:
            self.policy.release.set()
            self._server.stop(0).wait()
            self._server = None
            self.policy.release.clear()


@pytest.fixture()
def server():
    s = FakeServer()
    s.start()
    yield s
    s.stop()


def observation(state_dim: int = 6) -> Observation:
    return Observation(images=[frame(120, 160), frame(120, 160, seed=1)], state=np.linspace(-1, 1, state_dim))


def client_for(server, **kw) -> PolicyClient:
    client = PolicyClient(server.address, timeout_s=kw.pop("timeout_s", 2.0), **kw)
    client.wait_ready(5)
    return client


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_every_call_carries_the_api_key_and_prefix_goes_on_the_wire(server, mode):
    client = client_for(server, api_key="s3cret", mode=mode)
    try:
        prefix = np.arange(12, dtype=np.float32).reshape(3, 4)
        chunk = client.get_action_chunk(observation(), "pick", prefix=prefix, delay=2)
        assert chunk.actions.shape == (8, 4)
        sent = server.policy.requests[-1]
        assert [list(r.values) for r in sent.prefix_action] == prefix.tolist() and sent.delay == 2
        assert sent.prompt == "pick" and len(sent.robot_state.state) == 6 and sent.request_id == chunk.request_id
        assert all(c.encoding == "jpeg" for c in sent.images)  # fitted to the advertised 96x96
        assert server.policy.keys and set(server.policy.keys) == {"s3cret"}
    finally:
        client.close()


def test_by_default_every_chunk_is_asked_for_on_one_stream(server):
    client = client_for(server)
    try:
        for _ in range(3):
            client.get_action_chunk(observation(), "pick")
    finally:
        client.close()
    calls = server.policy.calls
    assert calls["stream"] == 1 and calls["stream_message"] == 3 and calls["unary"] == 0


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_a_rejected_observation_is_not_retried_and_says_why(server, mode):
    client = client_for(server, mode=mode)
    try:
        server.policy.behaviour = "reject"
        with pytest.raises(ObservationRejected, match="rejected the observation: (robot_state|camera 0)"):
            client.get_action_chunk(observation(), "pick", attempts=5)
        sent = server.policy.calls["unary" if mode == "unary" else "stream_message"]
        assert sent == 1 and client.epoch == 0
        if mode == "stream":  # an in-band refusal keeps the stream open for the next observation
            server.policy.behaviour = "ok"
            client.get_action_chunk(observation(), "pick")
            assert server.policy.calls["stream"] == 1
    finally:
        client.close()


def test_time_to_starvation_goes_on_the_wire_only_when_given(server):
    client = client_for(server)
    try:
        client.get_action_chunk(observation(), "pick")
        client.infer(client.build_request(observation(), "pick", time_to_starvation_ms=120.5))
        plain, given = server.policy.requests[-2:]
        assert plain.time_to_starvation_ms == 0.0 and b"\xa5\x06" not in plain.SerializeToString()  # field 100
        assert given.time_to_starvation_ms == pytest.approx(120.5)
        with pytest.raises(ValueError, match="time to starvation must be >= 0 ms"):
            client.build_request(observation(), "pick", time_to_starvation_ms=-1.0)
    finally:
        client.close()


def test_the_inference_worker_sends_the_budget_left_at_the_moment_of_sending(server):
    client = client_for(server)
    clock = FakeClock()
    worker = InferenceWorker(client, "pick", timeout_s=0.25, clock=clock)
    worker.start()
    try:
        for n, starves_at in enumerate((clock() + 0.1, None, clock() - 0.01)):
            request = ChunkRequest(f"w{n}", tick=0, epoch=0, sent_at=clock(), prefix=np.zeros((0, 4)), delay=0)
            worker.submit(request, observation(), None, 0, starves_at=starves_at)
            deadline = time.monotonic() + 5
            while not (results := worker.poll()) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert results and results[0].error is None
        sent = [r.time_to_starvation_ms for r in server.policy.requests]
        # Until starvation; the call's deadline when nothing is executing; spent: tiny, never 0 (= none).
        assert sent == [pytest.approx(100.0), pytest.approx(250.0), pytest.approx(1e-3)]
    finally:
        worker.close()
        client.close()


def test_the_loop_rides_out_an_in_band_drop_on_the_same_stream_and_uses_the_next_chunk(server, caplog):
    server.policy.drop = {2}
    client = client_for(server, mode="stream")
    robot = small_robot(time.monotonic)
    config = LoopConfig(prompt="pick", control_frequency=30, max_chunk_age_s=1.0, stats_interval_s=1e9)
    try:
        loop = ControlLoop.connect(robot, client, config, ready_timeout_s=5)
        health = server.policy.calls["health"]
        with caplog.at_level(logging.WARNING, logger="robot_client"):
            stats = loop.run(duration_s=1.5)
    finally:
        client.close()

    first, dropped, after = (r.request_id for r in server.policy.requests[:3])
    assert stats.server_drops == 1 and not stats.failures
    assert server.policy.calls["stream"] == 1 and server.policy.calls["health"] == health  # no reconnect
    assert client.epoch == 0 and loop.executor.epoch == 0
    assert f"dropped by the server: {DROP_REASON}" in caplog.text and "reconnecting" not in caplog.text
    # The robot kept executing the first chunk, not a tick without an action, until the one after
    # the drop took over (ticks a loaded machine skipped are skipped on the plan too: not in the trace).
    trace = list(loop.trace)
    start = next(i for i, r in enumerate(trace) if r.kind == "act")
    switch = next(i for i, r in enumerate(trace) if r.request_id == after)
    assert {(r.kind, r.request_id) for r in trace[start:switch]} == {("act", first)}
    assert dropped not in {r.request_id for r in trace}
    # On the wire: the first asked with the wait budget (nothing executing yet), the next two, sent
    # while the first chunk ran, until it would run out (at most its 8 rows' worth).
    ttl = [r.time_to_starvation_ms for r in server.policy.requests[:3]]
    assert ttl[0] == pytest.approx(1000.0) and all(0 < t <= 8 / 30 * 1e3 + 1e-3 for t in ttl[1:])


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_a_wrong_key_is_not_retried(server, mode):
    client = client_for(server, api_key="wrong", mode=mode)
    try:
        server.policy.behaviour = "unauth"
        with pytest.raises(AuthenticationFailed, match="API key given was refused"):
            client.get_action_chunk(observation(), "pick", attempts=5)
        assert server.policy.calls[mode] == 1
    finally:
        client.close()


def test_an_old_stream_is_renewed_between_requests_without_a_gap(server):
    # Behind HAProxy a reload cuts every stream older than it when the old process stops
    # (robot_client.policy_client.STREAM_MAX_AGE_S); renewing ahead of that is invisible.
    client = client_for(server, mode="stream", stream_max_age_s=0.25)
    try:
        for _ in range(8):
            client.get_action_chunk(observation(), "pick")
            time.sleep(0.1)
        deadline = time.monotonic() + 2
        while server.policy.calls["stream_ended_by_client"] < server.policy.calls["stream"] - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 3 <= server.policy.calls["stream"] <= 5  # ~0.8 s of calls, a new stream every ~0.3 s
        assert server.policy.calls["stream_message"] == 8 and client.epoch == 0  # no request lost, no gap
        assert server.policy.calls["stream_ended_by_client"] == server.policy.calls["stream"] - 1  # closed politely
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_the_servers_deadline_exceeded_is_a_drop_but_a_hung_server_is_a_gap_and_the_stream_replaced(server, mode):
    client = client_for(server, mode=mode)
    try:
        client.get_action_chunk(observation(), "pick")
        # The server answers, in time, that it dropped the observation: the connection is fine.
        server.policy.drop = {2}
        health = server.policy.calls["health"]
        with pytest.raises(ObservationDropped, match=re.escape(f"dropped by the server: {DROP_REASON}")) as caught:
            client.infer(client.build_request(observation(), "pick", time_to_starvation_ms=4.0), timeout_s=2.0)
        assert not caught.value.transient
        assert client.epoch == 0 and client.backoff.failures == 0 and client.retry_delay() == 0
        client.get_action_chunk(observation(), "pick")
        assert server.policy.calls["health"] == health  # no reconnect, no spec re-read
        assert server.policy.calls["stream"] == (1 if mode == "stream" else 0)  # the same stream carried all
        # No answer within our own deadline is another matter: a gap.
        server.policy.behaviour = "hang"
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="did not answer within 0.30 s"):
            client.infer(client.build_request(observation(), "pick"), timeout_s=0.3)
        assert 0.29 < time.monotonic() - started < 1.5 and client.epoch == 1
        server.policy.release.set()
        server.policy.behaviour = "ok"
        time.sleep(client.retry_delay())
        client.get_action_chunk(observation(), "pick")
        if mode == "stream":
            assert server.policy.calls["stream"] == 2  # the timed-out stream was never reused
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_reconnects_with_backoff_after_the_server_restarts(server, mode):
    client = client_for(server, mode=mode)
    try:
        client.get_action_chunk(observation(), "pick")
        server.stop()
        with pytest.raises(
            ServerUnavailable, match=f"cannot reach the policy server at {server.address}|failed the call"
        ):
            client.get_action_chunk(observation(), "pick", attempts=3)
        assert client.epoch == 3 and client.backoff.failures == 3 and client.retry_delay() > 0
        server.start()
        health_before = server.policy.calls["health"]
        time.sleep(client.retry_delay())
        chunk = client.get_action_chunk(observation(), "pick", attempts=3)
        assert chunk.actions.shape == (8, 4)
        assert server.policy.calls["health"] == health_before + 1  # the spec is re-read on reconnect
        assert client.backoff.failures == 0 and client.retry_delay() == 0 and client.epoch == 3
    finally:
        client.close()


def test_a_server_back_with_another_model_is_refused_not_driven(server):
    client = client_for(server)
    try:
        server.stop()
        with pytest.raises(ServerUnavailable):
            client.get_action_chunk(observation(), "pick")
        server.policy.chunk_length = 50  # redeployed with a different checkpoint
        server.start()
        time.sleep(client.retry_delay())
        with pytest.raises(IncompatibleServer, match="chunk length 50.*restart the robot client"):
            client.get_action_chunk(observation(), "pick")
    finally:
        client.close()


def test_a_chunk_with_nan_never_leaves_the_client(server):
    client = client_for(server)
    try:
        server.policy.behaviour = "nan"
        with pytest.raises(InvalidChunk, match="NaN"):
            client.get_action_chunk(observation(), "pick")
    finally:
        client.close()


def test_wait_ready_on_a_wrong_address_says_so(server):
    wrong = f"127.0.0.1:{free_port()}"
    client = PolicyClient(wrong, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match=f"policy server at {wrong} not ready after 1.0 s: cannot reach"):
        client.wait_ready(1.0)
    assert time.monotonic() - started < 3
    client.close()
