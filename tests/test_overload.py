"""Overload: more closed-loop robots than the replica can serve.

The replica here is made deliberately slow and narrow: it serves at most
MAX_ONGOING robots at once (`max_ongoing_requests`) and each batch waits
BATCH_WAIT_S to fill, so it completes about MAX_ONGOING / BATCH_WAIT_S chunks
per second. Serve's ingress lets MAX_QUEUED more wait for it
(`max_queued_requests`) and refuses the rest at once with RESOURCE_EXHAUSTED.
The excess robots hear "no" in milliseconds, the admitted ones keep a latency
bounded by the queue, and robots that back off and retry all get served.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from robot_client.errors import ServerUnavailable
from robot_client.policy_client import PolicyClient
from robot_client.robot import Observation
from tests.payloads import frame, observation

pytestmark = pytest.mark.serve

MAX_ONGOING = 2
MAX_QUEUED = 2
BATCH_WAIT_S = 0.2
ROBOTS = 16
DEADLINE_S = 10.0
# Every batch waits BATCH_WAIT_S (it can never fill: max_batch_size > MAX_ONGOING), so the
# replica is a slow GPU with a known capacity of MAX_ONGOING / BATCH_WAIT_S = 10 chunks/s.
# Without a queue limit, ROBOTS closed-loop robots would each wait ROBOTS / capacity = 1.6 s.
UNBOUNDED_LATENCY_S = ROBOTS * BATCH_WAIT_S / MAX_ONGOING
SLOW_NARROW = {
    "max_ongoing_requests": MAX_ONGOING,
    "max_queued_requests": MAX_QUEUED,
    "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": BATCH_WAIT_S},
    # A queued call retries routing with backoff; Serve's default grows to 0.5 s, long for a robot.
    "request_router_config": {"initial_backoff_s": 0.005, "backoff_multiplier": 2, "max_backoff_s": 0.05},
}


@pytest.fixture(scope="module")
def overloaded_app(serve_harness):
    address = serve_harness.deploy(**SLOW_NARROW)
    yield address
    serve_harness.deploy()  # later tests expect the default app


def closed_loop_robot(address: str, stop: threading.Event, request: pb.ObservationRequest, log: list) -> None:
    """A robot that asks again as soon as it has an answer or a refusal (no backoff: the worst case)."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.GetActionChunk(request, timeout=DEADLINE_S)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
            log.append((code, time.monotonic() - started, details))
            if code is not grpc.StatusCode.OK:
                time.sleep(0.05)  # the shortest backoff robot_client would take


def test_excess_robots_are_refused_quickly_and_admitted_ones_keep_bounded_latency(overloaded_app):
    stop = threading.Event()
    logs = [[] for _ in range(ROBOTS)]
    request = observation(request_id="overload")
    threads = [threading.Thread(target=closed_loop_robot, args=(overloaded_app, stop, request, logs[i])) for i in range(ROBOTS)]
    for t in threads:
        t.start()
    time.sleep(6.0)
    stop.set()
    for t in threads:
        t.join(timeout=DEADLINE_S + 5)
    assert not any(t.is_alive() for t in threads), "a call hung past its deadline"

    calls = [entry for log in logs for entry in log]
    codes = {code for code, _, _ in calls}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes  # no timeouts, no INTERNAL
    ok = np.array([s for code, s, _ in calls if code is grpc.StatusCode.OK])
    refused = [(s, details) for code, s, details in calls if code is grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) > len(ok) / 4, f"{ROBOTS} robots, {len(ok)} answered, {len(refused)} refused"
    refusal_s = np.array([s for s, _ in refused])
    print(
        f"overload: {ROBOTS} robots for 6 s: {len(ok)} answered (p50 {np.percentile(ok, 50) * 1e3:.0f} ms, "
        f"p95 {np.percentile(ok, 95) * 1e3:.0f} ms, max {ok.max() * 1e3:.0f} ms), {len(refused)} refused "
        f"(p50 {np.percentile(refusal_s, 50) * 1e3:.1f} ms, p99 {np.percentile(refusal_s, 99) * 1e3:.1f} ms): {refused[0][1]!r}"
    )
    # Refused at once, by the proxy, with a message that says why.
    assert np.percentile(refusal_s, 99) < 0.5, f"refusals took p99 {np.percentile(refusal_s, 99):.3f} s"
    # Serve's standard proxy names the limit; the HAProxy ingress (the default) only says why.
    assert f"max_queued_requests={MAX_QUEUED}" in refused[0][1] or "backpressure" in refused[0][1], refused[0][1]
    # Admitted robots wait for the few calls ahead of them (about two batches, plus the proxy's
    # work on a loaded 2-core machine), not for every robot in the fleet as without the limit.
    assert np.percentile(ok, 95) < 0.75 * UNBOUNDED_LATENCY_S, (np.percentile(ok, 50), np.percentile(ok, 95))
    # Capacity is used: roughly MAX_ONGOING / BATCH_WAIT_S chunks per second were served.
    assert len(ok) >= 0.3 * 6.0 * MAX_ONGOING / BATCH_WAIT_S, len(ok)
    # (Which robot is refused is up to chance; robots that back off are all served: next test.)

    with grpc.insecure_channel(overloaded_app) as channel:
        assert pb_grpc.RobotPolicyServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), timeout=10).healthy


