"""The model's own best batched throughput (forward passes alone, no serving), and the input path's.

The input path (validate, decode two JPEG cameras, the policy's frame transform) is measured too:
a server pays it once per observation whatever it batches, so it bounds
serving throughput on a CPU box however cheap the model is.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.robots import robot_payload
from serve_app.checkpoint import open_checkpoint
from serve_app.observation import ObservationBatch
from serve_app.parse import parse_observation
from serve_app.policies import load_policy


def measure(checkpoint: Path, batch_sizes=(1, 2, 4, 8, 16, 32, 64), seconds: float = 2.0, torch_threads: int = 1) -> dict:
    with _torch_threads(torch_threads):
        policy = load_policy(open_checkpoint(checkpoint), "cpu")
        observation = parse_observation(robot_payload(0), policy.spec, policy.frames)
        rows = {}
        for b in batch_sizes:
            batch = ObservationBatch.stack([observation] * b)
            calls_per_s = _rate(lambda: policy.predict(batch), seconds)
            rows[b] = {"ms_per_batch": round(1e3 / calls_per_s, 3), "samples_per_s": round(calls_per_s * b, 1)}
    best = max(rows, key=lambda b: rows[b]["samples_per_s"])
    return {"torch_threads": torch_threads, "by_batch_size": rows, "best_batch_size": best,
            "best_samples_per_s": rows[best]["samples_per_s"]}


def input_path(checkpoint: Path, seconds: float = 2.0) -> dict:
    """Observations per second one thread can validate and decode (robot payload: two 224x224 JPEGs)."""
    with _torch_threads(1):
        policy = load_policy(open_checkpoint(checkpoint), "cpu")
        request = robot_payload(0)
        per_s = _rate(lambda: parse_observation(request, policy.spec, policy.frames), seconds)
    return {"observations_per_s": round(per_s, 1), "us_per_observation": round(1e6 / per_s, 1)}


def _rate(call, seconds: float) -> float:
    """Calls per second of `call` over `seconds`, after one warm-up call."""
    call()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        n += 1
    return n / (time.perf_counter() - start)


@contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
