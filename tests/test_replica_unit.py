"""The deployment class on its own (no Ray, no gRPC). Batching needs Serve: see test_serving.py."""

import asyncio

import grpc
import pytest
import torch

from policy_wire import robot_inference_pb2 as pb
from serve_app.replica import BatchSettings, RobotPolicyReplica
from tests.conftest import DEMO_CHECKPOINT
from tests.payloads import observation


@pytest.fixture()
def replica():
    return RobotPolicyReplica.func_or_class(checkpoint=str(DEMO_CHECKPOINT), api_key_env=None)


class Context:
    def __init__(self, metadata=()):
        self.metadata, self.code, self.details = metadata, None, None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_check_health_runs_a_real_forward_pass_and_fails_on_broken_weights(replica):
    asyncio.run(replica.check_health())
    with torch.no_grad():
        replica._policy.net.head[0].weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        asyncio.run(replica.check_health())


def test_unary_bad_input_sets_status_on_the_context(replica):
    context = Context()
    request = observation()
    request.ClearField("images")
    response = asyncio.run(replica.GetActionChunk(request, grpc_context=context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "images" in context.details
    assert not response.action_chunk


def test_user_config_is_validated():
    assert BatchSettings.from_user_config({"max_batch_size": 3}).max_batch_size == 3
    with pytest.raises(ValueError, match="unknown keys"):
        BatchSettings.from_user_config({"max_batch": 3})
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        BatchSettings.from_user_config({"max_batch_size": 0})


def test_health_check_response(replica):
    health = asyncio.run(replica.HealthCheck(pb.HealthCheckRequest(), grpc_context=Context()))
    assert health.healthy and health.replica_id == "local" and health.chunk_length == 16


class CountingPool:
    """The replica's decode pool, counting what is handed to it."""

    def __init__(self, pool):
        self.pool, self.calls = pool, 0

    def submit(self, fn, *args):
        self.calls += 1
        return self.pool.submit(fn, *args)


def test_small_frames_decode_inline_large_ones_in_the_pool_with_the_same_answer(replica, monkeypatch):
    from ray.serve.batching import _BatchQueue

    from tests.payloads import encode, frame

    # Outside a replica, @serve.batch's queue asks for a replica context it does not need.
    # Its queue also lives with the first event loop that used it: one asyncio.run for all calls.
    monkeypatch.setattr(_BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
    pool = replica._decode_pool = CountingPool(replica._decode_pool)

    def request(side):
        r = observation()
        for camera in r.images:
            camera.image_data = encode(frame(side, side), "JPEG")
        return r

    async def answer(r, inline_max):
        replica._inline_decode_max_pixels = inline_max
        before = pool.calls
        response = await replica.GetActionChunk(r, grpc_context=Context())
        return [list(row.values) for row in response.action_chunk], pool.calls - before

    async def scenario():
        small, large = request(96), request(1280)
        budget = 2 * 640 * 480  # the default: two VGA frames
        return [await answer(small, budget), await answer(small, 0), await answer(large, budget), await answer(large, 0)]

    (small_inline, hops_a), (small_pooled, hops_b), (large_default, hops_c), (large_pooled, hops_d) = asyncio.run(scenario())
    assert (hops_a, hops_b, hops_c, hops_d) == (0, 1, 1, 1)  # 2 x 1280^2 pixels is over the default budget
    assert len(small_inline) == 16 and small_inline == small_pooled and large_default == large_pooled
