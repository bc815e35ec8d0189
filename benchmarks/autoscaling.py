"""Autoscaling step response: 2 streaming robots, a step to 24, and back to 2.

    .venv/bin/python -m benchmarks.autoscaling                  # the README's numbers
    .venv/bin/python -m benchmarks.autoscaling --quick --out /tmp/a.json   # shorter phases (tests/test_autoscaling.py)

Starts its own Ray cluster on loopback with serve_config.yaml's application
and its autoscaling policy (serve_app.autoscaling.RobotLoadPolicy), with a
per-replica target sized so that 2 robots need one replica and 24 need more
(`--target`), and the windows of `--quick` shortened. Robots are robot_client
control loops (ControlLoop + PolicyClient, bidirectional streams renewed every
`--stream-max-age` seconds, replayed observations at 30 Hz).

Phases: `base` (2 robots), `step` (24 robots, until the load is spread and
then `--hold` seconds more), `drain` (back to 2 robots, until one replica is
left and then `--hold` seconds). It reports replica counts over time, the time
to scale up after the step, the time until new replicas carry robots, the time
to scale back down, request latency p50/p99 per phase, and for every robot:
holds, resumes, stale chunks executed (must be 0), calls that outlived their
deadline (must be 0). Results: benchmarks/results/autoscaling.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path

from benchmarks.chaos_soak import HUNG_GRACE_S, REPO_ROOT, SoakRobot, percentiles, replica_names, stale_chunks_executed, start_app

logger = logging.getLogger("autoscaling")


class ReplicaCount(threading.Thread):
    """Samples the deployment's running replicas every half second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), len(replica_names())))
            time.sleep(0.5)

    def now(self) -> int:
        return self.samples[-1][1] if self.samples else 0


def wait_for(predicate, timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def replicas_answering(robots: list[SoakRobot], since: float) -> set[str]:
    return {r.client.replica_of[rid] for r in robots for rid, t in r.client.received.items() if t >= since}


def phase_latency(robots: list[SoakRobot], start: float, end: float) -> list[float]:
    values = [r.client.latency_ms[rid] for r in robots for rid, t in r.client.received.items() if start <= t < end]
    return percentiles(values, 50, 99) if values else [None, None]


def run(args) -> dict:
    autoscaling = {"min_replicas": 1, "max_replicas": args.max_replicas,
                   "policy": {"policy_function": "serve_app.autoscaling:RobotLoadPolicy",
                              "policy_kwargs": {"target_observations_per_s": args.target, "target_device_busy": 0.7}}}
    if args.quick:
        autoscaling.update(look_back_period_s=12, upscale_delay_s=3, downscale_delay_s=8)  # look-back > the 10 s metrics push
    address = start_app(1, "haproxy", autoscaling=autoscaling, cpus=args.max_replicas + 2)
    counter = ReplicaCount()
    counter.start()
    wait_for(lambda: counter.now() == 1, 120, "one replica")
    options = {"stream_max_age_s": args.stream_max_age}
    base = [SoakRobot.start(i, address, **options) for i in range(2)]
    step: list[SoakRobot] = []
    t = {"start": time.monotonic()}
    try:
        time.sleep(args.base)
        t["step"] = time.monotonic()
        step = [SoakRobot.start(100 + i, address, **options) for i in range(args.robots - 2)]
        logger.info("step: %d robots", len(base) + len(step))
        t["scaled_up"] = wait_for(lambda: counter.now() >= 2, 240, "a scale-up")
        logger.info("scaled up to %d replicas %.1f s after the step", counter.now(), t["scaled_up"] - t["step"])
        t["spread"] = wait_for(lambda: len(replicas_answering(base + step, t["scaled_up"])) >= 2,
                               4 * args.stream_max_age + 60, "robots on a new replica")
        time.sleep(args.hold)
        t["peak_end"] = time.monotonic()
        stopped = [r.finish() for r in step]
        t["drain"] = time.monotonic()
        logger.info("load spread over %d replicas; back to 2 robots", len(replicas_answering(base, t["spread"])) or 1)
        t["scaled_down"] = wait_for(lambda: counter.now() == 1, 600, "the scale-down to 1 replica")
        logger.info("scaled down to 1 replica %.1f s after the load stopped", t["scaled_down"] - t["drain"])
        time.sleep(args.hold)
        t["end"] = time.monotonic()
    finally:
        stopped = [r.finish() for r in step] + [r.finish() for r in base]
        counter.stop.set()
    everyone = base + step
    stats = [r.outcome.get("stats") for r in everyone]
    peak = max(n for at, n in counter.samples if t["step"] <= at <= t["drain"])
    base_moving = [sum(1 for at, _ in r.robot.applied if at > t["end"] - args.hold) for r in base]
    results = {
        "benchmark": "autoscaling",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"robots": [2, args.robots, 2], "target_observations_per_s": args.target, "max_replicas": args.max_replicas,
                   "stream_max_age_s": args.stream_max_age, "quick": args.quick, "autoscaling_config": autoscaling,
                   "ingress": "haproxy", "mode": "stream", "control_hz": 30.0},
        "replicas": {"before": 1, "peak": peak, "after": counter.now()},
        "seconds": {
            "step_to_scale_up": round(t["scaled_up"] - t["step"], 1),
            "scale_up_to_load_spread": round(t["spread"] - t["scaled_up"], 1),
            "load_stop_to_scale_down": round(t["scaled_down"] - t["drain"], 1),
        },
        "latency_ms_p50_p99": {
            "base": phase_latency(base, t["start"], t["step"]),
            "step_until_scaled": phase_latency(everyone, t["step"], t["scaled_up"]),
            "scaled": phase_latency(everyone, t["spread"], t["peak_end"]),
            "drain": phase_latency(base, t["drain"], t["end"]),
        },
        "replica_timeline": [(round(at - t["start"], 1), n) for i, (at, n) in enumerate(counter.samples)
                             if i == 0 or n != counter.samples[i - 1][1]],
        "stale_chunks_executed": sum(stale_chunks_executed(r) for r in everyone),
        "hung_calls": sum(1 for r in everyone for d, lim in r.client.calls if d > lim + HUNG_GRACE_S) + stopped.count(False),
        "failed_requests": sum(len(r.client.failures) for r in everyone),
        "holds": sum(s.holds for s in stats if s),
        "resumes": sum(s.resumes for s in stats if s),
        "base_robot_actions_in_last_hold": base_moving,
        "robot_errors": [r.outcome["error"] for r in everyone if "error" in r.outcome],
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--robots", type=int, default=24)
    parser.add_argument("--target", type=float, default=20.0, help="target_observations_per_s per replica")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--stream-max-age", type=float, default=60.0, help="robot_client's stream renewal (its default: 60)")
    parser.add_argument("--base", type=float, default=20.0, help="seconds with 2 robots before the step")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds held after each transition")
    parser.add_argument("--quick", action="store_true", help="short autoscaling windows (look-back 12 s, delays 3/8 s)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "autoscaling.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("robot_client").setLevel(logging.ERROR)
    try:
        results = run(args)
    finally:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("results in %s:\n%s", args.out, json.dumps({k: results[k] for k in (
        "replicas", "seconds", "latency_ms_p50_p99", "stale_chunks_executed", "hung_calls", "holds", "resumes")}, indent=2))


if __name__ == "__main__":
    main()
