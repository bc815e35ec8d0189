"""Shared fixtures: one real Ray cluster per test session, Serve with gRPC on loopback.

`serve_harness.deploy(...)` deploys the real application (serve_app.app:build_app) with
the given args and options, redeploying only when they differ from what is
running, and returns the loopback address robots connect to.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.cluster_ports import free_port, private_ports_env
from serve_app.ingress import choose_ingress

# Tests run the ingress the README starts: Serve's throughput-optimised one
# (HAProxy). The session cluster and every launcher subprocess inherit it;
# tests/test_standard_proxy.py covers the standard proxy.
choose_ingress()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = REPO_ROOT / "checkpoints" / "demo"
SERVICERS = [
    "policy_wire.robot_inference_pb2_grpc.add_RobotPolicyServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
APP_NAME = "robot_policy"
DEFAULT_USER_CONFIG = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01}


def wait_for_health(address: str, metadata=(), timeout_s: float = 60.0, until=lambda h: True) -> pb.HealthCheckResponse:
    """Poll HealthCheck until it answers and `until(response)` holds (routes reach the proxy asynchronously)."""
    deadline = time.monotonic() + timeout_s
    last = None
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                health = stub.HealthCheck(pb.HealthCheckRequest(), metadata=metadata, timeout=5)
                if health.healthy and until(health):
                    return health
                last = health
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.2)
    raise TimeoutError(f"app at {address} not ready: {last}")


def launcher_env(private_ports: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a test's own `python -m serve_app` cluster, beside the session's."""
    return {**os.environ, **(private_ports or private_ports_env())}


def stop_process_group(proc) -> None:
    """SIGTERM a subprocess started with start_new_session=True, then SIGKILL whatever is left of
    every process group its tree had: Ray workers run in groups of their own, and Serve's HAProxy,
    started by one of them, outlives the cluster (reparented to init, still bound to port 8000)."""
    import signal
    import subprocess

    import psutil

    groups = {proc.pid}
    try:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                groups.add(os.getpgid(child.pid))
            except ProcessLookupError:
                pass
    except psutil.NoSuchProcess:
        pass
    groups.discard(os.getpgid(0))  # never our own
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    time.sleep(1)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def process_tree_cmdlines(pid: int) -> list[str]:
    """Command lines of every live descendant of `pid` (Ray titles its workers, e.g. `ray::ServeReplica:...`)."""
    import psutil

    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            out.append(" ".join(p.cmdline()) or p.name())
        except psutil.NoSuchProcess:  # Ray workers come and go
            pass
    return out


def listening_ports(pid: int) -> set[int]:
    """TCP ports that `pid` and its descendants listen on."""
    import psutil

    ports = set()
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            ports |= {c.laddr.port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return ports


class DeployFailed(RuntimeError):
    pass


class ServeHarness:
    """Deploys the app declaratively, the way `serve run/deploy serve_config.yaml` does.

    Going through the controller's config path (not `serve.run` of a bound app)
    matters: it is what lets a user_config change reach `reconfigure` on the
    running replicas instead of replacing them.
    """

    def __init__(self, grpc_port: int):
        self.address = f"127.0.0.1:{grpc_port}"
        self._current: str | None = None

    def deploy(self, args: dict | None = None, metadata=(), timeout_s: float = 120, **options) -> str:
        args = {"checkpoint": str(DEMO_CHECKPOINT), **(args or {})}
        options.setdefault("user_config", DEFAULT_USER_CONFIG)
        options.setdefault("num_replicas", 1)
        key = json.dumps([args, options], sort_keys=True, default=str)
        if key != self._current:
            self._current = None
            self._apply(args, options, timeout_s)
            self._current = key
        wait_for_health(self.address, metadata=metadata, timeout_s=timeout_s)
        return self.address

    def forget(self) -> None:
        """Force the next deploy() to redeploy (after a test changed the app behind our back)."""
        self._current = None

    @staticmethod
    def _apply(args: dict, options: dict, timeout_s: float) -> None:
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ApplicationStatus, ServeDeploySchema

        config = ServeDeploySchema.parse_obj(
            {
                "applications": [
                    {
                        "name": APP_NAME,
                        "route_prefix": "/",
                        "import_path": "serve_app.app:build_app",
                        "args": args,
                        "deployments": [{"name": "RobotPolicy", **options}],
                    }
                ]
            }
        )
        client = _get_global_client()
        client.deploy_apps(config)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = {s.name: s.app_status for s in client.list_serve_statuses()}.get(APP_NAME)
            if status is not None and status.status == ApplicationStatus.RUNNING:
                return
            if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
                raise DeployFailed(status.message)
            time.sleep(0.2)
        raise TimeoutError(f"app {APP_NAME} not RUNNING after {timeout_s}s")


@pytest.fixture(scope="session")
def serve_harness():
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.config import gRPCOptions

    # Private ports for the session cluster only (the cluster keeps the environment it
    # starts with); launcher tests and benchmarks start their own clusters beside it.
    # (Only those keys are removed again: ray.init adds variables that clients of
    # this cluster, e.g. notebook kernels, need.)
    private_ports = private_ports_env()
    os.environ.update(private_ports)
    try:
        ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        for name in private_ports:
            os.environ.pop(name, None)
    grpc_port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=SERVICERS),
    )
    try:
        yield ServeHarness(grpc_port)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture()
def demo_app(serve_harness) -> str:
    """Address of the demo checkpoint served with default test settings (no auth)."""
    return serve_harness.deploy()


@pytest.fixture()
def stub(demo_app):
    with grpc.insecure_channel(demo_app) as channel:
        yield pb_grpc.RobotPolicyServiceStub(channel)
