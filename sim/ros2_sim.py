"""ReacherRos2Sim: the simulated Reacher as a ROS 2 robot, as a ros2_control robot looks from outside.

    python -m sim.ros2_sim [--episodes N] [--seed S] [--sim_time] [--ticks T] [--ros-args ...]

Each episode starts at the first command after its reset; one JSON line per episode on stdout.
ROS arguments work as for any node (`--ros-args -r __ns:=/arm1` puts every topic but /clock under
/arm1).

Out, after every physics tick and with one header.stamp (when the state was sampled):
  /joint_states                            sensor_msgs/JointState   (joint_state_broadcaster)
  /{top,oblique}_camera/image_raw          sensor_msgs/Image, rgb8  (a camera driver)
  /{top,oblique}_camera/image_raw/compressed  sensor_msgs/CompressedImage, JPEG (image_transport)
  /clock                                   rosgraph_msgs/Clock      (with sim_time: time starts at
                                           1000 s, one control period per tick, never reset)
In, the three controllers a ros2_control arm is commonly run with (the latest command wins):
  /forward_position_controller/commands    std_msgs/Float64MultiArray [q0, q1]
  /forward_velocity_controller/commands    std_msgs/Float64MultiArray [v0, v1], kept until replaced
  /joint_trajectory_controller/joint_trajectory  trajectory_msgs/JointTrajectory

While the physics is paused (after a reset, after an episode) the frozen state is republished at
the control rate, as a robot standing still keeps publishing: sensor topics are volatile, so a
client started after the reset would otherwise never see a frame, and one that keeps its data
fresh would not dare to send the command that starts the episode.

The node has its own rclpy Context and executor thread, so it can share a process with client
nodes. The physics, rendering and publishing run on SimRobot's physics thread.
"""

from __future__ import annotations

import argparse
import array
import io
import json
import signal
import sys
import threading

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from PIL import Image as PILImage
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rclpy.utilities import remove_ros_args
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory

from sim.robot import Command, EpisodeRecord, JointGoal, Sample, SimRobot
from sim.scene import CAMERAS, CONTROL_DT, EPISODE_TICKS

JOINT_NAMES = ("joint0", "joint1")  # Reacher-v5's own names: shoulder (continuous), elbow
# Relative names, so a namespace moves them all; /clock is one per ROS graph.
POSITION_TOPIC = "forward_position_controller/commands"
VELOCITY_TOPIC = "forward_velocity_controller/commands"
TRAJECTORY_TOPIC = "joint_trajectory_controller/joint_trajectory"
COMPRESSED_FORMAT = "rgb8; jpeg compressed bgr8"  # image_transport's name: rgb8 source, standard JPEG
SIM_TIME_START_NS = 1000 * 10**9  # far from wall time: a client not on sim time sees every stamp as stale


# --- the controllers' commands ------------------------------------------------


class Velocity(Command):
    """forward_velocity_controller: the goal moves v*dt a tick for as long as nothing replaces it."""

    name = "velocity"

    def __init__(self, velocity, dt: float):
        self._step = np.array(velocity, np.float64) * dt

    def goal(self, t, q, previous):
        return (q if previous is None else previous) + self._step, self.name


class Trajectory(Command):
    """joint_trajectory_controller: positions interpolated linearly in time from `start_s` on.

    Before its start the command it replaced goes on; from then on the goal runs from
    that command's goal at the start time to point 0, then from point to point, and
    holds the last one.
    """

    name = "trajectory"

    def __init__(self, start_s: float, times_s, positions):
        self.start_s = start_s
        self._times = np.array([0.0, *times_s])
        self._points = np.array([np.zeros(len(JOINT_NAMES)), *positions], np.float64)  # row 0: set at the start
        self._before: Command | None = None
        self._begun = False

    @property
    def end_s(self) -> float:
        return self.start_s + self._times[-1]

    def replaces(self, previous: Command) -> None:
        self._before = previous

    def goal(self, t, q, previous):
        if t < self.start_s:
            return self._before.goal(t, q, previous)
        if not self._begun:
            start = np.array(self._before.goal(self.start_s, q, previous)[0], np.float64)
            # The shoulder turns freely: start from the turn nearest point 0, so the arm does
            # not unwind whole turns (ros2_control does the same for continuous joints).
            start[0] += 2 * np.pi * np.round((self._points[1, 0] - start[0]) / (2 * np.pi))
            self._points[0], self._before, self._begun = start, None, True
        u = t - self.start_s
        return np.array([np.interp(u, self._times, self._points[:, j]) for j in range(len(JOINT_NAMES))]), self.name


def seconds(stamp) -> float:
    """builtin_interfaces Time or Duration -> seconds, rounded as the clocks' nanoseconds are."""
    return (stamp.sec * 10**9 + stamp.nanosec) / 1e9


def joint_values(data, what: str) -> np.ndarray:
    values = np.asarray(data, np.float64)
    if values.shape != (len(JOINT_NAMES),) or not np.all(np.isfinite(values)):
        raise ValueError(f"{what} needs {len(JOINT_NAMES)} finite values {list(JOINT_NAMES)}, got {list(data)}")
    return values


