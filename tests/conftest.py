"""Shared fixtures: one real Ray cluster per test session, Serve with gRPC on loopback.

`serve_harness.deploy(...)` deploys the real application (serve_app.app:build_app) with
the given args and options, redeploying only when they differ from what is
running, and returns the loopback address robots connect to.
"""

from __future__ import annotations

from testbed.cluster_ports import keep_ray_on_loopback

# Before anything imports Ray: the session cluster, and every cluster a test starts in a
# subprocess (they inherit the environment), binds 127.0.0.1 (tests/test_loopback.py).
keep_ray_on_loopback()

import ipaddress  # noqa: E402
import json
import os
import time
from pathlib import Path

import grpc
import psutil
import pytest

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.ingress import load_config, start_options
from testbed import serve_rest
from testbed.cluster_ports import LOOPBACK_ENV, free_port, private_ports_env

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = REPO_ROOT / "checkpoints" / "demo"
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


def _address(text: str):
    address = ipaddress.ip_address(text)
    return getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1 is 127.0.0.1


def sockets_off_loopback(procs) -> list[str]:
    """Sockets of `procs` bound to, or connected to, an address that is not loopback.

    Listeners on the wildcard address are not counted: the gRPC port is meant for the network,
    and Ray's internal servers bind it too, which sends nothing anywhere."""
    bad = []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in conns:
            local = _address(c.laddr.ip)
            if not (local.is_loopback or local.is_unspecified):
                bad.append(f"{p.name()} bound to {c.laddr.ip}:{c.laddr.port}")
            if c.raddr and not _address(c.raddr.ip).is_loopback:
                bad.append(f"{p.name()} connected to {c.raddr.ip}:{c.raddr.port}")
    return bad


def node_addresses(procs) -> set[str]:
    """The address Ray advertises for its nodes (what other processes connect to), from the OS's view
    of the raylet and GCS command lines."""
    out = set()
    for p in procs:
        try:
            if p.name() in ("raylet", "gcs_server"):
                out |= {a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--node_ip_address=")}
        except psutil.NoSuchProcess:
            pass
    return out


class ServeHarness:
    """Deploys the app declaratively, the way `serve deploy serve_config.yaml` does (Serve's REST API).

    A config, not `serve.run` of a bound app, matters: it is what lets a
    user_config change reach `reconfigure` on the running replicas instead of
    replacing them (testbed/serve_rest.py).
    """

    def __init__(self, grpc_port: int, dashboard: str, session_dir: str):
        self.address = f"127.0.0.1:{grpc_port}"
        self.dashboard = dashboard
        self.logs_dir = Path(session_dir) / "logs"  # every process's log file of the session cluster
        self._current: str | None = None

    def replicas(self) -> dict[str, dict]:
        """The app's RUNNING replicas by replica id, with their pids (Serve's REST API)."""
        return serve_rest.running_replicas(self.dashboard, APP_NAME)

    def deploy(self, args: dict | None = None, metadata=(), timeout_s: float = 120, **options) -> str:
        args = {"checkpoint": str(DEMO_CHECKPOINT), **(args or {})}
        options.setdefault("user_config", DEFAULT_USER_CONFIG)
        options.setdefault("num_replicas", 1)
        key = json.dumps([args, options], sort_keys=True, default=str)
        if key != self._current:
            self._current = None
            app = {"name": APP_NAME, "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": args,
                   "deployments": [{"name": "RobotPolicy", **options}]}
            serve_rest.deploy(self.dashboard, app, timeout_s)  # raises DeployFailed with Serve's message
            self._current = key
        wait_for_health(self.address, metadata=metadata, timeout_s=timeout_s)
        return self.address

    def forget(self) -> None:
        """Force the next deploy() to redeploy (after a test changed the app behind our back)."""
        self._current = None


@pytest.fixture(scope="session")
def serve_harness():
    ray = pytest.importorskip("ray")
    from ray import serve

    # Private ports for the session cluster only (the cluster keeps the environment it
    # starts with); launcher tests and benchmarks start their own clusters beside it.
    # (Only those keys are removed again: ray.init adds variables that clients of
    # this cluster, e.g. notebook kernels, need.)
    private_ports = private_ports_env()
    os.environ.update(private_ports)
    try:
        # The dashboard serves Serve's REST API, which the harness deploys through.
        ray_context = ray.init(num_cpus=8, num_gpus=2, include_dashboard=True, dashboard_port=free_port(),
                               log_to_driver=False, configure_logging=False)
    finally:
        for name in set(private_ports) - set(LOOPBACK_ENV):  # loopback stays, for every later cluster and client
            os.environ.pop(name, None)
    grpc_port = free_port()
    # serve_config.yaml's proxy and controller options (so the ingress the README starts: HAProxy;
    # tests/test_standard_proxy.py covers the standard proxy), on loopback and private ports.
    serve.start(**start_options(load_config(), grpc_port=grpc_port, http_port=free_port(), http_host="127.0.0.1"))
    try:
        yield ServeHarness(grpc_port, ray_context.dashboard_url, ray_context.address_info["session_dir"])
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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny seeded pi05 (scripts/pi05_make_tiny_checkpoint.py), made once; tests that edit it copy it first."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pi05_tiny", REPO_ROOT / "scripts" / "pi05_make_tiny_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny(tmp_path_factory.mktemp("pi05") / "tiny", seed=0)


def variant_checkpoint(directory: Path, seed: int) -> Path:
    """A servable copy of the demo checkpoint with other weights: the demo's, its MLP head moved by seeded
    noise (same spec and normalisation, so the chunks stay finite and in range, but differ)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO_CHECKPOINT / "train_config.json", directory / "train_config.json")
    weights = load_file(str(DEMO_CHECKPOINT / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if name.startswith("head.") and name.endswith(".weight"):
            weights[name] = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
    save_file(weights, str(directory / "model.safetensors"))
    return directory
