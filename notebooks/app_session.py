"""The app a notebook talks to: a running one, or one started in this kernel.

    session = connect_or_start()      # ROBOT_POLICY_ADDRESS, else 127.0.0.1:50051, else start one here
    session.address                   # "HOST:PORT" for robot_client.PolicyClient
    session.ray_address               # the Ray cluster behind it, for Serve's API
    connect_ray(session)              # join it: serve.status(), and the dashboard's Serve REST API
    session.deployed_app()            # the application's config as Serve holds it
    session.deploy(app)               # apply a changed config, as `serve deploy` does
    session.stop()                    # only stops what this kernel started

Starting here deploys serve_config.yaml's application the way `serve deploy`
does (its config, through Serve's REST API, so a user_config change reaches
`reconfigure` on the running replicas), with the checkpoint made absolute
and the gRPC port chosen free. Importing this module puts the repository
root on sys.path, for the packages that are not installed (testbed).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from testbed import serve_rest
from testbed.cluster_ports import free_port, keep_ray_on_loopback, private_ports_env

ADDRESS_ENV = "ROBOT_POLICY_ADDRESS"  # where the app is (tests set it to their loopback app)
DEFAULT_ADDRESS = "127.0.0.1:50051"  # `serve run serve_config.yaml`
APP_NAME = "robot_policy"


@dataclass
class AppSession:
    address: str
    started_here: bool
    ray_address: str | None
    dashboard: str | None = None  # the cluster's dashboard (Serve's REST API), once connected

    def serve_details(self) -> dict:
        """What Serve runs: applications, their deployed configs, deployments and replicas."""
        return serve_rest.serve_details(self._rest_api())

    def deployed_app(self, name: str = APP_NAME) -> dict:
        """The application's config as Serve holds it (what `serve run`/`serve deploy` sent)."""
        return dict(self.serve_details()["applications"][name]["deployed_app_config"])

    def deploy(self, app: dict, timeout_s: float = 120.0) -> None:
        """Apply one application's config, as `serve deploy` does, and wait for RUNNING."""
        serve_rest.deploy(self._rest_api(), app, timeout_s)

    def _rest_api(self) -> str:
        if not self.dashboard:
            raise RuntimeError("no dashboard known for this cluster: connect_ray(session) first (the cluster "
                               "must run Ray's dashboard: Serve's REST API lives there)")
        return self.dashboard

    def stop(self) -> None:
        if self.started_here:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()


def answers(address: str, timeout_s: float = 2.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            pb_grpc.RobotPolicyServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), timeout=timeout_s)
        return True
    except grpc.RpcError:
        return False


def connect_or_start(address: str | None = None, start_timeout_s: float = 180.0) -> AppSession:
    address = address or os.environ.get(ADDRESS_ENV)
    if address:
        if not answers(address, timeout_s=10.0):
            raise RuntimeError(f"no policy server answers at {address} (from {ADDRESS_ENV} or the argument)")
        return AppSession(address, False, os.environ.get("RAY_ADDRESS") or "auto")
    if answers(DEFAULT_ADDRESS):
        return AppSession(DEFAULT_ADDRESS, False, os.environ.get("RAY_ADDRESS") or "auto")
    return start_here(start_timeout_s)


def start_here(timeout_s: float = 180.0) -> AppSession:
    """serve_config.yaml's app in a Ray instance owned by this kernel, on a free loopback port,
    behind the same throughput-optimised ingress as the README's `serve run`."""
    from serve_app.ingress import load_config, start_options

    # A kernel's cluster may sit beside `serve run`'s on this machine: keep it on loopback, off Serve's shared ports.
    keep_ray_on_loopback()
    os.environ.update(private_ports_env())
    import ray
    from ray import serve

    config = load_config()
    context = ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_port(), log_to_driver=False,
                       configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    port = free_port()
    # serve_config.yaml's ingress (HAProxy, from its controller_options), on loopback.
    serve.start(**start_options(config, grpc_port=port, http_port=free_port(), http_host="127.0.0.1"))
    app = config["applications"][0]
    app["args"]["checkpoint"] = str((REPO_ROOT / app["args"]["checkpoint"]).resolve())
    session = AppSession(f"127.0.0.1:{port}", True, ray.get_runtime_context().gcs_address, context.dashboard_url)
    session.deploy(app, timeout_s)
    deadline = time.monotonic() + timeout_s
    while not answers(session.address):
        if time.monotonic() > deadline:
            raise TimeoutError(f"app started but {session.address} does not answer")
        time.sleep(0.5)
    return session


def connect_ray(session: AppSession) -> None:
    """Join the Ray cluster behind the app (for Serve's API and the metrics endpoint)."""
    import ray

    if not ray.is_initialized():
        context = ray.init(address=session.ray_address, log_to_driver=False, configure_logging=False)
        session.dashboard = context.dashboard_url


def metrics_text() -> str:
    """Prometheus text from this node's Ray metrics endpoint."""
    import urllib.request

    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
