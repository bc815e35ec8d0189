"""Replica metrics, exported through Ray's metrics endpoint next to Serve's own.

Serve already exports request counts, latency and `ray_serve_actual_batch_size`;
these add what a robot fleet operator asks next: how big the forward passes
really were (Serve's batch size counts the observations that triggered a pass;
the pass takes whatever waits, serve_app/engine.py), how long they took, how
long observations waited, how close to their deadlines passes ran, which
observations were dropped before a pass and why, and which errors robots get.

Recorded once per forward pass, not per observation: a Ray metric update costs
tens of microseconds of event-loop time, which per observation was a fifth of
the replica's event loop under 16 robots.
"""

from __future__ import annotations

import grpc
from ray.serve import metrics

from serve_app.engine import PassReport

_MS_BOUNDARIES = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
_SLACK_BOUNDARIES = [1, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]


class ReplicaMetrics:
    def __init__(self):
        self._queue = metrics.Histogram(
            "robot_policy_queue_time_ms", "Longest wait of an observation in a forward pass, from decoded to pass start",
            boundaries=_MS_BOUNDARIES,
        )
        self._inference = metrics.Histogram(
            "robot_policy_inference_time_ms", "Forward pass time, one sample per pass", boundaries=_MS_BOUNDARIES,
        )
        self._batch = metrics.Histogram(
            "robot_policy_batch_size", "Observations per forward pass", boundaries=_BATCH_BOUNDARIES,
        )
        self._slack = metrics.Histogram(
            "robot_policy_slack_ms",
            "At dispatch: the most urgent observation's deadline minus the pass's expected end, one sample per pass "
            "(the first bucket also holds passes already late: FIFO scheduling, or a pass slower than expected)",
            boundaries=_SLACK_BOUNDARIES,
        )
        self._dropped = metrics.Counter(
            "robot_policy_dropped_total",
            "Observations dropped before a forward pass, by reason (expired, unmeetable, cancelled)",
            tag_keys=("reason",),
        )
        self._errors = metrics.Counter(
            "robot_policy_rejected_total", "Observations answered with an error, by gRPC status", tag_keys=("code",)
        )

    def forward_pass(self, report: PassReport) -> None:
        self._batch.observe(report.size)
        self._inference.observe(report.inference_ms)
        self._queue.observe(report.longest_queue_ms)
        if report.tightest_slack_ms is not None:
            self._slack.observe(report.tightest_slack_ms)

    def dropped(self, reason: str, count: int) -> None:
        self._dropped.inc(count, tags={"reason": reason})

    def rejected(self, code: grpc.StatusCode) -> None:
        self._errors.inc(tags={"code": code.name})
