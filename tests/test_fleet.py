"""Several policies in one app, through Serve's gRPC ingress on loopback: real checkpoints, real robots' calls.

One app serves the demo checkpoint (the default, "demo") and three more made at test time from it
with other weights (tests/conftest.py variant_checkpoint); a replica holds two at once. Robots pick
one with metadata multiplexed_model_id and name themselves with robot_id."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from robot_client.policy_client import PolicyClient
from serve_app.checkpoint import open_checkpoint
from serve_app.observation import ObservationBatch
from serve_app.parse import parse_observation
from serve_app.policies import load_policy
from tests.conftest import DEMO_CHECKPOINT, REPO_ROOT, variant_checkpoint
from tests.payloads import chunk_array, observation
from tests.test_fleet_models import checkpoint_id

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet-serve")
    made = {name: variant_checkpoint(root / name, seed) for name, seed in (("b", 11), ("c", 12), ("late", 13))}
    return {"demo": DEMO_CHECKPOINT, **made}


@pytest.fixture()
def fleet(serve_harness, models) -> str:
    args = {"default_model": "demo", "max_models_per_replica": 2,
            "checkpoints": {name: str(path) for name, path in models.items() if name != "demo"}}
    return serve_harness.deploy(args=args)


def as_robot(model: str | None = None, robot: str | None = None) -> tuple:
    return tuple((k, v) for k, v in (("multiplexed_model_id", model), ("robot_id", robot)) if v)


def expected_chunk(policy, request) -> np.ndarray:
    return policy.predict(ObservationBatch.stack([parse_observation(request, policy.spec, policy.frames)]))[0]


def replica_log_lines(serve_harness, replica_id: str, pattern: str) -> list[str]:
    """Lines the replica wrote to its stderr (Ray keeps it under the session's logs) that match `pattern`."""
    prefix = f"RobotPolicy replica {replica_id}: "
    best: list[str] = []
    for path in Path(serve_harness.logs_dir).rglob("*.err"):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        lines = [line for line in text.splitlines() if line.startswith(prefix) and re.search(pattern, line)]
        best = max(best, lines, key=len)  # the replica's own file (a copy elsewhere must not count twice)
    return best


def wait_for_log_count(serve_harness, replica_id, pattern, count, timeout_s=20.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = replica_log_lines(serve_harness, replica_id, pattern)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_robots_on_two_models_interleaved_each_get_their_own_checkpoint(fleet, models):
    """Five robots on streams at once, three on the default (two of them naming it, one sending no id,
    as an OpenTau-era client) and two on b: every chunk is its model's, and batches never mix models."""
    policies = {name: load_policy(open_checkpoint(models[name]), "cpu") for name in ("demo", "b")}
    robots = [("r-demo-1", "demo"), ("r-demo-2", "demo"), ("r-legacy", None), ("r-b-1", "b"), ("r-b-2", "b")]
    results: dict[str, list] = {}
    failures = []

    def drive(robot, model):
        requests = [observation(seed=i, request_id=f"{robot}-{i}") for i in range(20)]
        try:
            with grpc.insecure_channel(fleet) as channel:
                stub = pb_grpc.RobotPolicyServiceStub(channel)
                metadata = as_robot(model, robot if model else None)
                results[robot] = list(zip(requests, stub.StreamActionChunks(iter(requests), metadata=metadata, timeout=120)))
        except Exception as exc:  # noqa: BLE001 - reported below, with the robot
            failures.append((robot, exc))

    threads = [threading.Thread(target=drive, args=robot) for robot in robots]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not failures, failures
    on_model = {"demo": 3, "b": 2}
    for robot, model in robots:
        name = model or "demo"
        assert len(results[robot]) == 20, robot
        for request, response in results[robot]:
            assert response.error_code == 0, response.error_message
            assert response.request_id == request.request_id
            assert response.checkpoint_id == checkpoint_id(models[name]), (robot, response.checkpoint_id)
            np.testing.assert_allclose(chunk_array(response), expected_chunk(policies[name], request), atol=1e-5)
            # A stream is answered in order, one observation at a time, so a pass holds at most one
            # observation per stream on its model: more would mean a pass mixed models.
            assert 1 <= response.batch_size <= on_model[name], (robot, response.batch_size)
    # Interleaved and batched: one replica served both models at once, robots of a model sharing passes.
    assert len({r.replica_id for rs in results.values() for _, r in rs}) == 1
    for name, model_robots in (("demo", ("r-demo-1", "r-demo-2", "r-legacy")), ("b", ("r-b-1", "r-b-2"))):
        assert max(r.batch_size for robot in model_robots for _, r in results[robot]) >= 2, name


def test_unary_calls_and_health_per_model(fleet, models):
    with grpc.insecure_channel(fleet) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        for model in ("demo", "b", None):
            health = stub.HealthCheck(pb.HealthCheckRequest(), metadata=as_robot(model), timeout=60)
            assert health.healthy and health.chunk_length == 16 and health.policy_type == "visuomotor_chunk"
            assert health.checkpoint_id == checkpoint_id(models[model or "demo"])
            response = stub.GetActionChunk(observation(), metadata=as_robot(model), timeout=60)
            assert response.checkpoint_id == health.checkpoint_id and len(response.action_chunk) == 16
        probes = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert probes.Check(health_pb2.HealthCheckRequest(service="b"), timeout=30).status == serving
        assert probes.Check(health_pb2.HealthCheckRequest(), metadata=as_robot("b"), timeout=30).status == serving
        with pytest.raises(grpc.RpcError) as info:
            probes.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_model_is_not_found_with_the_names_that_exist(fleet):
    with grpc.insecure_channel(fleet) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        calls = [
            lambda md: stub.GetActionChunk(observation(), metadata=md, timeout=30),
            lambda md: list(stub.StreamActionChunks(iter([observation()]), metadata=md, timeout=30)),
            lambda md: stub.HealthCheck(pb.HealthCheckRequest(), metadata=md, timeout=30),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call(as_robot("nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value
            assert "'nope'" in info.value.details() and "b, c, demo, late" in info.value.details()


def test_least_recently_used_model_is_evicted_with_three_models_and_room_for_two(fleet, serve_harness, models):
    """Room for two: the default, always there, and one more. b, c, b: c evicts b, b evicts c, and b
    pays a second cold start; the default never reloads."""
    with grpc.insecure_channel(fleet) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        replica = stub.HealthCheck(pb.HealthCheckRequest(), timeout=30).replica_id
        loads_of_b = len(replica_log_lines(serve_harness, replica, r"model 'b' loaded in"))
        evictions = len(replica_log_lines(serve_harness, replica, r"evicted"))
        for model in ("b", "c", "b", "demo"):
            response = stub.GetActionChunk(observation(), metadata=as_robot(model), timeout=60)
            assert response.checkpoint_id == checkpoint_id(models[model]) and response.replica_id == replica
    first = 0 if loads_of_b == 0 else 1  # b may be loaded already (by an earlier test): then only c and b load here
    lines = wait_for_log_count(serve_harness, replica, r"model 'b' loaded in", loads_of_b + 2 - first)
    assert len(lines) == loads_of_b + 2 - first, lines
    evicted = wait_for_log_count(serve_harness, replica, r"evicted", evictions + 2)
    assert [re.search(r"model '(\w+)' evicted", line).group(1) for line in evicted[evictions:]] == ["b", "c"]
    assert all("loaded now: demo" in line for line in evicted)  # never the default
    cold = re.search(r"loaded in (\d+) ms \(cold start", lines[-1])
    assert cold and int(cold.group(1)) > 0


def test_a_checkpoint_broken_after_the_deploy_is_failed_precondition_while_the_others_serve(fleet, models):
    (models["late"] / "model.safetensors").write_bytes(b"\x00" * 100)  # deployed fine, broken since
    with grpc.insecure_channel(fleet) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        # A robot on the default keeps its stream through it all.
        feed = [observation(seed=i, request_id=f"d{i}") for i in range(6)]
        gate = threading.Event()

        def default_robot():
            for i, request in enumerate(feed):
                if i == 3:
                    gate.wait(60)
                yield request

        stream = stub.StreamActionChunks(default_robot(), metadata=as_robot("demo"), timeout=120)
        answers = [next(stream) for _ in range(3)]
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetActionChunk(observation(), metadata=as_robot("late"), timeout=60)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
            assert "model 'late' cannot be loaded" in info.value.details()
            assert "model.safetensors" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamActionChunks(iter([observation()]), metadata=as_robot("late"), timeout=60))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        probes = health_pb2_grpc.HealthStub(channel)
        assert probes.Check(health_pb2.HealthCheckRequest(service="late"), timeout=30).status \
            == health_pb2.HealthCheckResponse.NOT_SERVING
        gate.set()
        answers += list(stream)
        assert [a.request_id for a in answers] == [r.request_id for r in feed]
        assert all(a.error_code == 0 and a.checkpoint_id == checkpoint_id(DEMO_CHECKPOINT) for a in answers)
        assert stub.GetActionChunk(observation(), metadata=as_robot("b"), timeout=60).checkpoint_id \
            == checkpoint_id(models["b"])


def metrics_text() -> str:
    import urllib.request

    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    with urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                                timeout=10) as response:
        return response.read().decode()


def series(text: str, name: str) -> list[dict[str, str]]:
    """Label sets of every sample of metric `name` in Prometheus text."""
    out = []
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}}", text, re.M):
        out.append(dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))))
    return out


