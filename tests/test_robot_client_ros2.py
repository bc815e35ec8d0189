"""The ROS 2 adapter against an in-test stand-in of exactly the rclpy API it uses.

rclpy cannot be installed on the machines these tests run on, so the modules
below (rclpy, rclpy.node, rclpy.executors, rclpy.qos, sensor_msgs.msg,
std_msgs.msg, trajectory_msgs.msg, builtin_interfaces.msg) are stand-ins:
they mimic the calls and message fields the adapter uses, including rclpy's
refusal of unknown message fields and of a parameter override whose type
differs from the declared one. They do not prove behaviour on a real ROS 2
graph; the README says so.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import ClassVar

import numpy as np
import pytest
import yaml

from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.image_codec import EncodedFrame
from robot_client.robot import ObservationUnavailable
from tests.payloads import encode, frame
from tests.robot_client_fixtures import FakeClock, ScriptedWorker, demo_spec

# --- the stand-in ------------------------------------------------------------


class _Msg:
    _fields: ClassVar[dict] = {}

    def __init__(self, **kw):
        unknown = set(kw) - set(self._fields)
        if unknown:  # rclpy messages refuse unknown fields too
            raise AssertionError(f"{type(self).__name__}: invalid arguments {sorted(unknown)}")
        for name, default in self._fields.items():
            setattr(self, name, kw.get(name, default() if callable(default) else default))


def _msg(type_name, **fields):
    return type(type_name, (_Msg,), {"_fields": fields})


class _Graph:
    """Everything the fake nodes created, for the tests to drive and inspect."""

    def __init__(self):
        self.subscriptions: dict[str, tuple[type, object, object]] = {}
        self.published: dict[str, list] = {}
        self.overrides: dict[str, object] = {}
        self.ok = False
        self.inits = 0
        self.shutdowns = 0

    def deliver(self, topic: str, msg) -> None:
        msg_type, callback, _ = self.subscriptions[topic]
        assert isinstance(msg, msg_type), f"{topic} expects {msg_type.__name__}"
        callback(msg)


def _install(monkeypatch) -> _Graph:
    graph = _Graph()

    class Parameter:
        def __init__(self, value):
            self.value = value

    class Publisher:
        def __init__(self, msg_type, topic):
            self.msg_type, self.topic = msg_type, topic

        def publish(self, msg):
            assert isinstance(msg, self.msg_type)
            graph.published.setdefault(self.topic, []).append(msg)

    class Node:
        def __init__(self, node_name):
            assert graph.ok, "rclpy.init() must come before Node()"
            self.name = node_name
            self.destroyed = False

        def create_subscription(self, msg_type, topic, callback, qos):
            graph.subscriptions[topic] = (msg_type, callback, qos)
            return object()

        def create_publisher(self, msg_type, topic, qos):
            return Publisher(msg_type, topic)

        def declare_parameter(self, name, value):
            if name in graph.overrides:
                override = graph.overrides[name]
                if type(override) is not type(value):
                    raise TypeError(f"parameter {name}: override {override!r} is not a {type(value).__name__}")
                return Parameter(override)
            return Parameter(value)

        def destroy_node(self):
            self.destroyed = True

    class SingleThreadedExecutor:
        def __init__(self):
            self._stop = threading.Event()
            self.nodes = []

        def add_node(self, node):
            self.nodes.append(node)

        def spin(self):
            self._stop.wait()

        def shutdown(self):
            self._stop.set()

    def init(args=None):
        graph.ok, graph.inits = True, graph.inits + 1
        args = list(args or [])
        for i, arg in enumerate(args):  # `--ros-args -p name:=value`
            if arg == "-p":
                name, value = args[i + 1].split(":=", 1)
                graph.overrides[name] = yaml.safe_load(value)

    def shutdown():
        graph.ok, graph.shutdowns = False, graph.shutdowns + 1

    Duration = _msg("Duration", sec=0, nanosec=0)
    modules = {
        "rclpy": types.SimpleNamespace(ok=lambda: graph.ok, init=init, shutdown=shutdown),
        "rclpy.node": types.SimpleNamespace(Node=Node),
        "rclpy.executors": types.SimpleNamespace(SingleThreadedExecutor=SingleThreadedExecutor),
        "rclpy.qos": types.SimpleNamespace(qos_profile_sensor_data="sensor_data_qos"),
        "sensor_msgs": types.SimpleNamespace(),
        "sensor_msgs.msg": types.SimpleNamespace(
            JointState=_msg("JointState", header=None, name=list, position=list, velocity=list, effort=list),
            Image=_msg("Image", header=None, height=0, width=0, encoding="", is_bigendian=0, step=0, data=bytes),
            CompressedImage=_msg("CompressedImage", header=None, format="", data=bytes),
        ),
        "std_msgs": types.SimpleNamespace(),
        "std_msgs.msg": types.SimpleNamespace(Float64MultiArray=_msg("Float64MultiArray", layout=None, data=list)),
        "trajectory_msgs": types.SimpleNamespace(),
        "trajectory_msgs.msg": types.SimpleNamespace(
            JointTrajectory=_msg("JointTrajectory", header=None, joint_names=list, points=list),
            JointTrajectoryPoint=_msg(
                "JointTrajectoryPoint",
                positions=list,
                velocities=list,
                accelerations=list,
                effort=list,
                time_from_start=Duration,
            ),
        ),
        "builtin_interfaces": types.SimpleNamespace(),
        "builtin_interfaces.msg": types.SimpleNamespace(Duration=Duration),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return graph


@pytest.fixture()
def ros(monkeypatch):
    return _install(monkeypatch)


@pytest.fixture()
def make_robot(ros):
    from robot_client.ros2_node import Ros2Config, Ros2Robot

    robots = []

    def make(clock=None, ros_args=None, **config):
        config.setdefault("joint_names", ["shoulder", "elbow", "wrist", "gripper"])
        robot = Ros2Robot(Ros2Config(**config), ros_args=ros_args, **({"clock": clock} if clock else {}))
        robots.append(robot)
        return robot

    yield make
    for robot in robots:
        robot.close()


def sensors():
    msgs = sys.modules["sensor_msgs.msg"]
    return msgs.JointState, msgs.Image, msgs.CompressedImage


def image_msg(pixels: np.ndarray, encoding: str = "rgb8", pad: int = 0):
    _, Image, _ = sensors()
    h, w, c = pixels.shape
    rows = np.zeros((h, w * c + pad), np.uint8)
    rows[:, : w * c] = pixels.reshape(h, w * c)
    return Image(height=h, width=w, encoding=encoding, step=w * c + pad, data=rows.tobytes())


# --- tests --------------------------------------------------------------------


def test_state_is_ordered_by_joint_names_across_split_messages(ros, make_robot):
    JointState, _, _ = sensors()
    robot = make_robot(include_velocity=True)
    # The arm driver publishes its joints in its own order; the gripper comes from another driver.
    ros.deliver(
        "/joint_states",
        JointState(name=["wrist", "shoulder", "elbow"], position=[3.0, 1.0, 2.0], velocity=[0.3, 0.1, 0.2]),
    )
    with pytest.raises(ObservationUnavailable, match=r"no position yet for joints \['gripper'\]"):
        robot.observe()
    ros.deliver("/joint_states", JointState(name=["gripper", "unused"], position=[4.0, 9.0]))
    np.testing.assert_allclose(robot.observe().state, [1, 2, 3, 4, 0.1, 0.2, 0.3, 0.0], rtol=1e-6)


def test_stale_sensors_make_the_observation_unavailable(ros, make_robot):
    JointState, _, _ = sensors()
    clock = FakeClock()
    robot = make_robot(clock=clock, joint_names=["a"], camera_topics=["/cam/image_raw"], max_sensor_age_s=0.2)
    ros.deliver("/joint_states", JointState(name=["a"], position=[0.5]))
    with pytest.raises(ObservationUnavailable, match="/cam/image_raw: no image yet"):
        robot.observe()
    ros.deliver("/cam/image_raw", image_msg(frame(8, 8)))
    assert robot.observe().state.tolist() == [0.5]
    clock.sleep(0.3)
    with pytest.raises(ObservationUnavailable, match=r"joints \['a'\] older than 0.2 s"):
        robot.observe()


def test_raw_images_become_rgb_and_compressed_ones_pass_through(ros, make_robot):
    JointState, _, CompressedImage = sensors()
    robot = make_robot(
        joint_names=["a"],
        camera_topics=["/front/image_raw", "/wrist/image_raw/compressed", "/side/mono"],
    )
    assert [ros.subscriptions[t][0].__name__ for t in robot.config.camera_topics] == [
        "Image",
        "CompressedImage",
        "Image",
    ]
    assert ros.subscriptions["/front/image_raw"][2] == "sensor_data_qos"
    rgb = frame(6, 10)
    jpeg = encode(frame(48, 64), "JPEG")
    ros.deliver("/joint_states", JointState(name=["a"], position=[0.0]))
    ros.deliver("/front/image_raw", image_msg(rgb[:, :, ::-1].copy(), "bgr8", pad=4))  # BGR with row padding
    ros.deliver("/wrist/image_raw/compressed", CompressedImage(format="rgb8; jpeg compressed bgr8", data=jpeg))
    ros.deliver("/side/mono", image_msg(rgb[:, :, :1].copy(), "mono8"))
    front, wrist, side = robot.observe().images
    np.testing.assert_array_equal(front, rgb)
    assert wrist == EncodedFrame(jpeg, "jpeg")  # the camera's own JPEG, untouched
    np.testing.assert_array_equal(side, np.repeat(rgb[:, :, :1], 3, axis=2))


def test_forward_command_controller_gets_the_joint_values_and_hold_repeats_them(ros, make_robot):
    robot = make_robot(command_topic="/forward_position_controller/commands")
    robot.hold()  # nothing commanded yet: nothing to repeat
    assert "/forward_position_controller/commands" not in ros.published
    robot.apply_action(np.arange(8, dtype=np.float32))  # the model's 8 values; 4 joints
    robot.hold()
    sent = ros.published["/forward_position_controller/commands"]
    assert [m.data for m in sent] == [[0.0, 1.0, 2.0, 3.0]] * 2
    with pytest.raises(ValueError, match="3 values for 4 joints"):
        robot.apply_action(np.zeros(3))


def test_velocity_controllers_hold_with_zeros(ros, make_robot):
    robot = make_robot(command_topic="/velocity_controller/commands", hold_command="zero")
    robot.apply_action(np.ones(4))
    robot.hold()
    assert ros.published["/velocity_controller/commands"][-1].data == [0.0] * 4


def test_joint_trajectory_controller_gets_one_point_a_period_ahead_and_an_empty_trajectory_to_hold(ros, make_robot):
    robot = make_robot(
        command_type="joint_trajectory",
        command_topic="/joint_trajectory_controller/joint_trajectory",
        control_frequency=20,
    )
    robot.apply_action(np.array([0.1, 0.2, 0.3, 0.4, 9.0]))
    robot.hold()
    move, stop = ros.published["/joint_trajectory_controller/joint_trajectory"]
    assert move.joint_names == ["shoulder", "elbow", "wrist", "gripper"]
    (point,) = move.points
    assert point.positions == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert (point.time_from_start.sec, point.time_from_start.nanosec) == (0, 50_000_000)
    assert stop.joint_names == move.joint_names and stop.points == []


def test_settings_come_from_a_ros2_params_file_and_ros_args_override_them(ros, tmp_path):
    from robot_client.ros2_node import Ros2Config, Ros2Robot

    path = tmp_path / "robot.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "policy_client": {
                    "ros__parameters": {
                        "joint_names": ["j1", "j2"],
                        "camera_topics": ["/cam/compressed"],
                        "control_frequency": 30,
                        "command_type": "joint_trajectory",
                        "command_topic": "/jtc/joint_trajectory",
                    }
                }
            }
        )
    )
    config = Ros2Config.from_yaml(path)
    assert config.camera_types == ["compressed"] and config.control_frequency == 30.0
    robot = Ros2Robot(
        config,
        ros_args=[
            "robot_client",
            "--ros-args",
            "-p",
            "control_frequency:=15.0",
            "-p",
            "joint_state_topic:=/arm/joint_states",
        ],
    )
    try:
        assert robot.config.control_frequency == 15.0 and robot.config.joint_state_topic == "/arm/joint_states"
        assert "/arm/joint_states" in ros.subscriptions
    finally:
        robot.close()
    assert ros.shutdowns == 1 and not ros.ok  # the adapter shut down the rclpy it started
    path.write_text(yaml.safe_dump({"joint_names": ["a"], "camera_topic": "/typo"}))
    with pytest.raises(ValueError, match=r"unknown keys \['camera_topic'\]"):
        Ros2Config.from_yaml(path)
    with pytest.raises(ValueError, match="joint_names is empty"):
        Ros2Config.from_dict({})


def test_the_control_loop_drives_the_ros2_robot_end_to_end(ros, make_robot):
    JointState, _, CompressedImage = sensors()
    clock = FakeClock()
    robot = make_robot(clock=clock, camera_topics=["/a/compressed", "/b/compressed"], max_sensor_age_s=10)
    jpeg = encode(frame(48, 64), "JPEG")
    ros.deliver("/joint_states", JointState(name=["gripper", "wrist", "elbow", "shoulder"], position=[4, 3, 2, 1]))
    for topic in ("/a/compressed", "/b/compressed"):
        ros.deliver(topic, CompressedImage(format="jpeg", data=jpeg))
    worker = ScriptedWorker(clock, latency_s=0.05, action_dim=8)
    loop = ControlLoop(
        robot,
        None,
        demo_spec(action_dim=8),
        LoopConfig(prompt="pick", control_frequency=30),
        clock=clock,
        sleep=clock.sleep,
        worker=worker,
    )
    loop.run(duration_s=1.0)

    commands = ros.published["/forward_position_controller/commands"]
    acts = [r for r in loop.trace if r.kind == "act"]
    assert len(commands) == len(acts) + 1  # one command per tick, then the hold at exit repeats the last
    for record, msg in zip(acts, commands):
        assert msg.data == pytest.approx(worker.answers[record.request_id][record.row][:4].tolist())
    assert len(worker.sent) == 3  # 1 s at 30 Hz with 16-row chunks
    for sent in worker.sent:  # what went to the server: state in joint_names order, the cameras' own JPEG
        assert sent.observation.state.tolist() == [1, 2, 3, 4]
        assert sent.observation.images == [EncodedFrame(jpeg, "jpeg")] * 2
