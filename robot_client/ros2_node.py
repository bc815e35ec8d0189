"""The ROS 2 robot port (rclpy), kept thin: topics in, controller commands out.

This is the only module that imports rclpy and ROS message packages, and it
does so when a Ros2Robot is built, so the rest of the package (and a laptop
without ROS) never needs them.

- State: `sensor_msgs/JointState` on `joint_state_topic`, ordered by the
  configured `joint_names` (never by index: drivers publish joints in any
  order, and some split them across several messages).
- Cameras: `sensor_msgs/Image` (rgb8, bgr8, rgba8, bgra8, mono8, mono16) or
  `sensor_msgs/CompressedImage` (JPEG/PNG, passed through untouched).
- Commands, to a ros2_control controller: `std_msgs/Float64MultiArray` for a
  forward command controller, or `trajectory_msgs/JointTrajectory` (one point,
  one control period ahead) for the joint trajectory controller.
- Hold: republish the last command (position controllers), publish zeros
  (velocity controllers, `hold_command: zero`), or an empty JointTrajectory,
  which makes the joint trajectory controller stop and hold position.

Settings come from a YAML file (plain, or a ROS 2 params file with
`<node>: {ros__parameters: ...}`) and can be overridden with ROS parameters
(`--ros-args -p control_frequency:=15.0`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from robot_client.image_codec import EncodedFrame
from robot_client.robot import Observation, ObservationUnavailable

logger = logging.getLogger("robot_client")
COMMAND_TYPES = ("float64_multi_array", "joint_trajectory")
CAMERA_TYPES = ("image", "compressed")
HOLD_COMMANDS = ("last", "zero")


@dataclass
class Ros2Config:
    joint_names: list[str] = field(default_factory=list)
    joint_state_topic: str = "/joint_states"
    camera_topics: list[str] = field(default_factory=list)
    # Per camera topic: "image" or "compressed". Empty: guessed, ".../compressed" is compressed.
    camera_types: list[str] = field(default_factory=list)
    command_topic: str = "/forward_position_controller/commands"
    command_type: str = "float64_multi_array"
    hold_command: str = "last"
    trajectory_time_from_start_s: float = 0.0  # 0: one control period
    include_velocity: bool = False  # state = positions (+ velocities), in joint_names order
    max_sensor_age_s: float = 0.5  # older joint states or frames make the observation unavailable
    control_frequency: float = 30.0
    node_name: str = "policy_client"

    def __post_init__(self):
        # ROS parameters are typed by their first value: 30 would make control_frequency an integer.
        self.trajectory_time_from_start_s = float(self.trajectory_time_from_start_s)
        self.max_sensor_age_s = float(self.max_sensor_age_s)
        self.control_frequency = float(self.control_frequency)
        self.joint_names = [str(n) for n in self.joint_names]
        self.camera_topics = [str(t) for t in self.camera_topics]
        if not self.camera_types:
            self.camera_types = [
                "compressed" if t.rstrip("/").endswith("compressed") else "image" for t in self.camera_topics
            ]
        problems = []
        if not self.joint_names:
            problems.append("joint_names is empty: list the joints the policy commands, in action order")
        if len(set(self.joint_names)) != len(self.joint_names):
            problems.append(f"joint_names has duplicates: {self.joint_names}")
        if len(self.camera_types) != len(self.camera_topics):
            problems.append(
                f"camera_types has {len(self.camera_types)} entries for {len(self.camera_topics)} camera_topics"
            )
        if any(t not in CAMERA_TYPES for t in self.camera_types):
            problems.append(f"camera_types must each be one of {CAMERA_TYPES}, got {self.camera_types}")
        if self.command_type not in COMMAND_TYPES:
            problems.append(f"command_type must be one of {COMMAND_TYPES}, got {self.command_type!r}")
        if self.hold_command not in HOLD_COMMANDS:
            problems.append(f"hold_command must be one of {HOLD_COMMANDS}, got {self.hold_command!r}")
        if self.control_frequency <= 0 or self.max_sensor_age_s <= 0:
            problems.append("control_frequency and max_sensor_age_s must be > 0")
        if problems:
            raise ValueError("ROS 2 config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> Ros2Config:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"ROS 2 config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Ros2Config:
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {}
        # A ROS 2 params file ({node: {ros__parameters: {...}}}) works as is.
        if len(values) == 1:
            (inner,) = values.values()
            if isinstance(inner, dict) and "ros__parameters" in inner:
                values = inner["ros__parameters"]
        return cls.from_dict(values)


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image -> uint8 HxWx3 RGB, honouring the row stride (`step`)."""
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 1}
    encoding = msg.encoding.lower()
    if encoding not in channels:
        raise ValueError(f"image encoding {msg.encoding!r} not supported; use one of {sorted(channels)}")
    dtype = np.dtype((">u2" if msg.is_bigendian else "<u2") if encoding == "mono16" else "u1")
    c = channels[encoding]
    row = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.step)
    pixels = row[:, : msg.width * c * dtype.itemsize].copy().view(dtype).reshape(msg.height, msg.width, c)
    if encoding == "mono16":
        pixels = (pixels >> 8).astype(np.uint8)
    if encoding in ("bgr8", "bgra8"):
        pixels = pixels[:, :, [2, 1, 0]]
    elif c == 4:
        pixels = pixels[:, :, :3]
    elif c == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels)