def wait_for_series(name: str, want: dict[str, str], timeout_s: float = 90.0) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout_s
    found: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        found = series(metrics_text(), name)
        if any(all(labels.get(k) == v for k, v in want.items()) for labels in found):
            return found
        time.sleep(2)
    raise AssertionError(f"no {name} with {want} after {timeout_s:.0f} s; found {found[:20]}")


def test_robot_client_names_its_model_and_itself_on_every_call(fleet, models):
    """PolicyClient with model= and robot_id=, both call modes: its spec and chunks are that model's,
    and the server's per-robot metrics carry its name."""
    for mode in ("stream", "unary"):
        client = PolicyClient(fleet, mode=mode, timeout_s=60, model="c", robot_id=f"fleet-client-{mode}")
        try:
            spec = client.wait_ready(60)
            assert spec.checkpoint_id == checkpoint_id(models["c"])
            for i in range(3):
                chunk = client.infer(pb.ObservationRequest(
                    images=observation(seed=i).images, robot_state=observation(seed=i).robot_state, prompt="reach"))
                assert chunk.checkpoint_id == checkpoint_id(models["c"]) and chunk.actions.shape == (16, 8)
        finally:
            client.close()
    for mode in ("stream", "unary"):
        wait_for_series("ray_robot_policy_requests_total", {"model": "c", "robot": f"fleet-client-{mode}"})
    wait_for_series("ray_robot_policy_request_latency_ms_bucket", {"model": "c", "robot": "fleet-client-stream"})
    wait_for_series("ray_robot_policy_model_load_ms_bucket", {"model": "c"})
    wait_for_series("ray_robot_policy_model_events_total", {"model": "c", "event": "loaded"})
    wait_for_series("ray_robot_policy_model_loaded", {"model": "c"})


