"""Replica metrics, exported through Ray's metrics endpoint next to Serve's own.

Serve already exports request counts, latency and `ray_serve_actual_batch_size`;
these add what a robot fleet operator asks next: how long observations waited
for a batch, how long the forward pass took, and which errors robots get.
"""

from __future__ import annotations

import grpc
from ray.serve import metrics

from serve_app.responses import ChunkResult

_MS_BOUNDARIES = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


class ReplicaMetrics:
    def __init__(self):
        self._queue = metrics.Histogram(
            "robot_policy_queue_time_ms", "Time an observation waited for its batch", boundaries=_MS_BOUNDARIES
        )
        self._inference = metrics.Histogram(
            "robot_policy_inference_time_ms", "Forward pass time of the batch an observation ran in",
            boundaries=_MS_BOUNDARIES,
        )
        self._errors = metrics.Counter(
            "robot_policy_rejected_total", "Observations answered with an error, by gRPC status", tag_keys=("code",)
        )

    def answered(self, result: ChunkResult) -> None:
        self._queue.observe(result.queue_ms)
        self._inference.observe(result.inference_ms)

    def rejected(self, code: grpc.StatusCode) -> None:
        self._errors.inc(tags={"code": code.name})
