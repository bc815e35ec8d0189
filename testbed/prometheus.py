"""A real Prometheus (Debian's `prometheus` package) on loopback, scraping one Ray cluster through
deploy/prometheus/prometheus.yml, for tests and benchmarks.

The config is the deploy one with only what a cluster sharing this machine must change: the scrape
and service discovery refresh intervals (seconds, not tens of seconds) and the path of Ray's
service discovery file (the cluster's own temp dir, not /tmp/ray, which every cluster here shares).
Prometheus itself listens on 127.0.0.1 with a storage dir of its own.

    ray_metrics_env(tmp)   -> the variables a cluster is started with (its own temp dir, Ray
                              reporting metrics every second)
    with Prometheus.scraping(sd_file, work) as prom: prom.query(expr)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

from testbed.cluster_ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "robot_fleet.json"
SD_FILE_NAME = "prom_metrics_service_discovery.json"  # ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if os.access(p, os.X_OK)), None)


def ray_metrics_env(tmp_root: Path, report_interval_ms: int = 1000) -> dict[str, str]:
    """For a cluster whose metrics a test reads within seconds: its own temp dir (RAY_TMPDIR=X makes
    Ray's X/ray, so its service discovery file is X/ray/prom_metrics_service_discovery.json, as
    /tmp/ray/... is for a default cluster) and metrics pushed to the node's agent every second
    instead of every 10 s (Ray floors it at 1 s)."""
    return {"RAY_TMPDIR": str(tmp_root), "RAY_metrics_report_interval_ms": str(report_interval_ms)}


def service_discovery_file(tmp_root: Path) -> Path:
    return Path(tmp_root) / "ray" / SD_FILE_NAME


def wait_for_targets(sd_file: Path, timeout_s: float = 60.0) -> list[str]:
    """The metrics endpoints Ray lists once its dashboard wrote the file (every 5 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            targets = [t for group in json.loads(sd_file.read_text()) for t in group["targets"]]
            if targets:
                return targets
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray wrote no metrics targets to {sd_file} in {timeout_s:.0f}s "
                               "(is its dashboard running?)")
        time.sleep(0.5)


def local_config(sd_file: Path, out: Path, scrape_interval_s: float = 1.0) -> Path:
    """deploy/prometheus/prometheus.yml, adapted for a test cluster (see the module docstring)."""
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    interval = f"{int(scrape_interval_s * 1000)}ms"
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ray"]
    (sd,) = job["file_sd_configs"]
    sd.update(files=[str(sd_file)], refresh_interval="2s")
    out.write_text(yaml.safe_dump(config))
    return out


class Prometheus:
    def __init__(self, config: Path, storage: Path, port: int | None = None):
        self.config, self.storage, self.port = config, storage, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = storage.parent / "prometheus.log"

    @classmethod
    @contextmanager
    def scraping(cls, sd_file: Path, work: Path, scrape_interval_s: float = 1.0):
        """A Prometheus for the cluster that writes `sd_file`, stopped on the way out whatever happens."""
        work.mkdir(parents=True, exist_ok=True)
        prom = cls(local_config(sd_file, work / "prometheus.yml", scrape_interval_s), work / "data")
        try:
            prom.start()
            yield prom
        finally:
            prom.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError("no prometheus binary (apt-get install prometheus; .ci/run installs it)")
        self.storage.mkdir(parents=True, exist_ok=True)
        argv = [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.storage}",
                f"--web.listen-address=127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(argv, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"prometheus not ready in {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query: [{"metric": {labels}, "value": [t, "v"]}, ...] (a table target's rows too)."""
        return self._get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict]:
        """[{"metric": {labels}, "values": [[t, "v"], ...]}, ...]"""
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step_s)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})

    def variable_values(self, query: str) -> list[str]:
        """What a Grafana variable `label_values(<series selector>, <label>)` lists."""
        found = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query)
        if found is None:
            raise ValueError(f"not a label_values(selector, label) query: {query!r}")
        return self.label_values(found.group(2), found.group(1))

    def targets_up(self) -> list[dict]:
        return [t for t in self._get("/api/v1/targets")["activeTargets"] if t["health"] == "up"]


def finite(result: list[dict]) -> list[dict]:
    """The series of an instant query whose value is a number (histogram_quantile of no traffic is NaN)."""
    return [s for s in result if math.isfinite(float(s["value"][1]))]


def dashboard_query(title: str, values: dict[str, str], dashboard: dict | None = None) -> str:
    """The one expr of the panel called `title`, variables replaced."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    (expr,) = [expr for panel, _, expr in dashboard_queries(dashboard, values) if panel == title]
    return expr


def dashboard_queries(dashboard: dict, values: dict[str, str]) -> list[tuple[str, str, str]]:
    """(panel title, legendFormat, expr with template variables replaced by `values`) for every
    target of every panel, rows' nested panels included."""
    out = []

    def walk(panels):
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name in sorted(values, key=len, reverse=True):  # $__rate_interval before $__rate
                    expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
                out.append((panel["title"], target.get("legendFormat", ""), expr))

    walk(dashboard["panels"])
    return out
