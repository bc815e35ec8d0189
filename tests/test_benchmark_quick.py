"""The load harness's --quick mode runs end to end against all three servers (no timing asserted)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.serve


def test_quick_benchmark_runs_against_every_server(tmp_path):
    out = tmp_path / "quick.json"
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)], cwd=REPO_ROOT, check=True, timeout=900)
    report = json.loads(out.read_text())
    assert set(report["servers"]) == {"direct", "serve_default", "serve_haproxy"}
    for server, scenarios in report["servers"].items():
        for name, result in scenarios.items():
            assert result["requests"] > 0 and not result["errors"], (server, name, result)
            assert result["latency_ms"]["p50"] > 0 and result["server"]["rss_mib"] > 0
    assert report["servers"]["serve_default"]["closed-stream-2"]["batch_size"]["max"] >= 1
    assert report["model_alone"]["best_samples_per_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert report["environment"]["versions"]["ray"]
