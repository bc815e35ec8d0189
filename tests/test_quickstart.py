"""The README's first command, exactly: `.venv/bin/serve run serve_config.yaml`, no variables set by hand.

One `serve run` for the module (it takes Serve's machine-wide default ports:
50051, 8000, 8265, as a user's would). What is checked is what a new user and
a robot on the network meet: the HAProxy ingress, the gRPC port on every
interface, message limits, a body that does not parse, a start-up log a person
can read, the dashboard in a real browser, and Ray itself on loopback.

The one variable the test adds, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
(testbed.cluster_ports.LOOPBACK_ENV), keeps Ray's own processes on
127.0.0.1 (tests send nothing to another address); it does not change the app.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import grpc
import psutil
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.ingress import MB, load_config, max_message_bytes
from testbed.cluster_ports import LOOPBACK_ENV
from tests.conftest import REPO_ROOT, node_addresses, process_tree_cmdlines, sockets_off_loopback, stop_process_group, wait_for_health
from tests.opentau_wire import LegacyStub, legacy
from tests.payloads import chunk_array, observation

pytestmark = pytest.mark.serve
GRPC_PORT = load_config()["grpc_options"]["port"]
ADDRESS = f"127.0.0.1:{GRPC_PORT}"
DASHBOARD = "http://127.0.0.1:8265"


def readme_serve_command() -> str:
    """The first command of the README's quick start, after `bash scripts/setup.sh && `."""
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S).group(1)
    first = block.strip().splitlines()[0].split("#")[0].strip()
    setup, _, serve = first.partition(" && ")
    assert setup == "bash scripts/setup.sh", first
    return serve


def ray_pids(root: int) -> list[psutil.Process]:
    """`serve run` and every process of the cluster it started (Ray workers, raylet, GCS, HAProxy)."""
    procs = [psutil.Process(root)]
    procs += psutil.Process(root).children(recursive=True)
    # HAProxy is started by a Ray worker and reparented: find it by its config under Serve's temp dir.
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "haproxy" and p not in procs:
            procs.append(p)
    return procs


def serve_run_env() -> dict[str, str]:
    """A shell's environment: none of the RAY_* variables this test session's own cluster uses (RAY_ADDRESS
    would make `serve run` join it), plus the loopback variable."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **LOOPBACK_ENV}


class PollingRobot(threading.Thread):
    """What the README suggests while the app starts: HealthCheck every 0.2 s until it answers."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.answered_after: float | None = None

    def run(self):
        started = time.monotonic()
        with grpc.insecure_channel(ADDRESS) as channel:
            stub = pb_grpc.RobotPolicyServiceStub(channel)
            while not self.stop.is_set():
                try:
                    if stub.HealthCheck(pb.HealthCheckRequest(), timeout=2).healthy:
                        self.answered_after = time.monotonic() - started
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    for port in (GRPC_PORT, 8265):
        busy = [c for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_LISTEN]
        if busy:
            pytest.fail(f"port {port} is in use on this machine (a `serve run` left running?); this test runs the README's "
                        "command, which takes Serve's default ports")
    log_path = tmp_path_factory.mktemp("quickstart") / "serve_run.log"
    argv = readme_serve_command().split()
    assert argv == [".venv/bin/serve", "run", "serve_config.yaml"], argv
    env = serve_run_env()
    poller = PollingRobot()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    poller.start()
    try:
        wait_for_health(ADDRESS, timeout_s=240)
        poller.join(timeout=30)
        yield proc, log_path, poller
    finally:
        poller.stop.set()
        stop_process_group(proc)


