"""benchmarks/pi05_gpu.py, the GPU benchmark, run the CPU way: tiny, in seconds, with no server packages.

The full-size run needs a GPU (see the script); here it is the same code at
the test architecture's size, in a subprocess where importing Ray, gRPC,
Pillow or simplejpeg fails, so the benchmark is proven to need none of them.
No timing is asserted: only that every number is there and sane.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("ray", "grpc", "PIL", "simplejpeg")
BATCH_SIZES = {"1", "2", "4", "8", "16", "32"}


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = (
        "import runpy, sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError\n"
        f"sys.argv = ['pi05_gpu', *{list(args)!r}]\n"
        "runpy.run_module('benchmarks.pi05_gpu', run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_reduced_cpu_run_reports_every_batch_size_without_server_packages(tmp_path):
    out = tmp_path / "pi05_gpu.json"
    done = _run("--device", "cpu", "--reduced", "--out", str(out), "--seconds-per-batch", "0",
                "--workdir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())

    assert set(report["batches"]) == BATCH_SIZES
    for b, row in report["batches"].items():
        assert 0 < row["p50_ms"] <= row["p99_ms"], b
        assert row["chunks_per_s"] > 0 and row["iterations"] >= 3 and row["finite"], b
        assert row["chunk_shape"][:2] == [int(b), 50], b
        assert row["peak_gpu_bytes"] is None  # on the CPU
    assert report["workload"] == {**report["workload"], "cameras": 2, "chunk": 50, "flow_steps": 10}

    load = report["load"]
    assert load["seconds"] > 0 and load["model_bytes"] > 0 and load["vmhwm_growth_bytes"] >= 0
    assert report["parameters"] > 0

    targets = report["targets"]
    assert targets["applies"] is False  # a reduced CPU run says so instead of claiming a pass
    assert {"batch1_p50_pass", "throughput_pass", "pass"} <= targets.keys()
    assert str(targets["best_batch"]) in BATCH_SIZES

    parity = report["parity"]
    assert 0 <= parity["relative_l2"] < 0.1, parity  # bf16 close to fp32 of the same weights
    assert parity["fp32_abs_max"] > 0
    assert not list(tmp_path.glob("pi05-gpu-*"))  # the checkpoint was cleaned up


def test_cuda_asked_for_without_one_exits_non_zero_with_a_message(tmp_path):
    done = _run("--device", "cuda", "--reduced", "--out", str(tmp_path / "x.json"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode != 0
    assert "sees no CUDA device" in done.stderr and "--device cpu --reduced" in done.stderr
    assert not (tmp_path / "x.json").exists()
