"""Start and stop the servers under test as process trees, and measure what they use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import yaml

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.ingress import load_config
from testbed.cluster_ports import private_ports_env

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = REPO_ROOT / "checkpoints" / "demo"



@dataclass
class ServerUnderTest:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, log_dir: Path, ready_timeout_s: float = 180) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, env={**os.environ, **self.env}, stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + ready_timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.RobotPolicyServiceStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.stop()  # its cluster may outlive the launcher
                    raise RuntimeError(f"{self.name} exited early; the end of {self.log_path}:\n{self.log_tail()}")
                try:
                    if stub.HealthCheck(pb.HealthCheckRequest(), timeout=2).healthy:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} not healthy after {ready_timeout_s}s; the end of {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The server's last words, for an error that CI prints after the log is gone."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def replica_processes(self) -> list[psutil.Process]:
        """The Serve replica actors of this server (Ray titles their processes `ray::ServeReplica:...`), by pid."""
        found = []
        for p in self.processes():
            try:
                if "ServeReplica" in p.name() or "ServeReplica" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:  # processes come and go
                pass
        if not found:
            raise RuntimeError(f"{self.name}: no ServeReplica process found")
        return sorted(found, key=lambda p: p.pid)

    def replica_process(self) -> psutil.Process:
        return self.replica_processes()[0]

    def stop(self) -> None:
        if self.proc is None:
            return
        tree = self.processes()
        groups = {self.proc.pid}  # Ray workers run in groups of their own; HAProxy inherits its starter's
        for p in tree:
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgid(0))
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            _, alive = psutil.wait_procs(tree, timeout=wait)
            if not alive:
                break
        for p in tree:  # Ray daemons may have left the process group
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        time.sleep(1)
        for group in groups:  # HAProxy may respawn itself (reparented, same group) while Serve shuts down
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None


class ResourceMeter:
    """CPU seconds and peak RSS of a process tree over a window."""

    def __init__(self, server: ServerUnderTest):
        self.server = server
        self._cpu0 = self._cpu()
        self._t0 = time.perf_counter()

    def _cpu(self) -> dict[int, float]:
        out = {}
        for p in self.server.processes():
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
        return out

    def read(self) -> dict:
        cpu1 = self._cpu()
        wall = time.perf_counter() - self._t0
        used = sum(v - self._cpu0.get(pid, 0.0) for pid, v in cpu1.items())
        rss = 0
        for p in self.server.processes():
            try:
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return {"cpu_cores": round(used / wall, 2), "rss_mib": round(rss / 2**20, 1)}


def serve_config(port: int, http_port: int, user_config: dict, out: Path, extra_args: dict | None = None,
                 deployment: dict | None = None, checkpoint: Path = DEMO_CHECKPOINT) -> Path:
    config = load_config()
    config["grpc_options"]["port"] = port
    config["http_options"].update(host="127.0.0.1", port=http_port)  # loopback only (both ingresses)
    app = config["applications"][0]
    app["args"]["checkpoint"] = str(checkpoint)
    app["args"].update(extra_args or {})
    app["deployments"][0]["user_config"] = user_config
    # A fixed replica count, so servers compare like for like (serve_config.yaml autoscales 1..2:
    # 2 is what it runs under load; benchmarks/autoscaling.py measures the scaling itself).
    app["deployments"][0].pop("autoscaling_config", None)
    app["deployments"][0].update({"num_replicas": 2, **(deployment or {})})
    out.write_text(yaml.safe_dump(config))
    return out


def ray_serve(name: str, port: int, http_port: int, user_config: dict, work: Path, standard_proxy: bool = False,
              deployment: dict | None = None, checkpoint: Path = DEMO_CHECKPOINT,
              extra_args: dict | None = None, dashboard: bool = False, env: dict | None = None) -> ServerUnderTest:
    """Our app from serve_config.yaml, started like the README's `serve run` but without the dashboard
    (the launcher does the same deploy; the dashboard would only add noise and port clashes).
    The ingress is Serve's throughput-optimised one unless `standard_proxy`; `deployment`
    overrides keys of the deployment's config (e.g. num_replicas), `extra_args` adds application
    args (e.g. torch_threads). `dashboard`: start Ray's dashboard too, which is what writes the
    Prometheus service discovery file (testbed/prometheus.py); `env` adds variables for the cluster."""
    config = serve_config(port, http_port, user_config, work / f"{name}.yaml", extra_args, deployment, checkpoint)
    argv = [sys.executable, "-m", "serve_app", f"--config_path={checkpoint}", f"--server.port={port}",
            f"--serve_config={config}", "--address=local"] + ([] if dashboard else ["--no_dashboard"])
    # Its own ports (testbed.cluster_ports): the servers of one run are up together.
    return ServerUnderTest(name, argv + (["--standard_proxy"] if standard_proxy else []), port,
                           env={**private_ports_env(), **(env or {})})


def direct(port: int, checkpoint: Path, torch_threads: int = 1) -> ServerUnderTest:
    argv = [sys.executable, "-m", "benchmarks.direct_server", "--checkpoint", str(checkpoint), "--port", str(port),
            "--torch_threads", str(torch_threads)]
    return ServerUnderTest("direct", argv, port)
