"""The simulated Reacher as a ROS 2 robot (sim/ros2_sim.py), against real rclpy and Fast DDS on loopback.

A plain test node, in its own rclpy Context, listens and commands the way a
client would. Most tests share one paused sim on sim time, so every tick's time
is known exactly; one runs a sim on wall time, under its own namespace so the
two never mix, and one runs the command line in a subprocess.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import pytest

from testbed.ros2_env import keep_ros_on_loopback

keep_ros_on_loopback()  # before any rclpy.init; the CLI's subprocess inherits it

import rclpy  # noqa: E402  (no importorskip: CI installs rclpy, so its absence is a failure)
from builtin_interfaces.msg import Duration, Time  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint  # noqa: E402

from sim.ros2_sim import COMPRESSED_FORMAT, SIM_TIME_START_NS, ReacherRos2Sim  # noqa: E402
from sim.scene import CONTROL_DT, IMAGE_HW  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TICKS = 25  # one second an episode
SEEDS = itertools.count(100)
CAMERA_TOPICS = [f"/{c}_camera/image_raw{kind}" for c in ("top", "oblique") for kind in ("", "/compressed")]
POSITION, VELOCITY, TRAJECTORY = ("/forward_position_controller/commands", "/forward_velocity_controller/commands",
                                  "/joint_trajectory_controller/joint_trajectory")


def ns_of(stamp) -> int:
    return stamp.sec * 10**9 + stamp.nanosec


def wait_until(condition, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Client:
    """A test node with its own Context and executor thread: keeps the latest messages of each topic."""

    def __init__(self, name: str = "sim_test"):
        self.context = Context()
        rclpy.init(context=self.context, args=[])
        self.node = Node(name, context=self.context)
        self._lock = threading.Lock()
        self._got: dict[str, deque] = defaultdict(lambda: deque(maxlen=400))
        self._pubs: dict[str, object] = {}
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()

    def listen(self, topic: str, msg_type, qos=10) -> None:
        self.node.create_subscription(msg_type, topic, lambda msg: self._keep(topic, msg), qos)

    def listen_to_robot(self, ns: str = "") -> None:
        self.listen(f"{ns}/joint_states", JointState)
        for topic in CAMERA_TOPICS:
            self.listen(ns + topic, CompressedImage if topic.endswith("compressed") else Image, qos_profile_sensor_data)

    def _keep(self, topic: str, msg) -> None:
        with self._lock:
            self._got[topic].append(msg)

    def got(self, topic: str) -> list:
        with self._lock:
            return list(self._got[topic])

    def clear(self) -> None:
        with self._lock:
            self._got.clear()

    def publish(self, topic: str, msg) -> None:
        """Publish once the robot's subscription is matched: a reliable message sent before is lost."""
        if topic not in self._pubs:
            self._pubs[topic] = self.node.create_publisher(type(msg), topic, 10)
        pub = self._pubs[topic]
        wait_until(lambda: pub.get_subscription_count() > 0, what=f"a subscriber on {topic}")
        pub.publish(msg)

    def close(self) -> None:
        self.executor.shutdown()
        self._spinner.join(timeout=5)
        self.node.destroy_node()
        self.context.try_shutdown()


@pytest.fixture(scope="module")
def client():
    c = Client()
    c.listen_to_robot()
    c.listen("/clock", Clock, 100)
    c.listen("/rosout", Log, 100)
    yield c
    c.close()


@pytest.fixture(scope="module")
def sim():
    s = ReacherRos2Sim(sim_time=True, ticks=TICKS)
    yield s
    s.close()


@pytest.fixture
def paused(sim, client):
    """The shared sim reset to a new episode (paused, holding), its first state received; the tick time."""
    sim.reset(seed=next(SEEDS))
    t0 = sim.clock.now_ns()
    client.clear()
    wait_until(lambda: any(ns_of(m.header.stamp) == t0 for m in client.got("/joint_states")), what="the reset state")
    return t0


