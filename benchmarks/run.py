"""Play N robots against three servers on the same checkpoint, side by side in one run.

    python -m benchmarks.run            # full run (~8 min): benchmarks/results/serving.json + serving.png
    python -m benchmarks.run --quick    # seconds per scenario; proves the harness works (CI runs it)

Servers: `direct` (one grpcio process, one inference thread, no batching:
OpenTau's architecture); our app as serve_config.yaml configures it, behind
Serve's throughput-optimised HAProxy ingress (`serve_haproxy`, the README's
default) and behind Serve's standard gRPC proxy (`serve_default`); and
`serve_haproxy_1replica`, the same with one replica, which separates what
batching buys from what a second replica buys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from benchmarks import model_throughput
from benchmarks.robots import Scenario, play, summarize
from benchmarks.servers import REPO_ROOT, ResourceMeter, direct, ray_serve
from testbed.cluster_ports import free_port

RESULTS = REPO_ROOT / "benchmarks" / "results"
USER_CONFIG = {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}  # as in serve_config.yaml


def scenarios(quick: bool, seconds: float) -> list[Scenario]:
    if quick:
        return [
            Scenario(robots=2, mode="unary", loop="closed", seconds=1.0),
            Scenario(robots=2, mode="stream", loop="closed", seconds=1.0),
            Scenario(robots=2, mode="stream", loop="paced", seconds=1.0, ticks_per_chunk=4),
        ]
    return [
        Scenario(robots=1, mode="unary", loop="closed", seconds=seconds),
        Scenario(robots=1, mode="stream", loop="closed", seconds=seconds),
        Scenario(robots=16, mode="unary", loop="closed", seconds=seconds),
        Scenario(robots=16, mode="stream", loop="closed", seconds=seconds),
        Scenario(robots=16, mode="unary", loop="paced", seconds=seconds, ticks_per_chunk=4),
        Scenario(robots=16, mode="stream", loop="paced", seconds=seconds, ticks_per_chunk=4),
        Scenario(robots=48, mode="stream", loop="closed", seconds=seconds),  # within max_ongoing_requests
    ]


def environment() -> dict:
    versions = {p: metadata.version(p) for p in ("ray", "grpcio", "torch", "numpy", "pillow", "protobuf")}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
        "python": platform.python_version(), "versions": versions, "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        # Other work on the machine skews every number; the 1-minute load says how quiet it was.
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def run_side_by_side(servers: list, plan: list[Scenario], work: Path, warmup_s: float) -> dict:
    """All servers up at once; each scenario runs against each server back to back.

    On a shared machine the background load drifts over minutes; interleaving
    keeps the three measurements of one scenario seconds apart, so their
    ratios stay meaningful. An idle server costs little (its meter shows it).
    """
    results = {s.name: {} for s in servers}
    with all_up(servers, work, warmup_s):
        for scenario in plan:
            for server in servers:
                meter = ResourceMeter(server)
                logs, wall = asyncio.run(play(server.address, scenario))
                row = {**summarize(logs, wall), "server": meter.read(), "scenario": scenario.__dict__}
                results[server.name][scenario.name] = row
                print(f"  {server.name:14s} {scenario.name:18s} {row['throughput_per_s']:8.1f}/s "
                      f"p50 {row['latency_ms']['p50']} p99 {row['latency_ms']['p99']} "
                      f"batch {row['batch_size']} err {row['errors']}", flush=True)
    return results


@contextmanager
def all_up(servers: list, work: Path, warmup_s: float):
    """Every server started and warmed up (4 closed-loop streams); every one stopped on the way out."""
    try:
        for server in servers:
            print(f"starting {server.name} ...", flush=True)
            server.start(work)
            asyncio.run(play(server.address, Scenario(robots=4, mode="stream", loop="closed", seconds=warmup_s)))
        yield
    finally:
        for server in servers:
            server.stop()


def targets(results: dict, model: dict) -> dict:
    """Issue 5's targets as ratios within this one run (None where a scenario was not run)."""
    d, ours = results.get("direct", {}), {k: v for k, v in results.items() if k != "direct"}

    def get(server, scenario, *path):
        node = results.get(server, {}).get(scenario)
        for key in path:
            node = None if node is None else node.get(key)
        return node

    out = {}
    for name in ours:
        row = {}
        for mode in ("unary", "stream"):
            s16, s1 = f"closed-{mode}-16", f"closed-{mode}-1"
            if s16 in d and s16 in ours[name]:
                row[f"{mode}_16_throughput_x_direct"] = round(get(name, s16, "throughput_per_s") / get("direct", s16, "throughput_per_s"), 2)
                row[f"{mode}_16_p99_x_direct"] = round(get(name, s16, "latency_ms", "p99") / get("direct", s16, "latency_ms", "p99"), 2)
            if s1 in d and s1 in ours[name]:
                row[f"{mode}_1_p50_minus_direct_ms"] = round(get(name, s1, "latency_ms", "p50") - get("direct", s1, "latency_ms", "p50"), 2)
        sat = get(name, "closed-stream-48", "throughput_per_s")
        if sat is not None:
            # The target reads "the model's best": on this machine that is all cores.
            row["saturation_x_model_best"] = round(sat / model["all_cores"]["best_samples_per_s"], 2)
            row["saturation_x_model_best_one_thread"] = round(sat / model["one_thread"]["best_samples_per_s"], 2)
        out[name] = row
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    scen = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(scen))]
        axes[0].bar(xs, [results[name][s]["throughput_per_s"] for s in scen], width, label=name)
        axes[1].bar(xs, [results[name][s]["latency_ms"]["p99"] or 0 for s in scen], width, label=name)
    for ax, title in zip(axes, ("throughput (chunks/s)", "p99 latency (ms)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scen))], scen, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--servers", default="direct,serve_default,serve_haproxy,serve_haproxy_1replica")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", default="", help="comma-separated scenario names (e.g. closed-stream-16); for exploring, not for the README table")
    args = parser.parse_args()
    out = args.out or RESULTS / ("serving_quick.json" if args.quick else "serving.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = REPO_ROOT / "checkpoints" / "demo"
    plan = scenarios(args.quick, args.seconds)
    if args.only:
        plan = [s for s in plan if s.name in args.only.split(",")]

    load_at_start = round(os.getloadavg()[0], 2)
    print("model alone, input path alone ...", flush=True)
    sizes = (1, 16) if args.quick else (1, 2, 4, 8, 16, 32, 64)
    seconds = 0.3 if args.quick else 2.0
    model = {
        "one_thread": model_throughput.measure(checkpoint, sizes, seconds, torch_threads=1),
        "all_cores": model_throughput.measure(checkpoint, sizes, seconds, torch_threads=os.cpu_count() or 1),
        "input_path_one_thread": model_throughput.input_path(checkpoint, seconds),
    }
    for key in ("one_thread", "all_cores"):
        print(f"  model, {key}: best {model[key]['best_samples_per_s']}/s at batch {model[key]['best_batch_size']}", flush=True)
    print(f"  input path, one thread: {model['input_path_one_thread']['observations_per_s']}/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        factories = {
            "direct": lambda: direct(free_port(), checkpoint),
            "serve_default": lambda: ray_serve("serve_default", free_port(), free_port(), USER_CONFIG, work, standard_proxy=True),
            "serve_haproxy": lambda: ray_serve("serve_haproxy", free_port(), free_port(), USER_CONFIG, work),
            "serve_haproxy_1replica": lambda: ray_serve("serve_haproxy_1replica", free_port(), free_port(), USER_CONFIG, work,
                                                        deployment={"num_replicas": 1}),
        }
        servers = [factories[name]() for name in args.servers.split(",")]
        results = run_side_by_side(servers, plan, work, warmup_s=0.5 if args.quick else 2.0)
    report = {"environment": {**environment(), "load_average_1m_at_start": load_at_start}, "settings": {"user_config": USER_CONFIG, "quick": args.quick},
              "model_alone": model, "servers": results, "targets": targets(results, model)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(report["targets"], indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
