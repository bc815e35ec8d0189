"""The Grafana dashboard in deploy/ against a real Prometheus scraping a real cluster serving two models.

    robots (robot_id r-*, model demo or b) -> the app (HAProxy ingress, one replica, two models)
    Ray's dashboard -> prom_metrics_service_discovery.json -> Prometheus (deploy/prometheus/prometheus.yml,
    adapted by testbed/prometheus.py) -> every `expr` of deploy/grafana/robot_fleet.json

The cluster is this module's own, not the session's: Ray reads its metrics report interval when a
cluster starts, and the default 10 s would make this test wait minutes for two points per series.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from benchmarks.servers import ray_serve
from policy_wire import robot_inference_pb2 as pb
from robot_client.policy_client import PolicyClient, PolicyError
from testbed.cluster_ports import free_port
from testbed.prometheus import (
    DASHBOARD, Prometheus, dashboard_queries, dashboard_query, finite, prometheus_binary, ray_metrics_env,
    service_discovery_file, wait_for_targets,
)
from tests.conftest import variant_checkpoint
from tests.payloads import observation

pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(prometheus_binary() is None,
                       reason="needs Prometheus on PATH (Debian/Ubuntu: apt-get install -y prometheus; .ci/run does)"),
]

MODELS = ("demo", "b")
ROBOTS = {"r-demo-1": "demo", "r-demo-2": "demo", "r-b-1": "b", "r-b-2": "b"}
LOST_ROBOT = "r-lost"  # names a model the app does not have: NOT_FOUND
# Grafana's variables as its "All" option sends them (allValue .*), and a rate window of a few scrapes.
ALL = {"model": ".*", "robot": ".*", "__rate_interval": "10s"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The app on its own cluster (own temp dir, so its own service discovery file), stopped however the
    module ends."""
    # A short root: Ray puts unix sockets under it, and their paths must stay under 108 bytes.
    tmp_root = Path(tempfile.mkdtemp(prefix="rpprom-", dir="/tmp"))
    work = tmp_path_factory.mktemp("fleet-prometheus")
    b = variant_checkpoint(work / "b", seed=21)
    server = ray_serve(
        "fleet_prometheus", free_port(), free_port(), {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}, work,
        deployment={"num_replicas": 1}, dashboard=True, env=ray_metrics_env(tmp_root),
        extra_args={"default_model": "demo", "checkpoints": {"b": str(b)}, "api_key_env": None},
    )
    try:
        server.start(work)
        yield server, service_discovery_file(tmp_root), work
    finally:
        server.stop()
        shutil.rmtree(tmp_root, ignore_errors=True)


class Robots:
    """One thread per robot: a chunk every ~50 ms from its model, and every tenth call an observation
    with a corrupt camera frame (INVALID_ARGUMENT), so every robot has rejections too."""

    def __init__(self, address: str):
        self.address, self.stop = address, threading.Event()
        self.answered = {robot: 0 for robot in ROBOTS}
        self.refused: dict[str, set[str]] = {robot: set() for robot in [*ROBOTS, LOST_ROBOT]}
        self.failures: list[str] = []
        self._threads = [threading.Thread(target=self._drive, args=(robot, model), daemon=True)
                         for robot, model in [*ROBOTS.items(), (LOST_ROBOT, "no-such-model")]]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def _drive(self, robot: str, model: str) -> None:
        client = PolicyClient(self.address, model=model, robot_id=robot, timeout_s=10)
        try:
            for i in range(10**9):
                if self.stop.is_set():
                    return
                request = observation(seed=i % 7, request_id=f"{robot}-{i}")
                if i % 10 == 5:
                    request.images[0].image_data = b"\xff\xd8 not a jpeg"
                try:
                    client.infer(request)
                    self.answered[robot] += 1
                except PolicyError as err:
                    self.refused[robot].add(type(err).__name__)
                    time.sleep(client.retry_delay() if err.transient else 0)
                self.stop.wait(0.05)
        except Exception as exc:  # noqa: BLE001 - reported by the test, with the robot
            self.failures.append(f"{robot}: {type(exc).__name__}: {exc}")
        finally:
            client.close()


