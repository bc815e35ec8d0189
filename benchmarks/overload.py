"""Overload: paced robots with 100 ms deadlines at 1x and 2x what one replica serves, FIFO against deadline-aware.

    python -m benchmarks.overload           # full run (~5 min): benchmarks/results/overload.json
    python -m benchmarks.overload --quick   # seconds per case; proves the harness works (CI runs it)

The model is a visuomotor_chunk checkpoint made larger than the bundled demo
(untrained, seeded weights: only its timing matters), so that the forward pass,
not Serve, is the bottleneck. Two servers run it side by side, one replica each
on one torch thread, the same but for user_config `scheduling`: "fifo" or
"deadline". First closed-loop robots measure what one replica serves (C).
Then paced robots tick at CONTROL_HZ on one stream each; at a tick with nothing
in flight a robot sends an observation that needs its chunk within
DEADLINE_MS (time_to_starvation_ms). A chunk back in time is good; a late one,
a dropped one (in-band DEADLINE_EXCEEDED) and a tick skipped while waiting are
missed deadlines. A tick lasts as long as the deadline, so a robot served in
time never skips one, and robots x CONTROL_HZ is the load offered; a robot that
waits longer sends less (one observation in flight): `sent_per_s` says what
the servers were really asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks import model_throughput
from benchmarks.robots import RobotLog, Scenario, play, summarize
from benchmarks.run import RESULTS, all_up, environment
from benchmarks.servers import ResourceMeter, ServerUnderTest, ray_serve
from scripts.make_demo_checkpoint import make_demo
from testbed.cluster_ports import free_port

# Two 224x224 cameras through a wider CNN: about 20-25 ms a pass at batch 1 on one thread here,
# growing about linearly with the batch (a CPU has no idle lanes to fill).
MODEL = {"resolution": (224, 224), "conv_channels": (48, 96, 128, 128)}
DEADLINE_MS = 100.0
CONTROL_HZ = 1e3 / DEADLINE_MS
LOADS = (1.0, 2.0)  # offered load, in multiples of the capacity C
SCHEDULING = ("fifo", "deadline")  # the order each load runs in
USER_CONFIG = {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}  # as in serve_config.yaml
REPLICA_ARGS = {"torch_threads": 1}  # one core for the model, like the measurement of it alone
# Closed-loop robots that saturate the replica. Passes of 8-16 serve fewer chunks/s than passes
# of 1-4 here, so C is the best of both: "2x" is twice what the replica serves at its best.
CAPACITY_ROBOTS = (4, 16)


@dataclass(frozen=True)
class Plan:
    case_s: float  # each paced case (one load, one server)
    capacity_s: float
    warmup_s: float
    model_s: float  # timing the model alone, per batch size
    batch_sizes: tuple[int, ...]


FULL = Plan(case_s=20.0, capacity_s=8.0, warmup_s=2.0, model_s=2.0, batch_sizes=(1, 2, 4, 8, 16))
QUICK = Plan(case_s=2.0, capacity_s=2.0, warmup_s=0.5, model_s=0.3, batch_sizes=(1, 4))


def paced(robots: int, seconds: float) -> Scenario:
    return Scenario(robots=robots, mode="stream", loop="paced", seconds=seconds, control_hz=CONTROL_HZ,
                    ticks_per_chunk=1, deadline_ms=DEADLINE_MS, phases=robots)


def deadline_row(logs: list[RobotLog], wall_s: float, scenario: Scenario) -> dict:
    """summarize()'s row, plus what the deadlines made of it."""
    row = summarize(logs, wall_s)
    latencies = np.array([x for log in logs for x in log.latencies_ms])
    queue = np.array([x for log in logs for x in log.queue_times_ms])
    good = int((latencies <= DEADLINE_MS).sum())
    sent = row["deadlines"] - row["skipped_ticks"]
    missed = {"late": row["requests"] - good, "dropped": row["dropped"], "skipped_ticks": row["skipped_ticks"]}
    return {
        **row,
        "robots": scenario.robots,
        "offered_per_s": round(scenario.robots * CONTROL_HZ, 2),
        "sent_per_s": round(sent / wall_s, 2),
        "goodput_per_s": round(good / wall_s, 2),
        "good": good,
        "missed_deadlines": sum(missed.values()),  # summarize() counts no drops
        "missed": missed,
        "queue_ms": {f"p{q}": round(float(np.percentile(queue, q)), 2) for q in (50, 99)} if queue.size else None,
    }


