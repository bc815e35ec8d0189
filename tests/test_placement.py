"""Replicas pinned to GPUs: two replicas on two logical GPUs get different ids and say so."""

import grpc
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.serve


def test_two_replicas_on_two_gpus_report_different_gpu_ids(serve_harness):
    # The session cluster declares 2 logical GPUs (ray.init(num_gpus=2)); no CUDA here,
    # so the replicas compute on CPU while Ray's placement is real.
    address = serve_harness.deploy(num_replicas=2, ray_actor_options={"num_gpus": 1, "num_cpus": 1})
    seen: dict[str, tuple[str, ...]] = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        for _ in range(200):
            health = stub.HealthCheck(pb.HealthCheckRequest(), timeout=10)
            seen[health.replica_id] = tuple(health.gpu_ids)
            if len(seen) == 2:
                break
    assert len(seen) == 2, f"only reached replicas {seen}"
    gpu_sets = sorted(seen.values())
    assert all(len(ids) == 1 for ids in gpu_sets), gpu_sets
    assert gpu_sets[0] != gpu_sets[1], gpu_sets
    serve_harness.forget()
