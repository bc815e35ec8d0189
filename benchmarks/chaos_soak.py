"""Chaos soak: 16 robots streaming for 10 minutes while a replica process is killed every 2 minutes.

    .venv/bin/python -m benchmarks.chaos_soak                      # the full soak (10 min, a kill every 2 min)
    .venv/bin/python -m benchmarks.chaos_soak --minutes 4          # shorter, same kill period
    .venv/bin/python -m benchmarks.chaos_soak --minutes 1 --kill-every 20 --out /tmp/soak.json
    .venv/bin/python -m benchmarks.chaos_soak --ingress standard   # Serve's standard gRPC proxy

Not part of CI. It starts its own Ray cluster and the real app (serve_config.yaml's
deployment settings, `--replicas` replicas on loopback, behind the README's default
HAProxy ingress unless `--ingress standard`), then runs `--robots`
robot_client control loops (ControlLoop + PolicyClient, bidirectional streams,
replayed observations at 30 Hz). Every `--kill-every` seconds it SIGKILLs one
replica's worker process, round robin. It reports:

- hung calls: calls (chunk or health) that took longer than their deadline + 1 s; must be 0;
- stale chunks executed: actions that ran from an answer to a request sent before a
  connection gap and received after it; must be 0;
- failed requests, split into those in flight at a kill, those made while the killed
  replica's robots were reconnecting, and any others (must be 0).

Results go to benchmarks/results/chaos_soak.json, or chaos_soak_standard.json with
`--ingress standard` (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.errors import PolicyError
from robot_client.policy_client import PolicyClient
from robot_client.replay_robot import ReplayRobot, synthetic_recording
from serve_app.ingress import load_config, start_options, with_ingress
from testbed.cluster_ports import free_port, keep_ray_on_loopback, private_ports_env
from testbed.serve_rest import running_replicas

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
APP_NAME = "robot_policy"
_cluster: dict[str, str] = {}  # start_app's cluster: its dashboard address
HZ = 30.0
HUNG_GRACE_S = 1.0
logger = logging.getLogger("chaos_soak")


# --- the server ----------------------------------------------------------------


def start_app(replicas: int, ingress: str, autoscaling: dict | None = None, cpus: int | None = None) -> str:
    """Ray + Serve on loopback with serve_config.yaml's application, `replicas` replicas (or, with
    `autoscaling`, serve_config.yaml's autoscaling_config updated by it); returns the address."""
    keep_ray_on_loopback()
    os.environ.update(private_ports_env())  # ports of its own beside whatever else runs here
    import ray
    from ray import serve

    from serve_app.app import application  # imports Ray: only after keep_ray_on_loopback()

    config = with_ingress(load_config(), standard_proxy=ingress == "standard")
    app = config["applications"][0]
    app["args"]["checkpoint"] = str(REPO_ROOT / app["args"]["checkpoint"])
    deployment = app["deployments"][0]
    if autoscaling is None:
        deployment["num_replicas"] = replicas
        deployment.pop("autoscaling_config", None)
    else:
        deployment["autoscaling_config"].update(autoscaling)
    # The dashboard serves Serve's REST API: which replicas run, and their pids (kill_replica).
    context = ray.init(num_cpus=cpus or max(4, replicas + 2), include_dashboard=True, dashboard_port=free_port(),
                       log_to_driver=False, configure_logging=False)
    _cluster["dashboard"] = context.dashboard_url
    port = free_port()
    serve.start(**start_options(config, grpc_port=port, http_port=free_port(), http_host="127.0.0.1"))
    serve.run(application(app), name=app["name"], route_prefix=app.get("route_prefix", "/"))
    logger.info("serving %s with %d replicas on 127.0.0.1:%d: %s", app["args"]["checkpoint"], replicas, port, deployment)
    return f"127.0.0.1:{port}"


def replica_names() -> list[str]:
    """Ids of the app's RUNNING replicas (Serve's REST API on the cluster's dashboard)."""
    return sorted(running_replicas(_cluster["dashboard"], APP_NAME))


