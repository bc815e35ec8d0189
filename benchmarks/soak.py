"""Soak: 16 closed-loop streams for 10 minutes; errors and the replica's memory over time.

    python -m benchmarks.soak [--minutes 10] [--robots 16] [--ingress haproxy|standard]

The app runs as the README starts it (serve_config.yaml: its replica count,
the throughput-optimised ingress unless --ingress standard). Every replica's
RSS is sampled every window; growth is measured from the end of the first
minute (allocators and caches settle) to the end, per replica, and the worst
replica is reported. Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from benchmarks.robots import Scenario, play, summarize
from benchmarks.run import USER_CONFIG, environment, free_port
from benchmarks.servers import REPO_ROOT, ray_serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--robots", type=int, default=16)
    parser.add_argument("--window_s", type=float, default=30.0)
    parser.add_argument("--ingress", choices=("haproxy", "standard"), default="haproxy")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args()
    windows = max(2, round(args.minutes * 60 / args.window_s))
    samples, errors, requests = [], {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        server = ray_serve(f"soak_{args.ingress}", free_port(), free_port(), USER_CONFIG, Path(tmp),
                           standard_proxy=args.ingress == "standard")
        server.start(Path(tmp))
        try:
            for w in range(windows):
                scenario = Scenario(robots=args.robots, mode="stream", loop="closed", seconds=args.window_s)
                row = summarize(*asyncio.run(play(server.address, scenario)))
                requests += row["requests"]
                for k, v in row["errors"].items():
                    errors[k] = errors.get(k, 0) + v
                samples.append({"t_s": round((w + 1) * args.window_s), "replica_rss_mib": [round(p.memory_info().rss / 2**20, 1) for p in server.replica_processes()],
                                "throughput_per_s": row["throughput_per_s"], "p99_ms": row["latency_ms"]["p99"]})
                print(samples[-1], flush=True)
        finally:
            server.stop()
    settle = min(range(len(samples)), key=lambda i: abs(samples[i]["t_s"] - 60))
    growth = [(last - base) / base * 100 for base, last in zip(samples[settle]["replica_rss_mib"], samples[-1]["replica_rss_mib"])]
    report = {
        "environment": environment(), "ingress": args.ingress, "robots": args.robots, "minutes": args.minutes,
        "requests": requests, "errors": errors, "replica_rss_growth_pct_after_1min": round(max(growth), 2),
        "samples": samples,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "samples" and k != "environment"}, indent=2))


if __name__ == "__main__":
    main()
