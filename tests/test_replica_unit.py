"""The deployment class on its own (no Ray, no gRPC): the adapter around the engine (tests/test_engine.py).
@serve.batch needs a replica: batching through Serve is in test_serving.py."""

import asyncio

import grpc
import pytest
import torch

from policy_wire import robot_inference_pb2 as pb
from policy_wire.input_spec import InputSpec
from serve_app.engine import FAILED_PASSES_UNHEALTHY
from serve_app.replica import BatchSettings, RobotPolicyReplica
from tests.conftest import DEMO_CHECKPOINT
from tests.payloads import CallContext, observation


@pytest.fixture()
def replica():
    return RobotPolicyReplica.func_or_class(checkpoint=str(DEMO_CHECKPOINT), api_key_env=None)


def test_check_health_fails_once_forward_passes_keep_failing(replica):
    asyncio.run(replica.check_health())
    with torch.no_grad():
        replica._engine.policy.net.head[0].weight.fill_(float("nan"))
    for _ in range(FAILED_PASSES_UNHEALTHY):
        context = CallContext()
        asyncio.run(replica.GetActionChunk(observation(), grpc_context=context))
        assert context.code == grpc.StatusCode.INTERNAL and "see the server log" in context.details
    with pytest.raises(RuntimeError, match="forward passes failed"):
        asyncio.run(replica.check_health())


def test_unary_bad_input_sets_status_on_the_context(replica):
    context = CallContext()
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
    health = asyncio.run(replica.HealthCheck(pb.HealthCheckRequest(), grpc_context=CallContext()))
    assert health.healthy and health.replica_id == "local" and health.chunk_length == 16
    advertised = InputSpec(**{name: getattr(health, name) for name in InputSpec.__dataclass_fields__})
    assert advertised == replica._engine.spec  # every field of the spec, from its one list


def test_time_to_starvation_is_the_deadline_and_a_bad_one_is_invalid_argument(replica):
    context = CallContext()
    request = observation()
    request.time_to_starvation_ms = -5
    asyncio.run(replica.GetActionChunk(request, grpc_context=context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "time_to_starvation_ms" in context.details

    request.time_to_starvation_ms = 1e-6  # gone before the pass: dropped, status on the call
    context = CallContext()
    response = asyncio.run(replica.GetActionChunk(request, grpc_context=context))
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED and "dropped before the forward pass" in context.details
    assert not response.action_chunk

    request.time_to_starvation_ms = 60_000
    context = CallContext()
    response = asyncio.run(replica.GetActionChunk(request, grpc_context=context))
    assert context.code is None and len(response.action_chunk) == 16


def test_user_config_sets_scheduling_live(replica):
    replica.reconfigure({"max_batch_size": 4, "scheduling": "fifo"})
    assert replica._engine.settings == BatchSettings(max_batch_size=4, scheduling="fifo")
    with pytest.raises(ValueError, match="scheduling"):
        replica.reconfigure({"scheduling": "lifo"})