def trajectory(stamp_ns: int, points, names=("joint0", "joint1")) -> JointTrajectory:
    msg = JointTrajectory(joint_names=list(names))
    msg.header.stamp = Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    for t, positions in points:
        ns = round(t * 1e9)
        msg.points.append(JointTrajectoryPoint(positions=list(positions),
                                               time_from_start=Duration(sec=ns // 10**9, nanosec=ns % 10**9)))
    return msg


def lerp(t: float, times, points) -> np.ndarray:
    points = np.asarray(points, np.float64)
    return np.array([np.interp(t, times, points[:, j]) for j in range(2)])


def run(sim: ReacherRos2Sim):
    sim.start()
    record = sim.wait(timeout_s=10)
    assert record.ticks == TICKS
    return record


# --- sensors -------------------------------------------------------------------


def test_joint_states_and_both_camera_kinds_share_each_ticks_stamp(sim, client, paused):
    client.publish(POSITION, Float64MultiArray(data=[0.3, -0.3]))
    run(sim)
    wait_until(lambda: ns_of(client.got("/joint_states")[-1].header.stamp) == sim.clock.now_ns(), what="the last tick")
    states = {ns_of(m.header.stamp): m for m in client.got("/joint_states")}
    ticks = {paused + k * round(CONTROL_DT * 1e9) for k in range(TICKS + 1)}
    assert ticks <= set(states)  # reliable: every tick's joint state, and stamped with the tick's sim time
    last = states[max(ticks)]
    assert list(last.name) == ["joint0", "joint1"] and len(last.position) == len(last.velocity) == 2
    state = sim.robot.observe().state  # the policy's view of the same instant: cos q, sin q, qd
    np.testing.assert_allclose(state, [*np.cos(last.position), *np.sin(last.position), *last.velocity], atol=1e-5)
    for topic in CAMERA_TOPICS:
        stamps = {ns_of(m.header.stamp) for m in client.got(topic)}
        assert stamps <= set(states), topic  # no camera frame without its tick's joint state
        assert len(stamps & ticks) >= TICKS - 3, topic  # best effort, but loopback loses little

    def last_frame(topic: str):  # paused after the episode, the sim republishes its last tick's frames
        wait_until(lambda: any(ns_of(m.header.stamp) == max(ticks) for m in client.got(topic)), what=topic)
        return next(m for m in client.got(topic) if ns_of(m.header.stamp) == max(ticks))

    raw, jpeg = last_frame("/top_camera/image_raw"), last_frame("/top_camera/image_raw/compressed")
    assert (raw.height, raw.width, raw.encoding, raw.step) == (*IMAGE_HW, "rgb8", 3 * IMAGE_HW[1])
    pixels = np.frombuffer(bytes(raw.data), np.uint8).reshape(*IMAGE_HW, 3)
    decoded = np.asarray(PILImage.open(io.BytesIO(bytes(jpeg.data))))
    assert jpeg.format == COMPRESSED_FORMAT and decoded.shape == (*IMAGE_HW, 3)
    assert pixels.std() > 10 and np.abs(decoded.astype(int) - pixels).mean() < 8  # the same frame, through JPEG


def test_sim_time_publishes_clock_from_1000_s_and_never_goes_back(sim, client, paused):
    assert paused >= SIM_TIME_START_NS
    wait_until(lambda: client.got("/clock") and ns_of(client.got("/clock")[-1].clock) == paused, what="/clock")
    client.publish(VELOCITY, Float64MultiArray(data=[0.0, 0.0]))
    record = run(sim)
    dt_ns = round(CONTROL_DT * 1e9)
    np.testing.assert_allclose(record.times, [(paused + k * dt_ns) / 1e9 for k in range(TICKS)], rtol=0, atol=1e-9)
    wait_until(lambda: ns_of(client.got("/clock")[-1].clock) == paused + TICKS * dt_ns, what="the last tick's clock")
    clocks = [ns_of(m.clock) for m in client.got("/clock")]
    assert all(b >= a for a, b in zip(clocks, clocks[1:]))  # paused: repeated, never earlier
    assert set(np.diff(sorted(set(clocks)))) == {dt_ns}
    sim.reset(seed=1)
    assert sim.clock.now_ns() == paused + TICKS * dt_ns  # a reset pauses the clock, it does not rewind it


def test_on_wall_time_stamps_are_the_node_clock_and_there_is_no_clock_topic():
    wall = ReacherRos2Sim(node_name="reacher_wall", ticks=5, namespace="/wall")
    c = Client("wall_test")
    try:
        c.listen_to_robot("/wall")
        wall.reset(seed=2)
        wait_until(lambda: len(c.got("/wall/joint_states")) >= 3, what="republished joint states")
        now = c.node.get_clock().now().nanoseconds
        stamps = [ns_of(m.header.stamp) for m in c.got("/wall/joint_states")]
        assert all(0 <= now - s < 0.5e9 for s in stamps[-3:])  # paused, yet stamped fresh: the arm stands still
        assert len(set(stamps)) == len(stamps)
        assert not any(n.endswith("/clock") for n, _ in wall.node.get_publisher_names_and_types_by_node(
            "reacher_wall", "/wall"))
        wall.start()
        record = wall.wait(timeout_s=5)
        assert record.ticks == 5 and abs(record.times[-1] * 1e9 - c.node.get_clock().now().nanoseconds) < 0.5e9
    finally:
        c.close()
        wall.close()


# --- commands ----------------------------------------------------------------------


def test_a_position_command_moves_the_arm_to_it(sim, client, paused):
    start = np.array(client.got("/joint_states")[-1].position)
    goal = start + [0.6, -0.6]
    client.publish(POSITION, Float64MultiArray(data=goal.tolist()))
    assert sim.start_on_first_command(timeout_s=5)
    record = sim.wait(timeout_s=10)
    assert set(record.sources) == {"position"} and not any(record.held)
    np.testing.assert_allclose(record.goals, [goal] * TICKS)
    wait_until(lambda: ns_of(client.got("/joint_states")[-1].header.stamp) == sim.clock.now_ns(), what="the last tick")
    end = np.array(client.got("/joint_states")[-1].position)
    assert np.abs(goal - end).max() < 0.3 * np.abs(goal - start).max()


def test_a_velocity_command_is_kept_forever(sim, client, paused):
    velocity = np.array([0.5, -0.25])
    client.publish(VELOCITY, Float64MultiArray(data=velocity.tolist()))
    record = run(sim)
    assert set(record.sources) == {"velocity"}
    np.testing.assert_allclose(np.diff(record.goals, axis=0), [velocity * CONTROL_DT] * (TICKS - 1), atol=1e-12)
    moved = np.array(client.got("/joint_states")[-1].position) - client.got("/joint_states")[0].position
    assert moved[0] > 0.2 and moved[1] < -0.1  # still moving after a second: nothing timed the command out


def test_a_trajectory_is_interpolated_in_time_and_a_later_one_replaces_its_tail(sim, client, paused):
    # Start times half a tick off the tick grid, so no tick sits exactly on a boundary.
    s1, s2 = paused + 220_000_000, paused + 520_000_000
    a, b, c = [0.4, -0.3], [0.2, 0.5], [-0.3, 0.1]
    # Joints named in the other order: matched by name, as the joint trajectory controller does.
    client.publish(TRAJECTORY, trajectory(s1, [(0.2, a[::-1]), (0.6, b[::-1])], names=("joint1", "joint0")))
    client.publish(TRAJECTORY, trajectory(s2, [(0.3, c)]))
    time.sleep(0.3)  # both delivered (reliable, in order) before the physics starts
    record = run(sim)
    times = np.array(record.times)
    first = np.flatnonzero(times >= s1 / 1e9)[0]
    hold = record.goals[0]
    at_s2 = lerp(s2 / 1e9 - s1 / 1e9, [0, 0.2, 0.6], [hold, a, b])  # the first trajectory's goal at the second's start
    for t, goal, source in zip(times, record.goals, record.sources):
        if t < s1 / 1e9:
            expected, name = hold, "hold"
        elif t < s2 / 1e9:
            expected, name = lerp(t - s1 / 1e9, [0, 0.2, 0.6], [hold, a, b]), "trajectory"
        else:
            expected, name = lerp(t - s2 / 1e9, [0, 0.3], [at_s2, c]), "trajectory"
        assert source == name
        np.testing.assert_allclose(goal, expected, atol=1e-9, err_msg=f"t={t}")
    assert 0 < first < TICKS and np.allclose(record.goals[-1], c)  # held at the last point


def test_a_trajectory_stamped_zero_starts_now_and_an_empty_one_stops(sim, client, paused):
    client.publish(TRAJECTORY, trajectory(0, [(0.4, [1.0, 1.0])]))
    assert sim.start_on_first_command(timeout_s=5)
    time.sleep(0.5)
    client.publish(TRAJECTORY, JointTrajectory(joint_names=["joint0", "joint1"]))
    record = sim.wait(timeout_s=10)
    stop = record.sources.index("hold")
    assert 5 <= stop < TICKS - 3 and set(record.sources[stop:]) == {"hold"}
    start = record.goals[0]  # zero stamp: from the paused sim's now, which is the first tick's time
    for t, goal in zip(record.times[:stop], record.goals[:stop]):
        np.testing.assert_allclose(goal, lerp(t - paused / 1e9, [0, 0.4], [start, [1.0, 1.0]]), atol=1e-9)
    # Holding the pose measured at the first tick after the stop, which the joint state stamped then reports.
    measured = {ns_of(m.header.stamp): m.position for m in client.got("/joint_states")}
    np.testing.assert_allclose(record.goals[stop], measured[round(record.times[stop] * 1e9)], atol=1e-12)
    np.testing.assert_allclose(record.goals[stop:], [record.goals[stop]] * (TICKS - stop))


def test_refused_commands_are_logged_and_the_node_keeps_serving(sim, client, paused):
    refused = [
        (POSITION, Float64MultiArray(data=[1.0, 2.0, 3.0])),
        (POSITION, Float64MultiArray(data=[float("nan"), 0.0])),
        (VELOCITY, Float64MultiArray(data=[1.0])),
        (TRAJECTORY, trajectory(0, [(0.5, [0.1, 0.1])], names=("joint0", "elbow"))),
        (TRAJECTORY, trajectory(0, [(0.5, [0.1])], names=("joint0",))),
        (TRAJECTORY, trajectory(0, [(0.5, [0.1, 0.1, 0.1])])),
        (TRAJECTORY, trajectory(0, [(0.5, [0.1, 0.1]), (0.5, [0.2, 0.2])])),
        (TRAJECTORY, trajectory(paused - 2 * 10**9, [(0.5, [0.1, 0.1])])),  # over before now
    ]
    for topic, msg in refused:
        client.publish(topic, msg)

    def warnings():
        return [m.msg for m in client.got("/rosout") if m.name == "reacher_sim" and m.level == Log.WARN]

    wait_until(lambda: len(warnings()) >= len(refused), what="a warning per refused command")
    assert all("ignored" in w for w in warnings())
    assert not sim.goals.commanded.is_set()  # none of them counted as a command
    client.publish(POSITION, Float64MultiArray(data=[0.2, 0.2]))
    assert sim.start_on_first_command(timeout_s=5)
    assert set(sim.wait(timeout_s=10).sources) == {"position"}


# --- the command line -----------------------------------------------------------------


def test_the_command_line_runs_an_episode_per_first_command_and_stops_on_sigterm():
    c = Client("cli_test")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.ros2_sim", "--episodes", "2", "--seed", "7", "--ticks", "10",
         "--ros-args", "-r", "__ns:=/cli"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue = queue.Queue()

    def pump(stream, name: str) -> None:
        for line in stream:
            lines.put((name, line))

    readers = [threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)]
    stdout_lines: list[str] = []

    def next_line(stream: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            name, line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if name == "stdout":
                stdout_lines.append(line)
            if name == stream:
                return line

    try:
        for r in readers:
            r.start()
        assert "waiting for the first command on /cli/forward_position_controller/commands" in next_line("stderr")
        c.publish("/cli" + POSITION, Float64MultiArray(data=[0.1, 0.1]))
        episode = json.loads(next_line("stdout"))
        assert episode == {"episode": 1, "seed": 7, "success": False, "targets_reached": 0, "of": 3, "ticks": 10,
                           "late_ticks": episode["late_ticks"]}
        assert "episode 2/2 (seed 8)" in next_line("stderr")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for r in readers:
            r.join(timeout=5)  # both pipes close with the process
        c.close()
    assert len(stdout_lines) == 1
