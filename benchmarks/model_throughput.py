"""The model's own best batched throughput (forward passes alone, no serving), and the input path's.

The input path (validate, decode two JPEG cameras, letterbox) is measured too:
a server pays it once per observation whatever it batches, so it bounds
serving throughput on a CPU box however cheap the model is.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.robots import robot_payload
from serve_app.checkpoint import open_checkpoint
from serve_app.observation import ObservationBatch, parse_observation
from serve_app.policies import load_policy


def measure(checkpoint: Path, batch_sizes=(1, 2, 4, 8, 16, 32, 64), seconds: float = 2.0, torch_threads: int = 1) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        policy = load_policy(open_checkpoint(checkpoint), "cpu")
        observation = parse_observation(robot_payload(0), policy.spec)
        rows = {}
        for b in batch_sizes:
            batch = ObservationBatch.stack([observation] * b)
            policy.predict(batch)  # warm
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                policy.predict(batch)
                n += 1
            elapsed = time.perf_counter() - start
            rows[b] = {"ms_per_batch": round(elapsed / n * 1e3, 3), "samples_per_s": round(n * b / elapsed, 1)}
    finally:
        torch.set_num_threads(previous)
    best = max(rows, key=lambda b: rows[b]["samples_per_s"])
    return {"torch_threads": torch_threads, "by_batch_size": rows, "best_batch_size": best,
            "best_samples_per_s": rows[best]["samples_per_s"]}


def input_path(checkpoint: Path, seconds: float = 2.0) -> dict:
    """Observations per second one thread can validate and decode (robot payload: two 224x224 JPEGs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = load_policy(open_checkpoint(checkpoint), "cpu").spec
        request = robot_payload(0)
        parse_observation(request, spec)  # warm
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            parse_observation(request, spec)
            n += 1
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return {"observations_per_s": round(n / elapsed, 1), "us_per_observation": round(elapsed / n * 1e6, 1)}