def labels(result: list[dict], key: str) -> set[str]:
    return {s["metric"].get(key, "") for s in result}


def what_is_missing(legend: str, result: list[dict]) -> str | None:
    """What a panel target must show, read off its legend: a series per model for `{{model}}`, per robot
    for `{{robot}}` (each with its own model), both refusals for `{{code}}`; numbers, not NaN."""
    if not result:
        return "no series"
    if len(finite(result)) < len(result):
        return f"NaN values: {[s['metric'] for s in result if s not in finite(result)]}"
    if "{{model}}" in legend and not set(MODELS) <= labels(result, "model"):
        return f"models {sorted(labels(result, 'model'))}, want {MODELS}"
    if "{{robot}}" in legend:
        pairs = {(s["metric"].get("robot"), s["metric"].get("model")) for s in result}
        if not set(ROBOTS.items()) <= pairs:
            return f"(robot, model) {sorted(pairs, key=str)}, want {sorted(ROBOTS.items())}"
    if "{{code}}" in legend and not {"INVALID_ARGUMENT", "NOT_FOUND"} <= labels(result, "code"):
        return f"codes {sorted(labels(result, 'code'))}"
    if "{{event}}" in legend and "loaded" not in labels(result, "event"):
        return f"events {sorted(labels(result, 'event'))}"
    return None


def test_every_dashboard_query_returns_data_per_model_and_per_robot(cluster):
    server, sd_file, work = cluster
    targets = wait_for_targets(sd_file)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard, ALL)
    assert len(queries) >= 10, queries
    with Prometheus.scraping(sd_file, work / "prometheus") as prom, Robots(server.address) as robots:
        # Ray's agent gets fresh values every second; a query passes once its window holds the robots'
        # traffic. Poll, and report what is still missing if it never does.
        deadline = time.monotonic() + 75
        while True:
            missing = {f"{title} [{legend}]: {expr}": why for title, legend, expr in queries
                       if (why := what_is_missing(legend, prom.query(expr)))}
            if not missing or time.monotonic() > deadline or robots.failures:
                break
            time.sleep(2)
        up = {t["labels"]["instance"] for t in prom.targets_up()}
        only_b = prom.query(dashboard_query("Chunks/s by model", {**ALL, "model": "b"}, dashboard))
        variables = {v["name"]: v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"}
        model_values = prom.variable_values(variables["model"])
        robot_values = prom.variable_values(variables["robot"].replace("$model", ALL["model"]))
        loaded = prom.query(dashboard_query("Models loaded per replica", ALL, dashboard))
    assert not robots.failures, robots.failures
    assert not missing, "dashboard queries without the data they should show:\n" + "\n".join(
        f"  {query}\n    -> {why}" for query, why in missing.items())
    # Prometheus scraped what Ray's service discovery file lists (the app's replica is behind one of them).
    assert set(targets) <= up, (targets, up)
    # The $model variable filters: only b's series when b is picked.
    assert labels(only_b, "model") == {"b"}, only_b
    # The variables' own queries list both models and every robot.
    assert set(MODELS) <= set(model_values), model_values
    assert set(ROBOTS) <= set(robot_values), robot_values
    # Every robot got chunks and the refusals it provoked; the lost one only refusals.
    assert all(robots.answered[r] > 0 for r in ROBOTS), robots.answered
    assert all(robots.refused[r] for r in ROBOTS), robots.refused
    assert robots.refused[LOST_ROBOT] and LOST_ROBOT not in robots.answered, robots.refused
    # One replica holds both models: "models loaded per replica" says 2.
    assert [float(s["value"][1]) for s in loaded] == [2.0], loaded
