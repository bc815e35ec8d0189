"""Several policies behind Serve's standard gRPC proxy (`--standard_proxy`): the model id reaches the replica there too.

tests/test_fleet.py covers the default, HAProxy ingress (direct ingress: the replica's own gRPC
server reads `multiplexed_model_id`); behind the standard proxy the proxy reads it and passes it
with the handle call. Both end in `serve.get_multiplexed_model_id()` (serve_app/fleet_metadata.py)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import yaml

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from tests.conftest import (DEMO_CHECKPOINT, REPO_ROOT, free_port, launcher_env, process_tree_cmdlines, stop_process_group,
                            variant_checkpoint, wait_for_health)
from tests.payloads import observation
from tests.test_fleet_models import checkpoint_id

pytestmark = pytest.mark.serve


def test_standard_proxy_routes_each_robot_to_the_model_it_names(tmp_path):
    b = variant_checkpoint(tmp_path / "b", seed=41)
    port = free_port()
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = free_port()
    args = config["applications"][0]["args"]
    args.update(default_model="demo", checkpoints={"b": str(b)}, max_models_per_replica=2)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "launcher.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_app", f"--config_path={DEMO_CHECKPOINT}", f"--server.port={port}",
         f"--serve_config={path}", "--address=local", "--no_dashboard", "--standard_proxy"],
        cwd=REPO_ROOT, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_for_health(address, timeout_s=240)
        tree = process_tree_cmdlines(proc.pid)
        assert not any("haproxy" in n for n in tree) and any("ProxyActor" in n for n in tree), tree
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RobotPolicyServiceStub(channel)
            for model, directory in (("b", b), ("demo", DEMO_CHECKPOINT), (None, DEMO_CHECKPOINT)):
                metadata = (("multiplexed_model_id", model), ("robot_id", "std-robot")) if model else ()
                health = stub.HealthCheck(pb.HealthCheckRequest(), metadata=metadata, timeout=120)
                assert health.checkpoint_id == checkpoint_id(directory), model
                unary = stub.GetActionChunk(observation(), metadata=metadata, timeout=60)
                streamed = list(stub.StreamActionChunks(iter([observation(seed=1), observation(seed=2)]),
                                                        metadata=metadata, timeout=60))
                assert {unary.checkpoint_id} | {a.checkpoint_id for a in streamed} == {checkpoint_id(directory)}
            with pytest.raises(grpc.RpcError) as info:
                stub.GetActionChunk(observation(), metadata=(("multiplexed_model_id", "nope"),), timeout=60)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND and "b, demo" in info.value.details()
    finally:
        stop_process_group(proc)
