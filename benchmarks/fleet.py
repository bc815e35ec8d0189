"""16 robots split over two models against 16 robots on one model, in one run against one app.

    python -m benchmarks.fleet              # ~4 min (4 rounds of 2 x 15 s): benchmarks/results/fleet.json + fleet_latency.png
    python -m benchmarks.fleet --quick      # seconds per phase; proves the harness works

The app is serve_config.yaml's (HAProxy ingress, two replicas, batch up to 16) with two models:
`demo` (the default) and `b`, a copy of the demo's files under another name. The same compute per
observation, so what differs between the phases is what serving two models costs: passes split by
model (a pass never mixes them), the second model's memory, and its cold start in each replica.

Robots are closed-loop streams (the next observation as soon as the chunk is back) named r00..r15
by metadata robot_id; in the split phase r00..r07 ask for demo and r08..r15 for b. Phases alternate,
one model / two models, `--rounds` times, so drift of this shared machine hits both alike.

Cold start of b: the first call that names it (the robot's wait, end to end), and what each replica
measured (metric robot_policy_model_load_ms, and its log line). A real Prometheus scrapes the cluster
throughout (deploy/prometheus/prometheus.yml, testbed/prometheus.py); the picture is its query_range
of the dashboard's "Latency p99 by robot" and "Chunks/s by model" panels (deploy/grafana/robot_fleet.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import grpc

from benchmarks.robots import Scenario, play, robot_payload, summarize
from benchmarks.run import RESULTS, USER_CONFIG, environment
from benchmarks.servers import DEMO_CHECKPOINT, ResourceMeter, ray_serve
from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from testbed.cluster_ports import free_port
from testbed.prometheus import (
    Prometheus, dashboard_query, ray_metrics_env, service_discovery_file, wait_for_targets,
)

ROBOTS = 16
MODELS = ("demo", "b")
# Ray pushes metrics to its agent every second here (10 s by default) so the picture resolves seconds.
REPORT_INTERVAL_MS = 1000


def robot_id(i: int) -> str:
    return f"r{i:02d}"


def phases(seconds: float) -> dict[str, tuple]:
    """Phase name -> (scenario, metadata of robot i)."""
    scenario = Scenario(robots=ROBOTS, mode="stream", loop="closed", seconds=seconds)
    return {
        "one_model": (scenario, lambda i: (("multiplexed_model_id", "demo"), ("robot_id", robot_id(i)))),
        "two_models": (scenario, lambda i: (("multiplexed_model_id", MODELS[i * len(MODELS) // ROBOTS]),
                                            ("robot_id", robot_id(i)))),
    }


def first_call_ms(address: str, model: str) -> tuple[float, str]:
    """One unary call naming `model`: what a robot waits for the first chunk of a model not loaded yet."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        started = time.perf_counter()
        response = stub.GetActionChunk(robot_payload(0), metadata=(("multiplexed_model_id", model),
                                                                   ("robot_id", "cold-start-probe")), timeout=120)
        return (time.perf_counter() - started) * 1e3, response.replica_id


def cold_starts_in_logs(ray_tmp: Path, model: str) -> dict[str, float]:
    """replica -> its own line, `model 'b' loaded in N ms (cold start)` (serve_app/replica.py), from the
    replicas' stderr files in the session's logs (the driver's copy of them dedups repeated lines)."""
    pattern = re.compile(rf"RobotPolicy replica (\w+): model '{re.escape(model)}' loaded in (\d+) ms \(cold start")
    found = {}
    for path in sorted(ray_tmp.glob("ray/session_*/logs/*.err")):
        found.update({m.group(1): float(m.group(2)) for m in pattern.finditer(path.read_text(errors="replace"))})
    return found


def cold_starts_in_metrics(prom: Prometheus) -> dict[str, dict[str, float]]:
    """model -> replica -> mean load time (ms) of robot_policy_model_load_ms (the default loads at start)."""
    out: dict[str, dict[str, float]] = {}
    for s in prom.query(dashboard_query("Model cold start per replica", {"model": ".*"})):
        out.setdefault(s["metric"]["model"], {})[s["metric"]["replica"]] = round(float(s["value"][1]), 1)
    return out


def by_model(logs, metadata_of, wall: float) -> dict:
    models = {}
    for i, log in enumerate(logs):
        models.setdefault(dict(metadata_of(i))["multiplexed_model_id"], []).append(log)
    return {model: summarize(group, wall) for model, group in models.items()}