def kill_replica(name: str) -> int:
    """SIGKILL the replica's worker process (a crash, not a polite Ray kill); returns its pid."""
    pid = running_replicas(_cluster["dashboard"], APP_NAME)[name]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


# --- the robots -------------------------------------------------------------------


class SoakClient(PolicyClient):
    """The real client, timing every call and recording when each answer arrived."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sent: dict[str, float] = {}
        self.received: dict[str, float] = {}
        self.failures: list[tuple[float, float, str]] = []  # (sent, failed, code)
        self.calls: list[tuple[float, float]] = []  # (duration, deadline)
        self.replica_of: dict[str, str] = {}
        self.latency_ms: dict[str, float] = {}

    def _timed(self, fn, timeout, *args):
        started = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.calls.append((time.monotonic() - started, timeout or self.timeout_s))

    def health(self, timeout_s=None):
        return self._timed(super().health, timeout_s, timeout_s)

    def infer(self, request, timeout_s=None):
        sent = self.sent[request.request_id] = time.monotonic()
        try:
            chunk = self._timed(super().infer, timeout_s, request, timeout_s)
        except PolicyError as err:
            self.failures.append((sent, time.monotonic(), err.code.name if err.code else type(err).__name__))
            raise
        self.received[chunk.request_id] = time.monotonic()
        self.replica_of[chunk.request_id] = chunk.replica_id
        self.latency_ms[chunk.request_id] = (self.received[chunk.request_id] - sent) * 1e3
        return chunk


@dataclass
class SoakRobot:
    index: int
    loop: ControlLoop
    robot: ReplayRobot
    client: SoakClient
    stop: threading.Event = field(default_factory=threading.Event)
    outcome: dict = field(default_factory=dict)
    thread: threading.Thread | None = None
    loop_started: float = 0.0

    @classmethod
    def start(cls, index: int, address: str, **client_options) -> SoakRobot:
        client = SoakClient(address, mode="stream", timeout_s=5.0, **client_options)
        robot = ReplayRobot(synthetic_recording(frames=30, height=120, width=160, state_dim=14, seed=index))
        config = LoopConfig(prompt="pick up the cube", control_frequency=HZ, watchdog_timeout_s=0.1, stats_interval_s=3600)
        me = cls(index, ControlLoop.connect(robot, client, config, 60), robot, client)
        me.thread = threading.Thread(target=me._run, name=f"robot-{index}", daemon=True)
        me.thread.start()
        return me

    def _run(self) -> None:
        self.loop_started = time.monotonic()
        try:
            self.outcome["stats"] = self.loop.run(stop=self.stop)
        except BaseException as err:  # noqa: BLE001 - reported in the results
            self.outcome["error"] = repr(err)

    def finish(self, timeout_s: float = 15.0) -> bool:
        self.stop.set()
        self.thread.join(timeout=timeout_s)
        self.client.close()
        return not self.thread.is_alive()


# --- the verdicts -------------------------------------------------------------------


def stale_chunks_executed(r: SoakRobot) -> int:
    """Actions that ran from an answer whose request was sent before a failure and answered after it."""
    failed_at = np.array(sorted(f for _, f, _ in r.client.failures))
    stale = 0
    for rec in r.loop.trace:
        if rec.kind != "act":
            continue
        sent, got = r.client.sent[rec.request_id], r.client.received[rec.request_id]
        i = np.searchsorted(failed_at, sent, side="right")
        if i < len(failed_at) and failed_at[i] < got:
            stale += 1
    return stale


def affected_by(r: SoakRobot, kill: dict) -> bool:
    """The robot's stream was on the killed replica: its last answer before the kill came from it."""
    before = [(t, rid) for rid, t in r.client.received.items() if t <= kill["at"]]
    return bool(before) and r.client.replica_of[max(before)[1]] == kill["replica"]