def test_robot_client_command_line_sends_model_and_robot_id(fleet, models, tmp_path):
    """`python -m robot_client --model b --robot_id ...` against the app, the replay robot: it runs, and the
    server counts its chunks under model b and its robot id."""
    proc = subprocess.run(
        [sys.executable, "-m", "robot_client", "--server_address", fleet, "--prompt", "reach the red ball",
         "--robot", "replay", "--duration", "3", "--model", "b", "--robot_id", "fleet-cli-robot",
         "--stats_json", str(tmp_path / "stats.json"), "--timeout", "60"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wait_for_series("ray_robot_policy_requests_total", {"model": "b", "robot": "fleet-cli-robot"})
    with grpc.insecure_channel(fleet) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.GetActionChunk(observation(), metadata=as_robot("nope", "fleet-lost-robot"), timeout=30)
    # A robot that names no model that exists is counted, without its made-up name as a label.
    found = wait_for_series("ray_robot_policy_rejected_total", {"code": "NOT_FOUND", "robot": "fleet-lost-robot"})
    assert not any(labels.get("model") == "nope" for labels in found)


def test_a_new_version_under_a_name_moves_robots_at_their_next_stream(fleet, models, tmp_path):
    """b's weights are replaced on disk (written beside, renamed over) while robots stream to it: an open stream
    finishes on the version it opened with, new streams get the new one, and a robot_client that renews its
    stream moves over once and never back."""
    import os

    old = checkpoint_id(models["b"])
    new_policy_dir = variant_checkpoint(tmp_path / "b-v2", seed=31)
    new = checkpoint_id(new_policy_dir)
    new_policy = load_policy(open_checkpoint(new_policy_dir), "cpu")
    with grpc.insecure_channel(fleet) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        assert stub.GetActionChunk(observation(), metadata=as_robot("b"), timeout=60).checkpoint_id == old
        gate = threading.Event()

        def long_robot():
            for i in range(6):
                if i == 2:
                    gate.wait(90)
                yield observation(seed=i, request_id=f"long-{i}")

        long_stream = stub.StreamActionChunks(long_robot(), metadata=as_robot("b", "r-long"), timeout=180)
        answers = [next(long_stream), next(long_stream)]
        client = PolicyClient(fleet, model="b", robot_id="r-renewing", stream_max_age_s=0.5, timeout_s=60)
        seen = []
        try:
            client.wait_ready(60)

            def ask():
                request = observation(seed=len(seen))
                seen.append(client.infer(request).checkpoint_id)

            for _ in range(3):
                ask()
            new_weights = new_policy_dir / "model.safetensors"
            staged = models["b"] / ".model.safetensors.staged"
            staged.write_bytes(new_weights.read_bytes())
            os.replace(staged, models["b"] / "model.safetensors")
            deadline = time.monotonic() + 60
            while (not seen or seen[-1] != new) and time.monotonic() < deadline:
                ask()
                time.sleep(0.2)
            for _ in range(3):
                ask()
        finally:
            client.close()
        switch = seen.index(new)
        assert seen[:switch] == [old] * switch and seen[switch:] == [new] * (len(seen) - switch), seen
        # A fresh call: the new weights, exactly.
        request = observation(seed=5)
        response = stub.GetActionChunk(request, metadata=as_robot("b"), timeout=60)
        assert response.checkpoint_id == new
        np.testing.assert_allclose(chunk_array(response), expected_chunk(new_policy, request), atol=1e-5)
        gate.set()
        answers += list(long_stream)
    assert [a.checkpoint_id for a in answers] == [old] * 6  # opened before the change: old to the end
    assert all(a.error_code == 0 for a in answers)


def test_a_broken_checkpoint_stops_the_deploy_and_names_itself(serve_harness, tmp_path):
    """Through Serve, as `serve deploy` meets it: the app goes DEPLOY_FAILED with the model and the file named."""
    from testbed.serve_rest import DeployFailed

    good = variant_checkpoint(tmp_path / "good", seed=61)
    broken = variant_checkpoint(tmp_path / "broken", seed=62)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    try:
        with pytest.raises(DeployFailed) as info:
            serve_harness.deploy(args={"default_model": "demo",
                                       "checkpoints": {"good": str(good), "broken": str(broken)}}, timeout_s=120)
        assert "model 'broken'" in str(info.value) and "broken/model.safetensors" in str(info.value), info.value
    finally:
        serve_harness.forget()  # the next test deploys afresh