def measure(server: ServerUnderTest, scenario: Scenario) -> dict:
    meter = ResourceMeter(server)
    logs, wall = asyncio.run(play(server.address, scenario))
    return {**deadline_row(logs, wall, scenario), "server": meter.read()}


def run(servers: dict[str, ServerUnderTest], work: Path, plan: Plan) -> dict:
    with all_up(list(servers.values()), work, plan.warmup_s):
        capacity = {}
        for robots in CAPACITY_ROBOTS:
            closed = Scenario(robots=robots, mode="stream", loop="closed", seconds=plan.capacity_s)
            capacity[robots] = row = measure(servers["deadline"], closed)
            print(f"capacity, {robots} closed-loop streams: {row['throughput_per_s']}/s, batch {row['batch_size']}, "
                  f"p50 {row['latency_ms']['p50']} ms", flush=True)
        c = max(row["throughput_per_s"] for row in capacity.values())
        loads = {}
        for load in LOADS:
            robots = max(1, round(load * c / CONTROL_HZ))
            rows = {name: measure(servers[name], paced(robots, plan.case_s)) for name in SCHEDULING}
            fifo, deadline = rows["fifo"]["goodput_per_s"], rows["deadline"]["goodput_per_s"]
            loads[f"{load:g}x"] = {"robots": robots, "offered_x_capacity": round(robots * CONTROL_HZ / c, 2), **rows,
                                   "goodput_deadline_over_fifo": round(deadline / fifo, 2) if fifo else None}
            for name in SCHEDULING:
                print_row(f"{load:g}x", name, rows[name])
    return {"capacity": {"chunks_per_s": c, "by_robots": capacity}, "loads": loads}


def print_row(load: str, name: str, row: dict) -> None:
    lat, batch, missed = row["latency_ms"], row["batch_size"] or {}, row["missed"]
    print(f"  {load:4s} {name:8s} robots {row['robots']:3d}  offered {row['offered_per_s']:6.1f}/s  "
          f"sent {row['sent_per_s']:6.1f}/s  goodput {row['goodput_per_s']:6.1f}/s  "
          f"throughput {row['throughput_per_s']:6.1f}/s  late {missed['late']:4d}  dropped {missed['dropped']:4d}  "
          f"skipped {missed['skipped_ticks']:4d}  p50 {lat['p50']} p99 {lat['p99']} ms  batch {batch.get('mean')}  "
          f"err {row['errors']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or RESULTS / ("overload_quick.json" if args.quick else "overload.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    load_at_start = round(os.getloadavg()[0], 2)
    configs = {name: {**USER_CONFIG, "scheduling": name} for name in SCHEDULING}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = make_demo(work / "checkpoint", seed=0, **MODEL)
        print("model alone, one thread (untrained weights: timing only) ...", flush=True)
        model = model_throughput.measure(checkpoint, plan.batch_sizes, plan.model_s, torch_threads=1)
        passes = ", ".join(f"{b}: {r['ms_per_batch']}" for b, r in model["by_batch_size"].items())
        print(f"  ms per pass by batch size: {passes}", flush=True)
        servers = {name: ray_serve(f"overload_{name}", free_port(), free_port(), config, work,
                                   deployment={"num_replicas": 1}, checkpoint=checkpoint, extra_args=REPLICA_ARGS)
                   for name, config in configs.items()}
        results = run(servers, work, plan)
    report = {
        "environment": {**environment(), "load_average_1m_at_start": load_at_start},
        "settings": {"model": MODEL, "weights": "untrained (seeded): timing only", **REPLICA_ARGS, "replicas": 1,
                     "user_config": configs, "capacity_robots": CAPACITY_ROBOTS, "deadline_ms": DEADLINE_MS,
                     "control_hz": CONTROL_HZ, "loads": LOADS, "plan": asdict(plan), "quick": args.quick},
        "model_alone": model,
        **results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    ratios = {load: case["goodput_deadline_over_fifo"] for load, case in results["loads"].items()}
    print(f"goodput, deadline / fifo: {json.dumps(ratios)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
