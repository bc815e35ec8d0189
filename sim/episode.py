"""One closed-loop episode through a running app: SimRobot -> robot_client -> gRPC -> policy -> back.

    python -m sim.episode --server_address 127.0.0.1:50051 [--seed 0] [--execution async|sync] [--delay_ms 0]
        [--port sim|ros2]

--port ros2 runs the same arm as a ROS 2 robot (sim/ros2_sim.py) driven through robot_client's
Ros2Robot as configured by sim/reacher_ros2.yaml, both in this process, DDS on loopback.

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
import threading
from pathlib import Path
from typing import Protocol

from robot_client.chunk_executor import ChunkExecutor
from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.policy_client import PolicyClient
from robot_client.robot import RobotPort
from sim.network_delay import DelayedPolicyClient
from sim.robot import EpisodeRecord, SimRobot
from sim.scene import CONTROL_DT

PROMPT = "reach the red ball"
ROS2_ROBOT_YAML = Path(__file__).resolve().parent / "reacher_ros2.yaml"  # robot_client's config for the ROS 2 sim
EXECUTIONS = ("async", "sync")
MAX_CHUNK_AGE_S = 1.0  # answers are used up to this old: at 150 ms each way a round trip is ~0.32 s


class SyncChunkExecutor(ChunkExecutor):
    """Ask only when the plan has run out, and send no prefix (nothing runs while we wait)."""

    def should_request(self, tick: int) -> bool:
        return self.in_flight is None and self.remaining(tick) == 0


def make_loop(robot: RobotPort, client: PolicyClient, execution: str, prompt: str = PROMPT) -> ControlLoop:
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    config = LoopConfig(prompt=prompt, control_frequency=1.0 / CONTROL_DT, max_chunk_age_s=MAX_CHUNK_AGE_S,
                        stats_interval_s=3600.0)
    loop = ControlLoop(robot, client, client.spec, config)
    if execution == "sync":
        loop.executor = SyncChunkExecutor(dataclasses.replace(loop.executor.config, max_delay=0))
    return loop


class Episodes(Protocol):
    """What runs the episodes: SimRobot itself, or ReacherRos2Sim behind a ROS 2 robot port."""

    ticks: int
    control_dt: float
    episode_over: threading.Event

    def reset(self, seed: int) -> None: ...

    def start(self) -> None: ...

    def wait(self, timeout_s: float | None = None) -> EpisodeRecord: ...


def run_episode(robot: RobotPort, client: PolicyClient, seed: int, execution: str = "async",
                prompt: str = PROMPT, episodes: Episodes | None = None) -> tuple[EpisodeRecord, dict]:
    """Play one seeded episode in real time; returns the task record and the loop's stats.

    robot: the port the control loop drives; episodes: what resets, starts and scores the
    task (default: the robot itself, a SimRobot).
    """
    episodes = robot if episodes is None else episodes
    if not client.spec.advertised:
        client.wait_ready(30.0)
    episodes.reset(seed)
    loop = make_loop(robot, client, execution, prompt)
    episodes.start()
    stats = loop.run(duration_s=episodes.ticks * episodes.control_dt + 5.0, stop=episodes.episode_over)
    return episodes.wait(timeout_s=5.0), stats.summary()


def ros2_robot(closing: list):
    """The sim node and a Ros2Robot for it (sim/reacher_ros2.yaml), appended to `closing` as made."""
    from testbed.ros2_env import keep_ros_on_loopback

    keep_ros_on_loopback()  # before rclpy starts: an example's DDS traffic stays on this machine
    from robot_client.ros2_node import Ros2Config, Ros2Robot
    from sim.ros2_sim import ReacherRos2Sim

    sim = ReacherRos2Sim()
    closing.append(sim)
    robot = Ros2Robot(Ros2Config.from_yaml(ROS2_ROBOT_YAML))
    closing.append(robot)
    return robot, sim


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.episode", description=__doc__.splitlines()[0])
    p.add_argument("--server_address", default="127.0.0.1:50051")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--execution", choices=EXECUTIONS, default="async")
    p.add_argument("--delay_ms", type=float, default=0.0, help="added network latency each way")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--port", choices=("sim", "ros2"), default="sim",
                   help="the robot port: SimRobot in process, or the sim as a ROS 2 robot over loopback DDS")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = DelayedPolicyClient(args.server_address, delay_ms=args.delay_ms, timeout_s=args.timeout)
    closing = []
    try:
        if args.port == "ros2":
            robot, episodes = ros2_robot(closing)
        else:
            robot = episodes = SimRobot()
            closing.append(robot)
        spec = client.wait_ready(args.timeout)
        print(f"server {args.server_address}: {spec.describe()}")
        record, stats = run_episode(robot, client, args.seed, args.execution, episodes=episodes)
    finally:
        for thing in reversed(closing):
            thing.close()
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