def classify_failures(robots: list[SoakRobot], kills: list[dict]) -> dict:
    """Each failed request of a robot whose replica was killed, until that robot's next answer:
    in flight at the kill, the first one sent on the stream the kill cut, or later ones while
    reconnecting. Anything else is `other` (must be 0) and listed."""
    t0 = min(r.loop_started for r in robots)
    out = {"in_flight_at_kill": 0, "first_on_the_cut_stream": 0, "while_reconnecting": 0, "other": 0,
           "by_code": {}, "other_detail": []}
    for r in robots:
        answers = np.array(sorted(r.client.received.values()))
        windows = []  # (kill, recovered) for the kills that hit this robot
        for k in kills:
            if affected_by(r, k):
                i = np.searchsorted(answers, k["at"], side="right")
                windows.append((k["at"], answers[i] if i < len(answers) else float("inf")))
        seen = set()
        for sent, failed, code in sorted(r.client.failures):
            out["by_code"][code] = out["by_code"].get(code, 0) + 1
            window = next(((k, rec) for k, rec in windows if k <= failed <= rec), None)
            if window is None:
                out["other"] += 1
                out["other_detail"].append({"robot": r.index, "code": code, "sent_s": round(sent - t0, 2),
                                            "failed_s": round(failed - t0, 2)})
            elif sent <= window[0]:
                out["in_flight_at_kill"] += 1
            elif window not in seen:
                out["first_on_the_cut_stream"] += 1
            else:
                out["while_reconnecting"] += 1
            if window is not None:
                seen.add(window)
    return out


KILL_HOLD_WINDOW_S = 10.0  # a hold this soon after a kill, on a robot whose replica it was, is the kill's


def hold_events(r: SoakRobot) -> list[dict]:
    """Every hold: when, how far past the watchdog deadline, whether it came at the first tick at or
    after the deadline, and when fresh actions resumed."""
    acts = [rec for rec in r.loop.trace if rec.kind == "act"]
    events = []
    for hold_at in r.loop.hold_times:
        (hold,) = [rec for rec in r.loop.trace if rec.time == hold_at]
        last_fresh = max(rec.time for rec in acts if rec.time < hold_at)
        deadline = last_fresh + r.loop.watchdog.timeout_s
        previous = max((rec for rec in r.loop.trace if rec.tick < hold.tick), key=lambda rec: rec.tick)
        resumed = next((rec.time for rec in acts if rec.time > hold_at), None)
        events.append({"at": hold_at, "late_s": hold_at - deadline, "first_tick_after_deadline": previous.time < deadline,
                       "resumed": resumed})
    return events


def ride_through(robots: list[SoakRobot], kills: list[dict]) -> dict:
    """Robots whose replica was killed: how many held, how promptly, and how long until they moved again."""
    affected, at_kill, other = 0, [], []
    for r in robots:
        events = hold_events(r)
        claimed = set()
        for k in kills:
            if not affected_by(r, k):
                continue
            affected += 1
            for i, e in enumerate(events):
                if k["at"] <= e["at"] <= k["at"] + KILL_HOLD_WINDOW_S and i not in claimed:
                    claimed.add(i)
                    at_kill.append({**e, "kill": k["at"]})
                    break
        other += [e for i, e in enumerate(events) if i not in claimed]
    gaps = [e["resumed"] - e["kill"] for e in at_kill if e["resumed"] is not None]
    late = [e["late_s"] for e in at_kill + other]
    return {
        "robots_affected": affected,
        "robots_held_at_a_kill": len(at_kill),
        "moved_again_after_kill_s": {"min": round(min(gaps), 2), "max": round(max(gaps), 2)} if gaps else {},
        "holds_not_at_a_kill": len(other),
        "holds_not_at_the_first_tick_after_the_deadline": sum(not e["first_tick_after_deadline"] for e in at_kill + other),
        "hold_late_past_deadline_ms_max": round(max(late) * 1e3, 1) if late else None,
        "never_resumed": sum(e["resumed"] is None for e in at_kill + other),
    }


def percentiles(values, *qs) -> list[float]:
    return [round(float(v), 1) for v in np.percentile(values, qs)] if len(values) else []


