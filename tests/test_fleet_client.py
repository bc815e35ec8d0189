"""robot_client names its model and itself on every call: a plain grpcio server on loopback records the metadata.

Against the real Serve app (chunks from the named model, per-robot metrics): tests/test_fleet.py."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import numpy as np
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from robot_client.__main__ import parser
from robot_client.policy_client import PolicyClient
from robot_client.robot import Observation
from tests.conftest import free_port
from tests.payloads import frame
from tests.robot_client_fixtures import health_reply


class Recorder(pb_grpc.RobotPolicyServiceServicer):
    def __init__(self):
        self.seen: list[tuple[str, dict]] = []

    def _record(self, method, context):
        self.seen.append((method, dict(context.invocation_metadata())))

    def HealthCheck(self, request, context):
        self._record("health", context)
        return health_reply("fake", 8)

    def _chunk(self, request):
        return pb.ActionChunkResponse(action_chunk=[pb.ActionVector(values=[0.5] * 4) for _ in range(8)],
                                      request_id=request.request_id)

    def GetActionChunk(self, request, context):
        self._record("unary", context)
        return self._chunk(request)

    def StreamActionChunks(self, request_iterator, context):
        self._record("stream", context)
        for request in request_iterator:
            yield self._chunk(request)


@pytest.fixture()
def server():
    recorder = Recorder()
    port = free_port()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_RobotPolicyServiceServicer_to_server(recorder, grpc_server)
    grpc_server.add_insecure_port(f"127.0.0.1:{port}")
    grpc_server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        grpc_server.stop(0)


def observation() -> Observation:
    return Observation(images=[frame(64, 64, 0), frame(64, 64, 1)], state=np.zeros(4, np.float32))


@pytest.mark.parametrize("mode", ["stream", "unary"])
def test_every_call_carries_the_model_and_robot_id(server, mode):
    address, recorder = server
    client = PolicyClient(address, mode=mode, model="arm-b", robot_id="arm-b-07", api_key="k", timeout_s=10)
    try:
        client.wait_ready(10)
        for _ in range(2):
            client.get_action_chunk(observation(), "reach")
    finally:
        client.close()
    assert {method for method, _ in recorder.seen} == {"health", mode}
    for method, metadata in recorder.seen:
        assert metadata.get("multiplexed_model_id") == "arm-b", method
        assert metadata.get("robot_id") == "arm-b-07" and metadata.get("x-api-key") == "k", method


def test_without_a_model_nothing_extra_is_sent(server):
    address, recorder = server
    client = PolicyClient(address, mode="unary", timeout_s=10)
    try:
        client.wait_ready(10)
        client.get_action_chunk(observation(), "reach")
    finally:
        client.close()
    for _, metadata in recorder.seen:
        assert "multiplexed_model_id" not in metadata and "robot_id" not in metadata


def test_command_line_options():
    args = parser().parse_args(["--prompt", "p", "--model", "arm-b", "--robot_id", "r7"])
    assert (args.model, args.robot_id) == ("arm-b", "r7")
    defaults = parser().parse_args(["--prompt", "p"])
    assert defaults.model is None and defaults.robot_id == socket.gethostname()
