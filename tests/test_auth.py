"""API key auth on the real app: every RobotPolicyService RPC needs `x-api-key`."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.auth import ApiKeyGate
from tests.payloads import observation

pytestmark = pytest.mark.serve
KEY = "s3cret-robot-key"


def all_rpcs(stub, metadata):
    """Call each RPC; return its status code (OK when it answered)."""
    calls = {
        "HealthCheck": lambda: stub.HealthCheck(pb.HealthCheckRequest(), metadata=metadata, timeout=15),
        "GetActionChunk": lambda: stub.GetActionChunk(observation(), metadata=metadata, timeout=15),
        "StreamActionChunks": lambda: list(stub.StreamActionChunks(iter([observation()]), metadata=metadata, timeout=15)),
    }
    codes = {}
    for name, call in calls.items():
        try:
            call()
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            codes[name] = exc.code()
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                assert "x-api-key" in exc.details()
    return codes


def check_gate(address):
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        for metadata in [(), (("x-api-key", "wrong"),), (("x-api-key", KEY[:-1]),)]:
            assert set(all_rpcs(stub, metadata).values()) == {grpc.StatusCode.UNAUTHENTICATED}, metadata
        assert set(all_rpcs(stub, (("x-api-key", KEY),)).values()) == {grpc.StatusCode.OK}
        # Standard probes (kubelet, load balancers) carry no metadata; they learn only SERVING.
        probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=15)
        assert probe.status == health_pb2.HealthCheckResponse.SERVING


def test_key_from_a_file(serve_harness, tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    address = serve_harness.deploy(args={"api_key_file": str(key_file)}, metadata=(("x-api-key", KEY),))
    check_gate(address)


def test_key_from_opentau_env_var(serve_harness):
    address = serve_harness.deploy(
        ray_actor_options={"runtime_env": {"env_vars": {"INFERENCE_API_KEY": KEY}}},
        metadata=(("x-api-key", KEY),),
    )
    check_gate(address)


def test_gate_without_a_key_lets_everyone_in():
    class Context:
        def invocation_metadata(self):
            return ()

    ApiKeyGate(None).check(Context())  # no exception
    assert not ApiKeyGate(None).enabled
