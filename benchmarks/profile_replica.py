"""Profile the replica's hot path under load with py-spy.

    python -m benchmarks.profile_replica [--seconds 15] [--robots 16] [--mode stream]

Starts our app as the README does (HAProxy ingress), drives closed-loop robots
at it, records one replica process with py-spy, and writes the functions with the most samples
(self and inclusive) to benchmarks/results/profile_replica.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import tempfile
from pathlib import Path

from benchmarks.robots import Scenario, play, summarize
from benchmarks.run import USER_CONFIG, free_port
from benchmarks.servers import REPO_ROOT, ray_serve

OUT = REPO_ROOT / "benchmarks" / "results" / "profile_replica.txt"


def top_frames(collapsed: Path, n: int = 25) -> str:
    self_counts, incl_counts, total = collections.Counter(), collections.Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        c = int(count)
        total += c
        self_counts[frames[-1]] += c
        for f in set(frames):
            incl_counts[f] += c
    lines = [f"total samples: {total}", "", "self time:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in self_counts.most_common(n)]
    lines += ["", "inclusive time:"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in incl_counts.most_common(n)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--robots", type=int, default=16)
    parser.add_argument("--mode", default="stream")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = ray_serve("profile", free_port(), free_port(), USER_CONFIG, work)
        server.start(work)
        try:
            collapsed = work / "replica.collapsed"
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.replica_process().pid), "--duration", str(int(args.seconds)),
                                    "--format", "raw", "--threads", "--nonblocking", "--output", str(collapsed)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            scenario = Scenario(robots=args.robots, mode=args.mode, loop="closed", seconds=args.seconds + 1)
            logs, wall = asyncio.run(play(server.address, scenario))
            spy.wait(timeout=60)
            summary = summarize(logs, wall)
            report = f"load: {scenario.name}, {summary['throughput_per_s']}/s, p50 {summary['latency_ms']['p50']} ms, " \
                     f"batch {summary['batch_size']}\n\n" + top_frames(collapsed)
        finally:
            server.stop()
    OUT.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
