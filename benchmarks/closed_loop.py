"""Closed-loop evaluation: the simulated robot does its task through the whole served stack.

    python -m benchmarks.closed_loop                  # 20 seeded episodes per condition (~15 min)
    python -m benchmarks.closed_loop --episodes 3     # a quick look
    python -m benchmarks.closed_loop --address 127.0.0.1:50051   # use an app that is already running

SimRobot (sim/robot.py, real time) -> robot_client's ControlLoop and PolicyClient
(unary gRPC) -> Serve's gRPC proxy -> RobotPolicy replica -> back, for the bundled
demo checkpoint, with 0, 50 and 150 ms of added latency each way (injected in the
client's channel, sim/network_delay.py), under synchronous and asynchronous chunk
execution (sim/episode.py). The same arm as a ROS 2 robot (sim/ros2_sim.py on DDS over
loopback, driven through robot_client's Ros2Robot configured by sim/reacher_ros2.yaml, safety
layer included) plays the same episodes at 0 and 150 ms (`--ros2_delays`). The scripted expert
and a random policy play the same seeded episodes in simulated time (no network) for reference.

Writes benchmarks/results/closed_loop.json and closed_loop.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.run import environment, free_port
from benchmarks.servers import REPO_ROOT, ray_serve
from sim.agents import ExpertAgent, RandomAgent, run_sim_episodes
from sim.episode import EXECUTIONS, ROS2_ROBOT_YAML, Episodes, ros2_robot, run_episode
from sim.network_delay import DelayedPolicyClient
from sim.robot import SimRobot
from sim.scene import CONTROL_DT, EPISODE_TICKS, SUCCESS_HOLD_TICKS, SUCCESS_RADIUS, TARGETS_PER_EPISODE

RESULTS = REPO_ROOT / "benchmarks" / "results"
FIRST_SEED = 10_000  # evaluation seeds; training demonstrations use seeds 0..episodes-1
USER_CONFIG = {"max_batch_size": 16, "batch_wait_timeout_s": 0.002}
PORTS = {"sim": "SimRobot, in process", "ros2": "ROS 2 topics (Ros2Robot)"}


def task_definition() -> dict:
    return {
        "env": "gymnasium Reacher-v5, frame_skip 4",
        "control_hz": round(1 / CONTROL_DT, 3),
        "episode_s": EPISODE_TICKS * CONTROL_DT,
        "targets_per_episode": TARGETS_PER_EPISODE,
        "success": (f"all {TARGETS_PER_EPISODE} targets reached in turn within {EPISODE_TICKS * CONTROL_DT:g} s; a target "
                    f"is reached when the fingertip stays within {SUCCESS_RADIUS} m of it for {SUCCESS_HOLD_TICKS} ticks"),
        "policy_input": "2 cameras 96x96 (JPEG q90) + joint cos/sin/velocity; no target position",
    }


def served_condition(address: str, seeds: list[int], delay_ms: float, execution: str, robot,
                     sim: Episodes | None = None, port: str = "sim") -> dict:
    """Episodes of one condition; robot: the port the loop drives, sim: what runs the episodes (default: robot)."""
    client = DelayedPolicyClient(address, delay_ms=delay_ms, timeout_s=10.0, mode="unary")  # delay: unary only
    episodes = []
    try:
        client.wait_ready(60.0)
        run_episode(robot, client, seeds[0], execution, episodes=sim)  # warm-up: first-call costs (not scored)
        for seed in seeds:
            record, stats = run_episode(robot, client, seed, execution, episodes=sim)
            episodes.append({
                "seed": seed, "success": record.success, "targets": record.reached,
                "reached_at_s": [round(t * CONTROL_DT, 2) for t in record.reached_at],
                "ticks": stats["ticks"], "starved": stats["starved"], "held_ticks": stats["held_ticks"],
                "latency_ms_p50": stats["latency_ms"]["p50"], "late_physics_ticks": record.late_ticks,
                "safety": stats["safety"],
            })
    finally:
        client.close()
    ticks = sum(e["ticks"] for e in episodes)
    latencies = [e["latency_ms_p50"] for e in episodes if np.isfinite(e["latency_ms_p50"])]
    safety = sum((Counter(e["safety"]) for e in episodes), Counter())
    summary = {
        "port": port, "delay_ms_each_way": delay_ms, "execution": execution,
        "success_rate": float(np.mean([e["success"] for e in episodes])),
        "mean_targets": float(np.mean([e["targets"] for e in episodes])),
        "starvation": sum(e["starved"] for e in episodes) / max(1, ticks),  # ticks with no fresh action / ticks
        "round_trip_ms_p50": float(np.median(latencies)) if latencies else float("nan"),
        "late_physics_ticks": sum(e["late_physics_ticks"] for e in episodes),
        "safety_ticks": dict(safety),  # ticks the safety layer changed a command, by kind (robot_client/safety.py)
        "episodes": episodes,
    }
    logging.getLogger("closed_loop").warning(
        "served %s %s %3.0f ms: success %.0f%%, %.2f targets, starvation %.0f%%, round trip p50 %.0f ms",
        port, execution, delay_ms, 100 * summary["success_rate"], summary["mean_targets"], 100 * summary["starvation"],
        summary["round_trip_ms_p50"])
    return summary


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for port, color in (("sim", "C0"), ("ros2", "C1")):
        for execution, style in zip(EXECUTIONS, ("o-", "s--")):
            rows = sorted((r for r in results["served"] if r["execution"] == execution and r.get("port", "sim") == port),
                          key=lambda r: r["delay_ms_each_way"])
            if not rows:
                continue
            delays = [r["delay_ms_each_way"] for r in rows]
            label = f"{'ROS 2' if port == 'ros2' else 'SimRobot'}, {execution}"
            ax_s.plot(delays, [100 * r["success_rate"] for r in rows], style, color=color, label=label)
            ax_t.plot(delays, [100 * r["starvation"] for r in rows], style, color=color, label=label)
    ax_s.axhline(100 * results["expert"]["success_rate"], color="green", lw=1, ls=":", label="expert (no network)")
    ax_s.axhline(100 * results["random"]["success_rate"], color="grey", lw=1, ls=":", label="random (no network)")
    ax_s.set(xlabel="added latency each way (ms)", ylabel="episodes succeeded (%)", ylim=(-5, 105), title="task success")
    ax_t.set(xlabel="added latency each way (ms)", ylabel="control ticks without a fresh action (%)", ylim=(0, None),
             title="starvation")
    for ax in (ax_s, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Reacher-v5 through the served stack, {results['episodes']} seeded episodes per point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.closed_loop", description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--delays", default="0,50,150", help="added latency each way, ms, comma-separated")
    p.add_argument("--ros2_delays", default="0,150", help="the same over ROS 2 topics; empty: none")
    p.add_argument("--address", default=None, help="an app already serving the checkpoint (default: start one)")
    p.add_argument("--out", type=Path, default=RESULTS / "closed_loop.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    seeds = list(range(FIRST_SEED, FIRST_SEED + args.episodes))
    delays = [float(d) for d in args.delays.split(",")]
    started = time.monotonic()
    results = {"environment": environment(), "task": task_definition(), "episodes": args.episodes, "seeds": seeds,
               "checkpoint": str(REPO_ROOT / "checkpoints" / "demo")}
    for name, agent in (("expert", ExpertAgent()), ("random", RandomAgent(seed=0))):
        outcome = run_sim_episodes(agent, seeds)
        results[name] = {"success_rate": outcome.success_rate, "mean_targets": outcome.mean_targets,
                         "targets": outcome.targets_reached}
        print(f"{name}: {outcome}")
    server = None
    with tempfile.TemporaryDirectory(prefix="closed_loop_") as work:
        try:
            address = args.address
            if address is None:
                server = ray_serve("closed_loop_app", free_port(), free_port(), USER_CONFIG, Path(work))
                server.start(Path(work))
                address = server.address
            robot = SimRobot()
            try:
                results["served"] = [served_condition(address, seeds, d, ex, robot) for d in delays for ex in EXECUTIONS]
            finally:
                robot.close()
            ros2_delays = [float(d) for d in args.ros2_delays.split(",") if d.strip()]
            if ros2_delays:
                results["ros2_robot"] = ROS2_ROBOT_YAML.read_text()
                results["served"] += ros2_conditions(address, seeds, ros2_delays)
        finally:
            if server is not None:
                server.stop()
    results["wall_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(table(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {results['wall_s']:.0f} s")


def ros2_conditions(address: str, seeds: list[int], delays: list[float]) -> list[dict]:
    """The ROS 2 rows: the sim node and robot_client's ROS 2 port, in this process, on loopback DDS."""
    closing = []
    try:
        robot, sim = ros2_robot(closing)
        return [served_condition(address, seeds, d, ex, robot, sim, "ros2") for d in delays for ex in EXECUTIONS]
    finally:
        for thing in reversed(closing):
            thing.close()


def table(results: dict) -> str:
    lines = ["| policy | robot port | execution | added latency each way | success | targets / 3 | starvation | "
             "round trip p50 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("expert", "random"):
        r = results[name]
        lines.append(f"| {name} (in simulation, no network) | - | every tick | - | {r['success_rate']:.0%} | "
                     f"{r['mean_targets']:.2f} | - | - |")
    for r in results["served"]:
        lines.append(f"| served demo checkpoint | {PORTS[r.get('port', 'sim')]} | {r['execution']} | "
                     f"{r['delay_ms_each_way']:.0f} ms | {r['success_rate']:.0%} | {r['mean_targets']:.2f} | "
                     f"{r['starvation']:.0%} | {r['round_trip_ms_p50']:.0f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("MUJOCO_GL", "egl")
    main()
