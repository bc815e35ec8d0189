"""Replica metrics, exported through Ray's metrics endpoint next to Serve's own.

Serve already exports request counts, latency and `ray_serve_actual_batch_size`;
these add what a robot fleet operator asks next: how big the forward passes
really were (Serve's batch size counts the observations that triggered a pass;
the pass takes whatever waits, serve_app/engine.py), how long they took, how
long observations waited, how close to their deadlines passes ran, which
observations were dropped before a pass and why, and which errors robots get.

Recorded once per forward pass, not per observation: a Ray metric update costs
tens of microseconds of event-loop time, which per observation was a fifth of
the replica's event loop under 16 robots. Each is labelled with the model
(args.checkpoints name) whose pass it was.

Per robot and per model (requests, latency, queue time, rejections by status):
`RobotMetrics`. The robot label is bounded (`RobotLabels`): the first
`robot_label_limit` robot ids a replica sees keep their own label, later ones
share "other", calls without a robot_id are "none". Series per replica are at
most models x (limit + 2) per metric, whatever the fleet does.
"""

from __future__ import annotations

import grpc
from ray.serve import metrics

from serve_app.engine import PassReport

# Fine enough that a p99 under load does not sit on a bucket edge (Ray rebuilds sums from midpoints).
_MS_BOUNDARIES = [0.5, 1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000]
_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]
_SLACK_BOUNDARIES = [1, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
_LOAD_BOUNDARIES = [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000, 120000]
OTHER_ROBOTS = "other"
NO_ROBOT = "none"
ROBOT_LABEL_LIMIT = 64
GAUGE_REFRESH_S = 1.0  # inside the TTL of Ray's agent for gauge values (ray/_private/telemetry) even at a 1 s report interval


class ReplicaMetrics:
    def __init__(self):
        self._queue = metrics.Histogram(
            "robot_policy_queue_time_ms", "Longest wait of an observation in a forward pass, from decoded to pass start",
            boundaries=_MS_BOUNDARIES, tag_keys=("model",),
        )
        self._inference = metrics.Histogram(
            "robot_policy_inference_time_ms", "Forward pass time, one sample per pass", boundaries=_MS_BOUNDARIES,
            tag_keys=("model",),
        )
        self._batch = metrics.Histogram(
            "robot_policy_batch_size", "Observations per forward pass", boundaries=_BATCH_BOUNDARIES,
            tag_keys=("model",),
        )
        self._slack = metrics.Histogram(
            "robot_policy_slack_ms",
            "At dispatch: the most urgent observation's deadline minus the pass's expected end, one sample per pass "
            "(the first bucket also holds passes already late: FIFO scheduling, or a pass slower than expected)",
            boundaries=_SLACK_BOUNDARIES, tag_keys=("model",),
        )
        self._dropped = metrics.Counter(
            "robot_policy_dropped_total",
            "Observations dropped before a forward pass, by reason (expired, unmeetable, cancelled)",
            tag_keys=("reason", "model"),
        )

    def forward_pass(self, report: PassReport, model: str = "") -> None:
        tags = {"model": model}
        self._batch.observe(report.size, tags=tags)
        self._inference.observe(report.inference_ms, tags=tags)
        self._queue.observe(report.longest_queue_ms, tags=tags)
        if report.tightest_slack_ms is not None:
            self._slack.observe(report.tightest_slack_ms, tags=tags)

    def dropped(self, reason: str, count: int, model: str = "") -> None:
        self._dropped.inc(count, tags={"reason": reason, "model": model})


class RobotLabels:
    """robot_id -> metric label, at most `limit` distinct ones per replica (then OTHER_ROBOTS)."""

    def __init__(self, limit: int = ROBOT_LABEL_LIMIT):
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, robot_id: str) -> str:
        if not robot_id:
            return NO_ROBOT
        if robot_id in self._seen:
            return robot_id
        if len(self._seen) < self._limit and robot_id not in (OTHER_ROBOTS, NO_ROBOT):
            self._seen.add(robot_id)
            return robot_id
        return OTHER_ROBOTS


class RobotMetrics:
    """Per model and robot: what each robot experiences at this replica, and each model's cold starts."""

    def __init__(self, robot_label_limit: int = ROBOT_LABEL_LIMIT):
        self.label = RobotLabels(robot_label_limit)
        by_robot = ("model", "robot")
        self._requests = metrics.Counter(
            "robot_policy_requests_total", "Observations answered with a chunk, by model and robot", tag_keys=by_robot,
        )
        self._latency = metrics.Histogram(
            "robot_policy_request_latency_ms",
            "In the replica, from an observation received to its chunk ready (decode, queue, forward pass), "
            "by model and robot", boundaries=_MS_BOUNDARIES, tag_keys=by_robot,
        )
        self._queue = metrics.Histogram(
            "robot_policy_request_queue_ms", "An observation's wait from decoded to its forward pass starting, "
            "by model and robot", boundaries=_MS_BOUNDARIES, tag_keys=by_robot,
        )
        self._rejected = metrics.Counter(
            "robot_policy_rejected_total", "Observations and calls answered with an error, by gRPC status, model and "
            "robot (model '' : the call named a model that does not exist)", tag_keys=("code", "model", "robot"),
        )
        self._load_ms = metrics.Histogram(
            "robot_policy_model_load_ms", "Cold start of a model in a replica: checkpoint files to warm on the device",
            boundaries=_LOAD_BOUNDARIES, tag_keys=("model",),
        )
        self._loads = metrics.Counter(
            "robot_policy_model_events_total", "Models loaded, evicted (least recently used) and failed to load, "
            "per replica", tag_keys=("model", "event"),
        )
        self._loaded = metrics.Gauge(
            "robot_policy_model_loaded", "1 while the replica holds the model in memory", tag_keys=("model",),
        )

    def answered(self, model: str, robot: str, latency_ms: float, queue_ms: float) -> None:
        tags = {"model": model, "robot": robot}
        self._requests.inc(tags=tags)
        self._latency.observe(latency_ms, tags=tags)
        self._queue.observe(queue_ms, tags=tags)

    def rejected(self, code: grpc.StatusCode, model: str = "", robot: str = NO_ROBOT) -> None:
        self._rejected.inc(tags={"code": code.name, "model": model, "robot": robot})

    def models_held(self, models: list[str]) -> None:
        """Re-report the models held: Ray's metrics agent drops a gauge value not set again within its TTL."""
        for model in models:
            self._loaded.set(1, tags={"model": model})

    def model_event(self, model: str, event: str, load_ms: float | None = None) -> None:
        self._loads.inc(tags={"model": model, "event": event})
        if event == "loaded":
            self._loaded.set(1, tags={"model": model})
            if load_ms is not None:
                self._load_ms.observe(load_ms, tags={"model": model})
        elif event == "evicted":
            self._loaded.set(0, tags={"model": model})