def report(robots: list[SoakRobot], kills: list[dict], args, wall_s: float, stopped: list[bool]) -> dict:
    stats = [r.outcome.get("stats") for r in robots]
    hung = sum(1 for r in robots for d, t in r.client.calls if d > t + HUNG_GRACE_S) + stopped.count(False)
    latencies = [x for s in stats if s for x in s.latency_ms]
    lateness = [x for s in stats if s for x in s.lateness_ms]
    return {
        "benchmark": "chaos_soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"robots": args.robots, "minutes": args.minutes, "kill_every_s": args.kill_every,
                   "replicas": args.replicas, "ingress": args.ingress, "mode": "stream", "control_hz": HZ, "watchdog_s": 0.1,
                   "client_timeout_s": 5.0, "hung_means": f"a call longer than its deadline + {HUNG_GRACE_S} s"},
        "wall_s": round(wall_s, 1),
        "kills": kills,
        "hung_calls": hung,
        "stale_chunks_executed": sum(stale_chunks_executed(r) for r in robots),
        "failed_requests": classify_failures(robots, kills),
        "requests": sum(len(r.client.sent) for r in robots),
        "chunks_answered": sum(len(r.client.received) for r in robots),
        "actions_executed": sum(len(r.robot.applied) for r in robots),
        "holds": sum(s.holds for s in stats if s),
        "resumes": sum(s.resumes for s in stats if s),
        "kills_ridden_through": ride_through(robots, kills),
        "latency_ms_p50_p95_p99": percentiles(latencies, 50, 95, 99),
        "tick_lateness_ms_p50_p99_max": percentiles(lateness, 50, 99, 100),
        "robot_errors": [r.outcome["error"] for r in robots if "error" in r.outcome],
    }


# --- the run ------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=120.0, help="seconds between replica kills")
    parser.add_argument("--robots", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--ingress", choices=("haproxy", "standard"), default="haproxy")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/chaos_soak.json, "
                             "or chaos_soak_standard.json with --ingress standard")
    args = parser.parse_args()
    args.out = args.out or RESULTS / ("chaos_soak_standard.json" if args.ingress == "standard" else "chaos_soak.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("robot_client").setLevel(logging.ERROR)

    address = start_app(args.replicas, args.ingress)
    robots = [SoakRobot.start(i, address) for i in range(args.robots)]
    logger.info("%d robots streaming at %.0f Hz; a replica killed every %.0f s for %.1f min",
                args.robots, HZ, args.kill_every, args.minutes)
    started = time.monotonic()
    end = started + args.minutes * 60
    kills: list[dict] = []
    next_kill = started + args.kill_every
    try:
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, min(next_kill, end) - time.monotonic())))
            if time.monotonic() >= next_kill and time.monotonic() < end - 5:
                victims = replica_names()
                victim = victims[len(kills) % len(victims)]
                at = time.monotonic()
                pid = kill_replica(victim)
                kills.append({"at": at, "t_s": round(at - started, 1), "replica": victim.split("#")[-1], "pid": pid})
                logger.info("killed replica %s (pid %d) at t=%.0f s", victim, pid, at - started)
                next_kill += args.kill_every
                threading.Thread(target=_log_replacement, args=(victim, kills[-1]), daemon=True).start()
    finally:
        wall = time.monotonic() - started
        stopped = [r.finish() for r in robots]
    results = report(robots, kills, args, wall, stopped)
    for k in results["kills"]:
        k.pop("at")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("results in %s:\n%s", args.out, json.dumps({k: results[k] for k in (
        "hung_calls", "stale_chunks_executed", "failed_requests", "requests", "holds", "resumes",
        "kills_ridden_through", "latency_ms_p50_p95_p99", "tick_lateness_ms_p50_p99_max")}, indent=2))

    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _log_replacement(victim: str, kill: dict) -> None:
    """Note when Serve had a replacement replica up (a new replica name, victim gone)."""
    deadline = time.monotonic() + 120
    before = set(replica_names()) - {victim}
    while time.monotonic() < deadline:
        names = set(replica_names())
        if victim not in names and names - before - {victim}:
            kill["replaced_after_s"] = round(time.monotonic() - kill["at"], 1)
            return
        time.sleep(0.2)


if __name__ == "__main__":
    main()