def test_readme_command_serves_through_haproxy_on_every_interface(quickstart):
    proc, _, _ = quickstart
    tree = process_tree_cmdlines(proc.pid)
    assert any("ServeReplica:robot_policy:RobotPolicy" in n for n in tree), tree
    assert not any("ProxyActor" in n and "fallback" in n for n in tree)
    haproxy = [p for p in ray_pids(proc.pid) if p.name() == "haproxy"]
    assert haproxy, "no HAProxy process: serve_config.yaml's controller_options did not select the HAProxy ingress"
    listeners = {(c.laddr.ip, c.laddr.port) for p in haproxy for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    # Robots on the network reach the gRPC port: HAProxy listens on every interface (read from the OS, no traffic sent).
    assert ("0.0.0.0", GRPC_PORT) in listeners, listeners
    with grpc.insecure_channel(ADDRESS) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        health = stub.HealthCheck(pb.HealthCheckRequest(), timeout=10)
        assert health.healthy and health.policy_type == "visuomotor_chunk"
        chunk = chunk_array(stub.GetActionChunk(observation(request_id="q1"), timeout=30))
        assert chunk.shape == (health.chunk_length, health.action_dim)
        # An OpenTau-era robot, unchanged.
        legacy_stub = LegacyStub(channel)
        request = legacy["ObservationRequest"].FromString(observation(request_id="legacy").SerializeToString())
        assert len(legacy_stub.GetActionChunk(request, timeout=30).action_chunk) == health.chunk_length


def test_http_port_points_to_grpc(quickstart):
    """Behind HAProxy the HTTP port shares the gRPC port's host; it answers 404 and where to go, not a 500."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{load_config()['http_options']['port']}/", timeout=10)
    assert info.value.code == 404 and "gRPC" in info.value.read().decode()


def test_oversized_request_gets_resource_exhausted_and_the_server_keeps_serving(quickstart):
    limit = max_message_bytes(load_config())
    assert limit == 100 * MB  # OpenTau's default
    big = observation(request_id="big")
    big.images[0].image_data = b"\xff" * (limit + MB)
    with grpc.insecure_channel(ADDRESS, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetActionChunk(big, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
        assert stub.GetActionChunk(observation(request_id="after"), timeout=30).request_id == "after"


def test_body_that_does_not_parse_gets_invalid_argument(quickstart):
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length that runs past the end
    with grpc.insecure_channel(ADDRESS) as channel:
        raw = channel.unary_unary("/robot_inference.RobotPolicyService/GetActionChunk",
                                  request_serializer=lambda b: b, response_deserializer=pb.ActionChunkResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            raw(garbage, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid robot_inference.ObservationRequest (6 bytes)" in info.value.details()
        # In a stream: answered in-band, and the stream goes on.
        stream = channel.stream_stream("/robot_inference.RobotPolicyService/StreamActionChunks",
                                       request_serializer=lambda b: b, response_deserializer=pb.ActionChunkResponse.FromString)
        answers = list(stream(iter([garbage, observation(request_id="ok").SerializeToString()]), timeout=30))
        assert answers[0].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert answers[1].request_id == "ok" and not answers[1].error_code


def test_start_up_log_says_what_a_person_needs(quickstart):
    proc, log_path, poller = quickstart
    assert poller.answered_after is not None, "the polling robot never got an answer"
    time.sleep(2)  # let the last replica lines reach the driver
    log = log_path.read_text()
    ready = ("ready: robots connect to the serve config's grpc_options.port on http_options.host "
             "through HAProxy ingress")
    for line in ("checkpoint loaded: visuomotor_chunk", "warm-up forward passes done", ready, "ray get-auth-token"):
        assert line in log, f"start-up log lacks {line!r}:\n{log[-4000:]}"
    # A robot polled HealthCheck throughout start-up (as the README suggests): nothing alarming came of it.
    for scary in ("Traceback", "Task exception was never retrieved", "RequestCancelledError"):
        assert scary not in log, f"start-up log has {scary!r}:\n{log[-6000:]}"


def test_ray_stays_on_loopback(quickstart):
    proc, _, _ = quickstart
    bad = sockets_off_loopback(ray_pids(proc.pid))
    assert not bad, bad
    assert node_addresses(ray_pids(proc.pid)) == {"127.0.0.1"}


def dashboard_token() -> str:
    """What the README tells a newcomer to run."""
    out = subprocess.run([".venv/bin/ray", "get-auth-token"], cwd=REPO_ROOT, env=serve_run_env(), capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_dashboard_shows_the_replicas_healthy_in_a_browser(quickstart, tmp_path):
    from tests.dashboard_browser import chromium_path, serve_page

    if chromium_path() is None:
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
    token = dashboard_token()
    screenshot = tmp_path / "dashboard_serve.png"
    text = serve_page(DASHBOARD, token, screenshot)
    print(f"dashboard screenshot: {screenshot}")
    # The Serve page's rows, as the browser renders them: application RUNNING, deployment HEALTHY
    # with its replica count (serve_config.yaml starts at min_replicas).
    assert re.search(r"robot_policy\s+RUNNING", text), text[:3000]
    row = re.search(r"RobotPolicy\s+HEALTHY\s+-\s+(\d+)\s", text)
    assert row, text[:3000]
    minimum = load_config()["applications"][0]["deployments"][0]["autoscaling_config"]["min_replicas"]
    assert int(row.group(1)) >= minimum
    assert screenshot.stat().st_size > 10_000