def trajectory_command(msg: JointTrajectory, now_s: float) -> Command | None:
    """A JointTrajectory -> the command it asks for (None: no points, stop and hold); ValueError if refused."""
    names = list(msg.joint_names)
    if sorted(names) != sorted(JOINT_NAMES):
        raise ValueError(f"joint_names {names}: this arm takes exactly {list(JOINT_NAMES)}, each once")
    if not msg.points:
        return None
    order = [names.index(j) for j in JOINT_NAMES]
    times = [seconds(p.time_from_start) for p in msg.points]
    positions = [joint_values(p.positions, f"point {i}'s positions")[order] for i, p in enumerate(msg.points)]
    if times[0] < 0 or any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"time_from_start must be >= 0 and strictly increasing, got {times}")
    stamp = seconds(msg.header.stamp)
    trajectory = Trajectory(stamp if stamp > 0 else now_s, times, positions)  # zero stamp: start now
    if trajectory.end_s < now_s:
        raise ValueError(f"trajectory starts at {stamp:.3f} s and ended before now ({now_s:.3f} s)")
    return trajectory


# --- clocks ---------------------------------------------------------------------


class SimClock:
    """Simulated time: moves only when the physics ticks, and never goes back (not even at a reset)."""

    def __init__(self, start_ns: int = SIM_TIME_START_NS):
        self._ns = start_ns

    def now_ns(self) -> int:
        return self._ns

    def advance(self, dt: float) -> None:
        self._ns += round(dt * 1e9)


class NodeClock:
    """The node's ROS clock (wall time): it runs by itself."""

    def __init__(self, node: Node):
        self._clock = node.get_clock()

    def now_ns(self) -> int:
        return self._clock.now().nanoseconds

    def advance(self, dt: float) -> None:
        pass


