"""The model's own best batched throughput: forward passes alone, no serving."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.robots import robot_payload
from serve_app.checkpoint import open_checkpoint
from serve_app.observation import ObservationBatch, parse_observation
from serve_app.policies import load_policy


def measure(checkpoint: Path, batch_sizes=(1, 2, 4, 8, 16, 32), seconds: float = 2.0, torch_threads: int = 1) -> dict:
    torch.set_num_threads(torch_threads)
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
    best = max(rows, key=lambda b: rows[b]["samples_per_s"])
    return {"torch_threads": torch_threads, "by_batch_size": rows, "best_batch_size": best,
            "best_samples_per_s": rows[best]["samples_per_s"]}