def plot(series: dict, marks: list[tuple[str, float, float]], t0: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"demo": "tab:blue", "b": "tab:orange"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, height_ratios=(3, 1.3))
    for s in series["p99"]:
        model, robot = s["metric"].get("model", ""), s["metric"].get("robot", "")
        if not robot.startswith("r"):
            continue  # the cold-start probe
        xs = [float(t) - t0 for t, _ in s["values"]]
        top.plot(xs, [float(v) for _, v in s["values"]], color=colours.get(model, "grey"), lw=0.9, alpha=0.75)
    for s in series["rate"]:
        model = s["metric"].get("model", "")
        bottom.plot([float(t) - t0 for t, _ in s["values"]], [float(v) for _, v in s["values"]],
                    color=colours.get(model, "grey"), label=f"model {model}")
    for ax in (top, bottom):
        for name, start, end in marks:
            ax.axvspan(start - t0, end - t0, color="0.93" if name == "one_model" else "0.85", zorder=0)
    for name, start, end in marks:
        top.text((start + end) / 2 - t0, 1.0, name.replace("_", " "), transform=top.get_xaxis_transform(),
                 ha="center", va="bottom", fontsize=9)
    top.plot([], [], color=colours["demo"], label="a robot on demo")
    top.plot([], [], color=colours["b"], label="a robot on b")
    top.set_ylabel("p99 latency in the replica, ms\n(per robot, 10 s window)")
    top.legend(loc="upper right", fontsize=8)
    bottom.set_ylabel("chunks/s by model")
    bottom.set_xlabel("seconds into the run")
    bottom.legend(loc="upper right", fontsize=8)
    fig.suptitle("16 closed-loop robots, one model vs split over two (Prometheus query_range of Ray's metrics)",
                 fontsize=10)
    fig.text(0.01, 0.005, "p99: interpolated within the histogram's buckets (.., 20, 50, 100, 150, 200, 300 ms), hence "
             "the flat runs on bucket edges; each point is the trailing 10 s, and Ray's report plus the scrape put it ~2 s late.",
             fontsize=7.5, color="0.35")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    seconds, rounds = (2.0, 1) if args.quick else (args.seconds, args.rounds)
    out = args.out or RESULTS / ("fleet_quick.json" if args.quick else "fleet.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = phases(seconds)

    # A short temp root of the cluster's own (Ray's unix sockets live under it), so its service
    # discovery file is this cluster's and no other's.
    tmp_root = Path(tempfile.mkdtemp(prefix="rpfleet-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="rpfleet-work-"))
    try:
        b = work / "b"
        shutil.copytree(DEMO_CHECKPOINT, b)
        server = ray_serve("fleet", free_port(), free_port(), USER_CONFIG, work, dashboard=True,
                           env=ray_metrics_env(tmp_root, REPORT_INTERVAL_MS),
                           extra_args={"default_model": "demo", "checkpoints": {"b": str(b)}, "api_key_env": None})
        load_at_start = round(os.getloadavg()[0], 2)
        print("starting the app (two replicas, models demo and b) ...", flush=True)
        server.start(work)
        try:
            sd_file = service_discovery_file(tmp_root)
            wait_for_targets(sd_file)
            with Prometheus.scraping(sd_file, work / "prometheus") as prom:
                # Warm demo on both replicas (it loaded at start), then b's cold start, seen by a robot.
                asyncio.run(play(server.address, Scenario(robots=4, mode="stream", loop="closed", seconds=2.0),
                                 plan["one_model"][1]))
                # A new channel each: the first call naming b on each replica (HAProxy alternates them)
                # loads it there; the same calls naming demo, loaded, are what the wait would be without.
                probes = [first_call_ms(server.address, "b") for _ in range(2)]
                controls = [first_call_ms(server.address, "demo") for _ in range(2)]
                print(f"  first calls naming b: {[round(ms) for ms, _ in probes]} ms (replicas "
                      f"{[r for _, r in probes]}); naming demo: {[round(ms) for ms, _ in controls]} ms", flush=True)
                asyncio.run(play(server.address, Scenario(robots=4, mode="stream", loop="closed", seconds=2.0),
                                 plan["two_models"][1]))
                results: dict[str, list] = {name: [] for name in plan}
                marks = []
                for round_ in range(rounds):
                    for name, (scenario, metadata_of) in plan.items():
                        meter = ResourceMeter(server)
                        start = time.time()
                        logs, wall = asyncio.run(play(server.address, scenario, metadata_of))
                        marks.append((name, start, time.time()))
                        row = {**summarize(logs, wall), "by_model": by_model(logs, metadata_of, wall),
                               "per_robot_p99_ms": {robot_id(i): summarize([log], wall)["latency_ms"]["p99"]
                                                    for i, log in enumerate(logs)},
                               "server": meter.read(), "round": round_}
                        # CPU the app spent per chunk: what the phase cost, less swayed than chunks/s by
                        # other work on a shared machine.
                        row["server_cpu_ms_per_chunk"] = round(row["server"]["cpu_cores"] * wall * 1e3
                                                               / max(row["requests"], 1), 3)
                        results[name].append(row)
                        print(f"  {name:10s} round {round_}: {row['throughput_per_s']:7.1f} chunks/s p50 "
                              f"{row['latency_ms']['p50']} p99 {row['latency_ms']['p99']} ms, batch "
                              f"{row['batch_size']}, errors {row['errors']}", flush=True)
                time.sleep(3 * REPORT_INTERVAL_MS / 1e3)  # the last phase's metrics reach Prometheus
                # The phases only: after the last one a trailing window holds the robots' last few calls,
                # whose p99 says nothing. Ray's report and the scrape lag a second or two behind.
                t0, t1 = marks[0][1], marks[-1][2] + 2 * REPORT_INTERVAL_MS / 1e3
                every = {"model": ".*", "robot": ".*", "__rate_interval": "10s"}  # Grafana's "All"
                series = {name: prom.query_range(dashboard_query(title, every), t0, t1, 1)
                          for name, title in (("p99", "Latency p99 by robot"), ("rate", "Chunks/s by model"))}
                metric_cold = cold_starts_in_metrics(prom)
        finally:
            server.stop()
        log_cold = cold_starts_in_logs(tmp_root, "b")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    def mean(name: str, *path):
        values = []
        for row in results[name]:
            node = row
            for key in path:
                node = node[key]
            values.append(node)
        return round(sum(values) / len(values), 2)

    summary = {
        name: {"chunks_per_s": mean(name, "throughput_per_s"), "p50_ms": mean(name, "latency_ms", "p50"),
               "p99_ms": mean(name, "latency_ms", "p99"), "mean_batch": mean(name, "batch_size", "mean"),
               "server_cpu_ms_per_chunk": mean(name, "server_cpu_ms_per_chunk"),
               "chunks_per_s_by_round": [row["throughput_per_s"] for row in results[name]]}
        for name in plan
    }
    summary["two_models_x_one_model"] = {
        "chunks_per_s": round(summary["two_models"]["chunks_per_s"] / summary["one_model"]["chunks_per_s"], 2),
        "p99": round(summary["two_models"]["p99_ms"] / summary["one_model"]["p99_ms"], 2),
        "server_cpu_ms_per_chunk": round(summary["two_models"]["server_cpu_ms_per_chunk"]
                                         / summary["one_model"]["server_cpu_ms_per_chunk"], 2),
    }
    summary["cold_start_b_ms"] = {
        "first_call_end_to_end": [round(ms, 1) for ms, _ in probes],
        "first_call_end_to_end_model_loaded": [round(ms, 1) for ms, _ in controls],
        "replica_log_by_replica": log_cold,
        # Ray's agent rebuilds a histogram's _sum from bucket midpoints: this is bucket-resolution.
        "metric_mean_by_replica": metric_cold.get("b", {}),
        "default_model_at_replica_start_metric_by_replica": metric_cold.get("demo", {}),
    }
    report = {
        "environment": {**environment(), "load_average_1m_at_start": load_at_start},
        "settings": {"user_config": USER_CONFIG, "robots": ROBOTS, "mode": "stream, closed loop", "seconds": seconds,
                     "rounds": rounds, "replicas": 2, "models": {"demo": str(DEMO_CHECKPOINT), "b": "a copy of demo"},
                     "metrics_report_interval_ms": REPORT_INTERVAL_MS, "quick": args.quick},
        "summary": summary,
        "phases": results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    picture = out.with_name(out.stem + "_latency.png")
    plot(series, marks, t0, picture)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} and {picture}")


if __name__ == "__main__":
    main()
