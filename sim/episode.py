"""One closed-loop episode through a running app: SimRobot -> robot_client -> gRPC -> policy -> back.

    python -m sim.episode --server_address 127.0.0.1:50051 [--seed 0] [--execution async|sync] [--delay_ms 0]

Execution of action chunks, as in the async-inference literature (LeRobot, openpi):
- async: robot_client's own control loop. It asks for the next chunk while the
  current one still runs (when the rows left fall to the expected latency plus
  a margin), so the arm keeps moving while a request is in flight.
- sync: request, wait, execute the whole chunk, request again. The arm
  gets no new command while a request is in flight (it keeps its last torque
  for the watchdog's three periods, then holds its pose).
In both the simulation runs in wall-clock time, so latency costs task time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from robot_client.chunk_executor import ChunkExecutor
from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.policy_client import PolicyClient
from sim.network_delay import DelayedPolicyClient
from sim.robot import EpisodeRecord, SimRobot
from sim.scene import CONTROL_DT

PROMPT = "reach the red ball"
EXECUTIONS = ("async", "sync")
MAX_CHUNK_AGE_S = 1.0  # answers are used up to this old: at 150 ms each way a round trip is ~0.32 s


class SyncChunkExecutor(ChunkExecutor):
    """Ask only when the plan has run out, and send no prefix (nothing runs while we wait)."""

    def should_request(self, tick: int) -> bool:
        return self.in_flight is None and self.remaining(tick) == 0


def make_loop(robot: SimRobot, client: PolicyClient, execution: str, prompt: str = PROMPT) -> ControlLoop:
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    config = LoopConfig(prompt=prompt, control_frequency=1.0 / CONTROL_DT, max_chunk_age_s=MAX_CHUNK_AGE_S,
                        stats_interval_s=3600.0)
    loop = ControlLoop(robot, client, client.spec, config)
    if execution == "sync":
        loop.executor = SyncChunkExecutor(dataclasses.replace(loop.executor.config, max_delay=0))
    return loop


def run_episode(robot: SimRobot, client: PolicyClient, seed: int, execution: str = "async",
                prompt: str = PROMPT) -> tuple[EpisodeRecord, dict]:
    """Play one seeded episode in real time; returns the task record and the loop's stats."""
    if not client.spec.advertised:
        client.wait_ready(30.0)
    robot.reset(seed)
    loop = make_loop(robot, client, execution, prompt)
    robot.start()
    stats = loop.run(duration_s=robot.ticks * robot.control_dt + 5.0, stop=robot.episode_over)
    return robot.wait(timeout_s=5.0), stats.summary()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.episode", description=__doc__.splitlines()[0])
    p.add_argument("--server_address", default="127.0.0.1:50051")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--execution", choices=EXECUTIONS, default="async")
    p.add_argument("--delay_ms", type=float, default=0.0, help="added network latency each way")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = DelayedPolicyClient(args.server_address, delay_ms=args.delay_ms, timeout_s=args.timeout)
    robot = SimRobot()
    try:
        spec = client.wait_ready(args.timeout)
        print(f"server {args.server_address}: {spec.describe()}")
        record, stats = run_episode(robot, client, args.seed, args.execution)
    finally:
        robot.close()
        client.close()
    print(json.dumps({
        "seed": args.seed, "execution": args.execution, "delay_ms": args.delay_ms,
        "success": record.success, "targets_reached": record.reached, "of": record.targets,
        "reached_at_s": [round(t * CONTROL_DT, 2) for t in record.reached_at], "ticks": record.ticks,
        "starved_ticks": stats["starved"], "loop_ticks": stats["ticks"], "latency_ms_p50": round(stats["latency_ms"]["p50"], 1),
    }, indent=2))
    print("SUCCESS: every target reached" if record.success else f"FAILED: {record.reached}/{record.targets} targets")
    return 0 if record.success else 1


if __name__ == "__main__":
    sys.exit(main())
