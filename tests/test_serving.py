"""The real app: Ray Serve's gRPC proxy on loopback, the demo checkpoint, real JPEG bytes."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.checkpoint import open_checkpoint
from serve_app.observation import ObservationBatch
from serve_app.parse import parse_observation
from serve_app.policies import load_policy
from tests.conftest import DEMO_CHECKPOINT
from tests.opentau_wire import LegacyStub, legacy
from tests.payloads import chunk_array, encode, frame, observation

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def local_policy():
    """The same checkpoint loaded in-process: what the server must reproduce."""
    return load_policy(open_checkpoint(DEMO_CHECKPOINT), "cpu")


def expected_chunk(local_policy, request) -> np.ndarray:
    return local_policy.predict(ObservationBatch.stack([parse_observation(request, local_policy.spec, local_policy.frames)]))[0]


def test_health_check_advertises_the_input_spec(stub):
    health = stub.HealthCheck(pb.HealthCheckRequest(), timeout=10)
    assert health.healthy and health.status == "SERVING" and health.warmed_up
    assert (health.num_cameras, health.image_height, health.image_width) == (2, 96, 96)
    assert (health.state_dim, health.action_dim, health.chunk_length) == (32, 8, 16)
    assert health.policy_type == health.model_name == "visuomotor_chunk"
    weights = (DEMO_CHECKPOINT / "model.safetensors").read_bytes()
    assert health.checkpoint_id == hashlib.sha256(weights).hexdigest()[:16]
    assert health.replica_id and health.device == "cpu"


def test_standard_grpc_health_probe(demo_app):
    with grpc.insecure_channel(demo_app) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        named = health_pb2.HealthCheckRequest(service="robot_inference.RobotPolicyService")
        assert health.Check(named, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_unary_chunk_is_the_policy_output_in_robot_units(stub, local_policy):
    request = observation(request_id="unary-1", seed=3)
    before = time.time_ns()
    response = stub.GetActionChunk(request, timeout=10)
    assert response.request_id == "unary-1" and response.error_code == 0
    assert before <= response.timestamp_ns <= time.time_ns()
    assert response.batch_size >= 1 and response.inference_time_ms > 0 and response.queue_time_ms >= 0
    chunk = chunk_array(response)
    assert chunk.shape == (16, 8)
    np.testing.assert_allclose(chunk, expected_chunk(local_policy, request), atol=1e-5)
    other = chunk_array(stub.GetActionChunk(observation(seed=4), timeout=10))
    assert not np.allclose(chunk, other), "different observations gave the same chunk"


def test_raw_float_frames_as_opentau_clients_send_them(stub, local_policy):
    request = observation()
    for i, camera in enumerate(request.images):
        camera.image_data = (frame(224, 224, i).astype(np.float32) / 255.0).tobytes()
        camera.encoding = "raw"
    np.testing.assert_allclose(chunk_array(stub.GetActionChunk(request, timeout=10)), expected_chunk(local_policy, request), atol=1e-5)


def test_prefix_rows_are_reproduced(stub):
    request = observation()
    prefix = np.arange(5 * 8, dtype=np.float32).reshape(5, 8) / 10
    request.prefix_action.extend(pb.ActionVector(values=row) for row in prefix.tolist())
    request.delay = 4
    chunk = chunk_array(stub.GetActionChunk(request, timeout=10))
    np.testing.assert_array_equal(chunk[:4], prefix[:4])
    assert not np.array_equal(chunk[4], prefix[4])


def test_stream_answers_every_message_in_order(stub, local_policy):
    requests = [observation(seed=i, request_id=f"s-{i}") for i in range(8)]
    responses = list(stub.StreamActionChunks(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    for request, response in zip(requests, responses):
        np.testing.assert_allclose(chunk_array(response), expected_chunk(local_policy, request), atol=1e-5)


def test_concurrent_streams(demo_app):
    def robot(i):
        with grpc.insecure_channel(demo_app) as channel:
            stub = pb_grpc.RobotPolicyServiceStub(channel)
            reqs = [observation(seed=i * 10 + k, request_id=f"{i}-{k}") for k in range(5)]
            return [(r.request_id, len(r.action_chunk), r.error_code) for r in stub.StreamActionChunks(iter(reqs), timeout=60)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(robot, range(8)))
    for i, answers in enumerate(results):
        assert answers == [(f"{i}-{k}", 16, 0) for k in range(5)]


def test_a_bad_message_in_a_stream_is_answered_in_band_and_the_stream_goes_on(stub):
    bad = observation(request_id="bad")
    bad.robot_state.state[0] = float("nan")
    requests = [observation(request_id="a"), bad, observation(request_id="c")]
    responses = list(stub.StreamActionChunks(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == ["a", "bad", "c"]
    assert responses[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "robot_state" in responses[1].error_message and not responses[1].action_chunk
    assert responses[0].error_code == responses[2].error_code == 0 and len(responses[2].action_chunk) == 16


def test_an_observation_past_its_deadline_is_dropped_in_band_and_the_stream_goes_on(stub):
    late = observation(request_id="late")
    late.time_to_starvation_ms = 1e-6  # the robot starves before any pass could end
    soon = observation(request_id="soon")
    soon.time_to_starvation_ms = 60_000
    requests = [observation(request_id="a"), late, soon]
    responses = list(stub.StreamActionChunks(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == ["a", "late", "soon"]
    assert responses[1].error_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and not responses[1].action_chunk
    assert "dropped before the forward pass" in responses[1].error_message
    assert responses[0].error_code == responses[2].error_code == 0 and len(responses[2].action_chunk) == 16


def test_a_unary_call_past_its_deadline_gets_deadline_exceeded_and_a_bad_one_invalid_argument(stub):
    request = observation()
    request.time_to_starvation_ms = 1e-6
    with pytest.raises(grpc.RpcError) as err:
        stub.GetActionChunk(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "dropped before the forward pass" in err.value.details()
    request.time_to_starvation_ms = float("nan")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetActionChunk(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "time_to_starvation_ms" in err.value.details()
    assert len(stub.GetActionChunk(observation(), timeout=30).action_chunk) == 16


def _truncated(r):
    r.images[0].image_data = r.images[0].image_data[: len(r.images[0].image_data) // 2]


def _bomb(r):
    r.images[0].image_data = encode(np.zeros((6000, 6000, 3), np.uint8), "PNG")
    r.images[0].encoding = "png"


def _raw_mismatch(r):
    r.images[0].image_data = b"\x00" * 1000
    r.images[0].encoding = "raw"
    r.images[0].width, r.images[0].height = 20, 20


def _prefix(rows, delay):
    def mutate(r):
        r.prefix_action.extend(pb.ActionVector(values=row) for row in rows)
        r.delay = delay

    return mutate


BAD_INPUTS = {
    "no images": (lambda r: r.ClearField("images"), "needs at least 2"),
    "more images than cameras": (lambda r: r.images.append(r.images[0]), "only 2 cameras"),
    "unknown encoding": (lambda r: setattr(r.images[1], "encoding", "webp"), "unknown encoding 'webp'"),
    "corrupt image": (lambda r: setattr(r.images[0], "image_data", b"\x89PNG\r\n\x1a\n broken"), "camera 0"),
    "truncated jpeg": (_truncated, "camera 0: corrupt or truncated"),
    "decompression bomb": (_bomb, "6000x6000"),
    "raw bytes do not match shape": (_raw_mismatch, "needs 1200 bytes, got 1000"),
    "empty state": (lambda r: r.robot_state.ClearField("state"), "robot_state: empty"),
    "state too long": (lambda r: r.robot_state.state.extend([0.0] * 30), "at most 32"),
    "nan state": (lambda r: r.robot_state.state.__setitem__(2, float("nan")), "value 2"),
    "infinite state": (lambda r: r.robot_state.state.__setitem__(0, float("-inf")), "finite"),
    "ragged prefix": (_prefix([[0.0] * 8, [0.0] * 6], 1), "row 1 has 6 values"),
    "too-wide prefix": (_prefix([[0.0] * 9], 1), "action dim is 8"),
    "delay beyond prefix": (_prefix([[0.0] * 8] * 2, 3), "delay: 3 is out of range"),
    "negative delay": (_prefix([[0.0] * 8] * 2, -1), "delay: -1"),
    "over-long prompt": (lambda r: setattr(r, "prompt", "go " * 1000), "prompt: 3000 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_invalid_argument_and_the_server_keeps_serving(stub, case):
    mutate, fragment = BAD_INPUTS[case]
    request = observation(request_id=case)
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetActionChunk(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fragment in info.value.details()
    assert "Traceback" not in info.value.details()
    # The same bad message inside a stream is answered in-band.
    answers = list(stub.StreamActionChunks(iter([request, observation(request_id="ok")]), timeout=30))
    assert answers[0].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and fragment in answers[0].error_message
    assert answers[1].error_code == 0 and len(answers[1].action_chunk) == 16
    assert stub.HealthCheck(pb.HealthCheckRequest(), timeout=10).healthy


def test_health_check_answers_while_32_streams_are_open(demo_app):
    import queue
    import threading

    gates = [queue.Queue() for _ in range(32)]
    first_answers = queue.Queue()

    def robot(i):
        def requests():
            yield observation(seed=i, request_id=f"{i}")
            gates[i].get(timeout=60)  # hold the stream open until the health check is done

        with grpc.insecure_channel(demo_app) as channel:
            for response in pb_grpc.RobotPolicyServiceStub(channel).StreamActionChunks(requests(), timeout=90):
                first_answers.put(response.request_id)

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    try:
        got = {first_answers.get(timeout=60) for _ in range(32)}
        assert got == {str(i) for i in range(32)}  # all 32 streams are live
        with grpc.insecure_channel(demo_app) as channel:
            started = time.monotonic()
            health = pb_grpc.RobotPolicyServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), timeout=10)
            assert health.healthy
            assert time.monotonic() - started < 10
    finally:
        for gate in gates:
            gate.put(None)
        for t in threads:
            t.join(timeout=60)


def test_an_opentau_client_works_unchanged(demo_app):
    with grpc.insecure_channel(demo_app) as channel:
        stub = LegacyStub(channel)
        health = stub.HealthCheck(legacy["HealthCheckRequest"](), timeout=10)
        assert health.healthy and health.model_name == "visuomotor_chunk"
        obs = observation(request_id="legacy-1")
        request = legacy["ObservationRequest"].FromString(obs.SerializeToString())
        response = stub.GetActionChunk(request, timeout=10)
        assert response.request_id == "legacy-1" and len(response.action_chunk) == 16
        assert all(len(row.values) == 8 for row in response.action_chunk)
        streamed = list(stub.StreamActionChunks(iter([request] * 3), timeout=30))
        assert [len(r.action_chunk) for r in streamed] == [16, 16, 16]


def test_concurrent_robots_share_a_batch_and_batch_size_changes_live(serve_harness):
    def burst(address, n):
        def one(i):
            with grpc.insecure_channel(address) as channel:
                return pb_grpc.RobotPolicyServiceStub(channel).GetActionChunk(observation(seed=i), timeout=30)

        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(one, range(n)))

    address = serve_harness.deploy(user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.5})
    first = burst(address, 8)
    sizes = [r.batch_size for r in first]
    assert max(sizes) > 1, f"no batching across clients: {sizes}"
    assert max(sizes) <= 8
    replica = first[0].replica_id

    address = serve_harness.deploy(user_config={"max_batch_size": 2, "batch_wait_timeout_s": 0.5})
    second = burst(address, 8)
    assert {r.replica_id for r in second} == {replica}, "reconfigure must not restart the replica"
    assert max(r.batch_size for r in second) == 2