def stamp_msg(ns: int) -> Time:
    return Time(sec=ns // 10**9, nanosec=ns % 10**9)


# --- the node -------------------------------------------------------------------------


class ReacherRos2Sim:
    """The Reacher arm as a ROS 2 node: sensors out after every tick, ros2_control commands in.

    Episodes as SimRobot's: reset(seed), start() or start_on_first_command(), wait(), close().
    """

    def __init__(self, node_name: str = "reacher_sim", sim_time: bool = False, ticks: int = EPISODE_TICKS,
                 control_dt: float = CONTROL_DT, jpeg_quality: int = 90, namespace: str = "",
                 args: list[str] | None = None):
        """args: a command line for rclpy (`--ros-args ...`); None: none, not this process's sys.argv."""
        self.control_dt, self.jpeg_quality, self.sim_time = control_dt, jpeg_quality, sim_time
        self.goals = JointGoal()
        self._publish_lock = threading.Lock()  # one tick's messages go out together, never mixed with a republish
        self._latest: list | None = None  # the last tick's messages, for republishing while paused
        self._running = False  # physics started and the episode not over yet
        self.context = Context()
        rclpy.init(context=self.context, args=["ros2_sim", *(args or [])])
        self._executor: SingleThreadedExecutor | None = None
        self.robot: SimRobot | None = None
        try:
            self.node = Node(node_name, namespace=namespace or None, context=self.context)
            self.clock = SimClock() if sim_time else NodeClock(self.node)
            self._make_topics()
            self._executor = SingleThreadedExecutor(context=self.context)
            self._executor.add_node(self.node)
            self._spinner = threading.Thread(target=self._executor.spin, name=f"{node_name}-executor", daemon=True)
            self._spinner.start()
            self.robot = SimRobot(control_dt, ticks, goals=self.goals, clock=self.clock, on_sample=self._on_sample)
        except BaseException:
            self.close()
            raise

    def _make_topics(self) -> None:
        node = self.node
        self._clock_pub = node.create_publisher(Clock, "/clock", 10) if self.sim_time else None
        self._joints_pub = node.create_publisher(JointState, "joint_states", 10)
        self._camera_pubs = [
            (node.create_publisher(Image, f"{c.name}_camera/image_raw", qos_profile_sensor_data),
             node.create_publisher(CompressedImage, f"{c.name}_camera/image_raw/compressed", qos_profile_sensor_data))
            for c in CAMERAS
        ]
        self.command_topics = [
            node.create_subscription(Float64MultiArray, POSITION_TOPIC, self._on_position, 10).topic_name,
            node.create_subscription(Float64MultiArray, VELOCITY_TOPIC, self._on_velocity, 10).topic_name,
            node.create_subscription(JointTrajectory, TRAJECTORY_TOPIC, self._on_trajectory, 10).topic_name,
        ]
        node.create_timer(self.control_dt, self._republish_while_paused)

    # --- episodes (SimRobot's) ------------------------------------------------------

    @property
    def episode_over(self) -> threading.Event:
        return self.robot.episode_over

    @property
    def ticks(self) -> int:
        return self.robot.ticks

    def reset(self, seed: int, timeout_s: float = 30.0) -> None:
        """A new seeded episode: physics paused, arm holding, its first state published."""
        with self._publish_lock:
            self._running = False
        self.robot.reset(seed, timeout_s)

    def start(self) -> None:
        with self._publish_lock:
            self._running = True
        self.robot.start()

    def start_on_first_command(self, timeout_s: float | None = None) -> bool:
        """Start the physics once a command has arrived since the reset; False if none came in time."""
        if not self.goals.commanded.wait(timeout_s):
            return False
        self.start()
        return True

    def wait(self, timeout_s: float | None = None) -> EpisodeRecord:
        return self.robot.wait(timeout_s)

    def close(self) -> None:
        if self.robot is not None:
            self.robot.close()  # first: no tick publishes on a destroyed node
        if self._executor is not None:
            self._executor.shutdown()
            self._spinner.join(timeout=5)
        if hasattr(self, "node"):
            self.node.destroy_node()
        self.context.try_shutdown()

    # --- commands (executor thread) -----------------------------------------------------

    def _refuse(self, topic: str, error: ValueError) -> None:
        self.node.get_logger().warning(f"{topic}: ignored: {error}")

    def _on_position(self, msg: Float64MultiArray) -> None:
        try:
            self.goals.position(joint_values(msg.data, "a position command"))
        except ValueError as e:
            self._refuse(POSITION_TOPIC, e)

    def _on_velocity(self, msg: Float64MultiArray) -> None:
        try:
            self.goals.command(Velocity(joint_values(msg.data, "a velocity command"), self.control_dt))
        except ValueError as e:
            self._refuse(VELOCITY_TOPIC, e)

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        try:
            command = trajectory_command(msg, self.clock.now_ns() / 1e9)
        except ValueError as e:
            self._refuse(TRAJECTORY_TOPIC, e)
            return
        if command is None:
            self.goals.hold()  # an empty trajectory: stop where the arm is
        else:
            self.goals.command(command)

    # --- sensors (physics thread; the timer's republish on the executor thread) ------------

    def _on_sample(self, sample: Sample) -> None:
        stamp = stamp_msg(sample.stamp_ns)
        messages = [(self._joints_pub, JointState(name=list(JOINT_NAMES), position=sample.q.tolist(),
                                                  velocity=sample.qd.tolist()))]
        for cam, (raw_pub, jpeg_pub), frame in zip(CAMERAS, self._camera_pubs, sample.frames):
            raw = Image(height=frame.shape[0], width=frame.shape[1], encoding="rgb8", is_bigendian=0,
                        step=3 * frame.shape[1], data=array.array("B", frame.tobytes()))
            jpeg = CompressedImage(format=COMPRESSED_FORMAT, data=array.array("B", self._jpeg(frame)))
            for msg in (raw, jpeg):
                msg.header.frame_id = f"{cam.name}_camera_optical_frame"
            messages += [(raw_pub, raw), (jpeg_pub, jpeg)]
        if self._clock_pub is not None:  # first, so a client on sim time is never behind a stamp it gets
            messages.insert(0, (self._clock_pub, Clock()))
        with self._publish_lock:
            self._latest = messages
            self._send(stamp)

    def _republish_while_paused(self) -> None:
        with self._publish_lock:
            if not self._running or self.robot.episode_over.is_set():
                self._running = False
                if self._latest is not None:
                    self._send(stamp_msg(self.clock.now_ns()))

    def _send(self, stamp: Time) -> None:
        for pub, msg in self._latest:
            if isinstance(msg, Clock):
                msg.clock = stamp
            else:
                msg.header.stamp = stamp
            pub.publish(msg)

    def _jpeg(self, frame: np.ndarray) -> bytes:
        out = io.BytesIO()
        PILImage.fromarray(frame).save(out, format="JPEG", quality=self.jpeg_quality)
        return out.getvalue()


# --- the command line ------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.ros2_sim", description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode; the next ones count up")
    p.add_argument("--sim_time", action="store_true", help="publish /clock and stamp in simulated time")
    p.add_argument("--ticks", type=int, default=EPISODE_TICKS, help="control ticks per episode")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(remove_ros_args(["ros2_sim", *argv])[1:])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sim = ReacherRos2Sim(sim_time=args.sim_time, ticks=args.ticks, args=argv)
    try:
        for episode in range(args.episodes):
            seed = args.seed + episode
            sim.reset(seed)
            print(f"episode {episode + 1}/{args.episodes} (seed {seed}): paused, waiting for the first command on "
                  f"{', '.join(sim.command_topics)}", file=sys.stderr, flush=True)
            while not stop.is_set() and not sim.start_on_first_command(timeout_s=0.2):
                pass
            while not stop.is_set() and not sim.episode_over.wait(0.2):
                pass
            if stop.is_set():
                print("interrupted: shutting down", file=sys.stderr, flush=True)
                break
            record = sim.wait()
            print(json.dumps({"episode": episode + 1, "seed": seed, "success": record.success,
                              "targets_reached": record.reached, "of": record.targets, "ticks": record.ticks,
                              "late_ticks": record.late_ticks}), flush=True)
    finally:
        sim.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
