"""Serve's standard gRPC proxy (`--standard_proxy`): streams, auth, errors and limits behave as behind HAProxy.

Every other serving test runs behind the default, throughput-optimised ingress."""

from __future__ import annotations

import subprocess
import sys

import grpc
import psutil
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from tests.conftest import DEMO_CHECKPOINT, REPO_ROOT, free_port, launcher_env, process_tree_cmdlines, stop_process_group, wait_for_health
from tests.payloads import observation

pytestmark = pytest.mark.serve
KEY = "standard-proxy-key"


def test_standard_proxy_keeps_streams_auth_and_errors(tmp_path):
    port = free_port()
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    config = tmp_path / "serve_config.yaml"
    config.write_text(
        (REPO_ROOT / "serve_config.yaml").read_text()
        .replace("api_key_file: null", f"api_key_file: {key_file}")
        .replace("port: 8000", f"port: {free_port()}")
    )
    log = (tmp_path / "launcher.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_app", f"--config_path={DEMO_CHECKPOINT}", f"--server.port={port}",
         f"--serve_config={config}", "--address=local", "--no_dashboard", "--standard_proxy",
         "--server.max_receive_message_length_mb=1"],  # OpenTau's launcher flag
        cwd=REPO_ROOT, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    auth = (("x-api-key", KEY),)
    try:
        address = f"127.0.0.1:{port}"
        wait_for_health(address, metadata=auth, timeout_s=240)
        tree = process_tree_cmdlines(proc.pid)
        assert not any("haproxy" in n for n in tree) and any("ProxyActor" in n for n in tree), tree
        # Reachable from the network: the proxy's gRPC port listens on every interface (read from the OS).
        hosts = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN}
        assert hosts and hosts <= {"0.0.0.0", "::"}, hosts
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RobotPolicyServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetActionChunk(observation(), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StreamActionChunks(iter([observation()]), timeout=30))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

            bad = observation(request_id="bad")
            bad.robot_state.ClearField("state")
            with pytest.raises(grpc.RpcError) as info:
                stub.GetActionChunk(bad, metadata=auth, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "robot_state" in info.value.details()

            answers = list(stub.StreamActionChunks(iter([observation(request_id="a"), bad, observation(request_id="c")]),
                                                   metadata=auth, timeout=60))
            assert [a.request_id for a in answers] == ["a", "bad", "c"]
            assert answers[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert len(answers[0].action_chunk) == len(answers[2].action_chunk) == 16

            # Over the 1 MB limit: refused by the proxy's gRPC server before it is read, and it keeps serving.
            big = observation(request_id="big")
            big.images[0].image_data = b"\xff" * (2 * 1024 * 1024)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetActionChunk(big, metadata=auth, timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
            # A body that does not parse: INVALID_ARGUMENT with a plain message (not UNKNOWN).
            raw = channel.unary_unary("/robot_inference.RobotPolicyService/GetActionChunk",
                                      request_serializer=lambda b: b, response_deserializer=pb.ActionChunkResponse.FromString)
            with pytest.raises(grpc.RpcError) as info:
                raw(b"\x0a\xff\xff\xff\xff\x0f", metadata=auth, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert "not a valid robot_inference.ObservationRequest" in info.value.details()
            assert stub.GetActionChunk(observation(request_id="after"), metadata=auth, timeout=30).request_id == "after"
    finally:
        stop_process_group(proc)