def compressed_to_frame(msg) -> EncodedFrame:
    """sensor_msgs/CompressedImage -> EncodedFrame, never decoded here."""
    label = msg.format.lower()
    data = bytes(msg.data)
    if "jpeg" in label or "jpg" in label:
        return EncodedFrame(data, "jpeg")
    if "png" in label:
        return EncodedFrame(data, "png")
    return EncodedFrame.sniff(data)  # raises with a clear message for anything else


class Ros2Robot:
    """RobotPort over rclpy. Subscriptions are served by an executor on its own thread."""

    def __init__(self, config: Ros2Config, *, ros_args: list[str] | None = None, clock=time.monotonic):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image, JointState

        self._rclpy = rclpy
        self._clock = clock
        self._owns_rclpy = not rclpy.ok()
        if self._owns_rclpy:
            rclpy.init(args=ros_args)
        self.node = Node(config.node_name)
        self.config = self._with_parameters(config)
        self._lock = threading.Lock()
        self._positions: dict[str, tuple[float, float, float]] = {}  # name -> (position, velocity, received_at)
        self._frames: list[tuple[object, float] | None] = [None] * len(self.config.camera_topics)
        self._last_command: np.ndarray | None = None
        self._publish = self._make_publisher()
        self.node.create_subscription(JointState, self.config.joint_state_topic, self._on_joint_state, 10)
        for i, (topic, kind) in enumerate(zip(self.config.camera_topics, self.config.camera_types)):
            msg_type = CompressedImage if kind == "compressed" else Image
            self.node.create_subscription(
                msg_type, topic, lambda msg, i=i: self._on_frame(i, msg), qos_profile_sensor_data
            )
        self._executor = SingleThreadedExecutor()
        self._executor.add_node(self.node)
        self._spinner = threading.Thread(target=self._executor.spin, name="ros2-spin", daemon=True)
        self._spinner.start()
        logger.info(
            "ROS 2: state from %s (%d joints), %d cameras, commands to %s as %s",
            self.config.joint_state_topic,
            len(self.config.joint_names),
            len(self.config.camera_topics),
            self.config.command_topic,
            self.config.command_type,
        )

    @property
    def num_joints(self) -> int:
        return len(self.config.joint_names)

    def _with_parameters(self, config: Ros2Config) -> Ros2Config:
        """Declare every setting as a ROS parameter (YAML value as default) and read back overrides."""
        values = asdict(config)
        for name, value in values.items():
            if isinstance(value, list) and not value:
                continue  # rclpy cannot infer the type of an empty list: such a setting comes from the YAML only
            values[name] = self.node.declare_parameter(name, value).value
        values["joint_names"] = list(values["joint_names"])
        values["camera_topics"] = list(values["camera_topics"])
        values["camera_types"] = list(values["camera_types"])
        return Ros2Config.from_dict(values)

    def _make_publisher(self):
        cfg = self.config
        if cfg.command_type == "joint_trajectory":
            from builtin_interfaces.msg import Duration
            from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

            publisher = self.node.create_publisher(JointTrajectory, cfg.command_topic, 10)
            ahead = cfg.trajectory_time_from_start_s or 1.0 / cfg.control_frequency
            sec = int(ahead)
            reach = Duration(sec=sec, nanosec=round((ahead - sec) * 1e9))

            def publish(positions: list[float] | None) -> None:
                # No positions: an empty trajectory, which stops the controller where it is.
                points = [] if positions is None else [JointTrajectoryPoint(positions=positions, time_from_start=reach)]
                publisher.publish(JointTrajectory(joint_names=list(cfg.joint_names), points=points))

            return publish
        from std_msgs.msg import Float64MultiArray

        publisher = self.node.create_publisher(Float64MultiArray, cfg.command_topic, 10)

        def publish(positions: list[float] | None) -> None:
            if positions is not None:
                publisher.publish(Float64MultiArray(data=positions))

        return publish

    # --- subscriptions (executor thread) -------------------------------------

    def _on_joint_state(self, msg) -> None:
        now = self._clock()
        velocities = list(msg.velocity)
        with self._lock:
            for i, name in enumerate(msg.name):
                velocity = velocities[i] if i < len(velocities) else 0.0
                self._positions[name] = (float(msg.position[i]), float(velocity), now)

    def _on_frame(self, index: int, msg) -> None:
        try:
            frame = compressed_to_frame(msg) if self.config.camera_types[index] == "compressed" else image_to_rgb(msg)
        except ValueError as err:
            logger.warning("camera %s: %s", self.config.camera_topics[index], err)
            return
        with self._lock:
            self._frames[index] = (frame, self._clock())

    # --- RobotPort (control thread) ------------------------------------------

    def observe(self) -> Observation:
        now, cfg = self._clock(), self.config
        with self._lock:
            joints = [self._positions.get(name) for name in cfg.joint_names]
            frames = list(self._frames)
        missing = [name for name, j in zip(cfg.joint_names, joints) if j is None]
        if missing:
            raise ObservationUnavailable(f"{cfg.joint_state_topic}: no position yet for joints {missing}")
        stale = [name for name, j in zip(cfg.joint_names, joints) if now - j[2] > cfg.max_sensor_age_s]
        if stale:
            raise ObservationUnavailable(f"{cfg.joint_state_topic}: joints {stale} older than {cfg.max_sensor_age_s} s")
        for topic, frame in zip(cfg.camera_topics, frames):
            if frame is None:
                raise ObservationUnavailable(f"{topic}: no image yet")
            if now - frame[1] > cfg.max_sensor_age_s:
                raise ObservationUnavailable(f"{topic}: last image is {now - frame[1]:.2f} s old")
        state = [j[0] for j in joints] + ([j[1] for j in joints] if cfg.include_velocity else [])
        return Observation(images=[f[0] for f in frames], state=np.asarray(state, np.float32))

    def apply_action(self, action: np.ndarray) -> None:
        n = self.num_joints
        if len(action) < n:
            raise ValueError(f"action has {len(action)} values for {n} joints {self.config.joint_names}")
        command = np.asarray(action[:n], dtype=np.float64)
        self._last_command = command
        self._publish(command.tolist())

    def hold(self) -> None:
        if self.config.command_type == "joint_trajectory":
            self._publish(None)
        elif self.config.hold_command == "zero":
            self._publish([0.0] * self.num_joints)
        elif self._last_command is not None:
            self._publish(self._last_command.tolist())

    def close(self) -> None:
        self._executor.shutdown()
        self._spinner.join(timeout=2.0)
        self.node.destroy_node()
        if self._owns_rclpy and self._rclpy.ok():
            self._rclpy.shutdown()