def test_robots_that_back_off_and_retry_all_get_served(overloaded_app):
    chunks_each = 5
    obs = Observation(images=[frame(96, 96), frame(96, 96, seed=1)], state=np.zeros(14, np.float32))

    def robot(i: int):
        client = PolicyClient(overloaded_app, timeout_s=DEADLINE_S)
        refusals = 0
        try:
            client.wait_ready(30)
            got = 0
            while got < chunks_each:
                try:
                    client.infer(client.build_request(obs, "pick"))
                    got += 1
                except ServerUnavailable as err:
                    assert err.code in (grpc.StatusCode.RESOURCE_EXHAUSTED,), err
                    refusals += 1
                    time.sleep(client.retry_delay())  # the client's own jittered exponential backoff
            return refusals
        finally:
            client.close()

    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        refusals = list(pool.map(robot, range(12)))
    assert sum(refusals) > 0, "12 robots on a 2-wide replica were never refused: no overload happened"
    assert time.monotonic() - started < 60


def test_streams_beyond_the_limits_are_refused_at_open(overloaded_app):
    """A stream holds one of MAX_ONGOING slots for its life; MAX_QUEUED more wait; the rest are refused."""
    gates = [queue.Queue() for _ in range(MAX_ONGOING)]
    answered = queue.Queue()

    def held_stream(i):
        def requests():
            yield observation(request_id=f"held-{i}")
            gates[i].get(timeout=60)

        with grpc.insecure_channel(overloaded_app) as channel:
            for response in pb_grpc.RobotPolicyServiceStub(channel).StreamActionChunks(requests(), timeout=60):
                answered.put(response.request_id)

    holders = [threading.Thread(target=held_stream, args=(i,)) for i in range(MAX_ONGOING)]
    for t in holders:
        t.start()
    try:
        assert {answered.get(timeout=30) for _ in range(MAX_ONGOING)} == {f"held-{i}" for i in range(MAX_ONGOING)}
        # The replica is full; the proxy queues MAX_QUEUED callers and refuses the rest.
        channel = grpc.insecure_channel(overloaded_app)
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        waiting = [stub.GetActionChunk.future(observation(request_id=f"q{i}"), timeout=30) for i in range(MAX_QUEUED)]
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamActionChunks(iter([observation(request_id="extra")]), timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1.0
        assert not any(f.done() for f in waiting), "queued calls must wait for a slot, not fail"
    finally:
        for gate in gates:
            gate.put(None)
        for t in holders:
            t.join(timeout=30)
    # The held streams ended: their slots go to the queued calls.
    assert [f.result(timeout=30).request_id for f in waiting] == [f"q{i}" for i in range(MAX_QUEUED)]
    channel.close()
