"""Serve's REST API on a cluster's dashboard: deploy an application's config as `serve deploy` does, read what runs.

    deploy(dashboard, app)        # one entry of serve_config.yaml's `applications`; waits for RUNNING
    serve_details(dashboard)      # GET /api/serve/applications/: apps, deployed configs, replicas
    running_replicas(dashboard, app)  # {replica_id: {"pid", "actor_name", "state", ...}} of one app

`dashboard` is the address `ray.init()` returns as `.dashboard_url` (the
cluster must run its dashboard). Deploying a config, not `serve.run` of a
bound application, is what keeps a `user_config` change live: Serve then
calls `reconfigure` on the running replicas, whereas every `serve.run` gives
the deployment a new code version and replaces them. It is also the path an
operator's `serve deploy serve_config.yaml` takes.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

APPLICATIONS = "/api/serve/applications/"


class DeployFailed(RuntimeError):
    """Serve refused the config, or the application went DEPLOY_FAILED: Serve's own message."""


def token() -> str | None:
    """The cluster's token where Ray looks for it (what `ray get-auth-token` prints); None with auth off."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.exists() else None


def call(dashboard: str, method: str = "GET", body: dict | None = None, timeout_s: float = 60.0) -> dict | None:
    """One call to Serve's REST API, retried while the dashboard is still starting."""
    url = (dashboard if "://" in dashboard else f"http://{dashboard}").rstrip("/") + APPLICATIONS
    headers = {"Content-Type": "application/json"}
    if (secret := token()) is not None:
        headers["Authorization"] = f"Bearer {secret}"
    data = json.dumps(body).encode() if body is not None else None
    deadline = time.monotonic() + timeout_s
    while True:
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                text = reply.read()
            return json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            if err.code not in (502, 503, 504) or time.monotonic() > deadline:
                raise RuntimeError(f"{method} {url}: HTTP {err.code}: {err.read().decode(errors='replace')}") from None
        except urllib.error.URLError:  # connection refused: the dashboard is not listening yet
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def serve_details(dashboard: str) -> dict:
    """What Serve runs: per application its status, `deployed_app_config` and deployments with their replicas."""
    return call(dashboard)


def running_replicas(dashboard: str, app: str) -> dict[str, dict]:
    """The RUNNING replicas of one application, by replica id, with their pid and actor name (tests kill
    replicas by pid to stage a crash)."""
    deployments = (serve_details(dashboard)["applications"].get(app) or {}).get("deployments", {})
    return {r["replica_id"]: r for d in deployments.values() for r in d["replicas"] if r["state"] == "RUNNING"}


def deploy(dashboard: str, app: dict, timeout_s: float = 120.0) -> None:
    """Apply one application's config (`serve deploy` of a file holding only it) and wait until it is RUNNING."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    try:
        call(dashboard, "PUT", {"applications": [app]}, timeout_s=timeout_s)
    except RuntimeError as err:  # Serve refused the config (HTTP 400: what it found wrong)
        raise DeployFailed(str(err)) from None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app["name"])
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise DeployFailed(status.message)
        time.sleep(0.2)
    raise TimeoutError(f"app {app['name']} not RUNNING after {timeout_s} s")
