"""The ROS 2 robot port (rclpy): sensors in, controller commands out, through the safety layer.

This is the only module that imports rclpy and ROS message packages, and it does so when a
Ros2Robot is built, so the rest of the package (and a laptop without ROS) never needs them.
Install: `pip install "robot-policy-serve[ros2]"` (ROS 2 Kilted wheels from PyPI), or source a
ROS 2 installation.

- State: `sensor_msgs/JointState` on `joint_state_topic`, matched by the configured
  `joint_names` (never by index: drivers publish joints in any order, and some split them over
  several messages), arranged by `state_layout` (robot_client/joint_layout.py).
- Cameras: `sensor_msgs/Image` (rgb8, bgr8, rgba8, bgra8, mono8, mono16) or
  `sensor_msgs/CompressedImage` (JPEG/PNG, passed through untouched).
- Time: sensor ages and the pairing of frames with joint states come from header stamps, read
  on the node's ROS clock, so `use_sim_time` works; a driver that leaves stamps at zero gets its
  messages' arrival time instead (and one warning). Frames are paired with the joint sample
  nearest their stamp; cameras or joints further apart than `max_sensor_skew_s` make the
  observation unavailable, as do sensors older than `max_sensor_age_s`.
- Commands, to a ros2_control controller, after the safety layer (robot_client/safety.py):
  `std_msgs/Float64MultiArray` for a forward command controller (position or velocity
  interface), or `trajectory_msgs/JointTrajectory` for the joint trajectory controller: the rest
  of the chunk as one trajectory, points one control period apart from the header stamp, each
  new chunk replacing the tail (`trajectory_mode: chunk`), or one point a period ahead per tick
  (`point`).
- Hold: a position controller gets its last command again; the joint trajectory controller an
  empty trajectory (it stops where it is); a velocity controller a ramp down to zero within the
  acceleration limit, published on the node's own timer so it finishes even after the control
  loop has stopped. After a hold the next command ramps from the measured position.

Settings come from a YAML file (plain, or a ROS 2 params file with `<node>: {ros__parameters:
...}`); scalar and list settings can be overridden with ROS parameters (`--ros-args -p
control_frequency:=15.0`). The `safety` section is read from the YAML only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from robot_client.image_codec import EncodedFrame
from robot_client.joint_layout import JointLayout
from robot_client.robot import Observation, ObservationUnavailable
from robot_client.safety import INTERFACES, SafetyConfig, SafetyLayer

logger = logging.getLogger("robot_client")
COMMAND_TYPES = ("float64_multi_array", "joint_trajectory")
CAMERA_TYPES = ("image", "compressed")
TRAJECTORY_MODES = ("chunk", "point")
JOINT_HISTORY_S = 1.0  # joint samples kept for pairing with frames: more than any camera's latency
ROS2_INSTALL_HINT = 'pip install "robot-policy-serve[ros2]" (ROS 2 Kilted wheels), or source a ROS 2 setup.bash'


@dataclass
class Ros2Config:
    joint_names: list[str] = field(default_factory=list)
    joint_state_topic: str = "/joint_states"
    camera_topics: list[str] = field(default_factory=list)
    # Per camera topic: "image" or "compressed". Empty: guessed, ".../compressed" is compressed.
    camera_types: list[str] = field(default_factory=list)
    command_topic: str = "/forward_position_controller/commands"
    command_type: str = "float64_multi_array"
    command_interface: str = "position"  # what the controller takes: joint positions or velocities
    trajectory_mode: str = "chunk"  # joint_trajectory: the rest of the chunk, or one point per tick
    trajectory_time_from_start_s: float = 0.0  # time of the first point; 0: one control period
    state_layout: list[str] = field(default_factory=list)  # empty: positions (+ velocities)
    action_layout: list[str] = field(default_factory=list)  # empty: one command per joint
    include_velocity: bool = False  # with the default state layout: positions, then velocities
    max_sensor_age_s: float = 0.5  # older joint states or frames make the observation unavailable
    max_sensor_skew_s: float = 0.05  # frames and joint samples further apart in time: not one observation
    control_frequency: float = 30.0
    node_name: str = "policy_client"
    use_sim_time: bool = False
    safety: dict = field(default_factory=dict)  # robot_client.safety.SafetyConfig, YAML only

    def __post_init__(self):
        # ROS parameters are typed by their first value: 30 would make control_frequency an integer.
        for name in ("trajectory_time_from_start_s", "max_sensor_age_s", "max_sensor_skew_s", "control_frequency"):
            setattr(self, name, float(getattr(self, name)))
        for name in ("joint_names", "camera_topics", "camera_types", "state_layout", "action_layout"):
            setattr(self, name, [str(v) for v in getattr(self, name)])
        if not self.camera_types:
            self.camera_types = [
                "compressed" if t.rstrip("/").endswith("compressed") else "image" for t in self.camera_topics
            ]
        problems = []
        if not self.joint_names:
            problems.append("joint_names is empty: list the joints the policy commands")
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
        if self.command_interface not in INTERFACES:
            problems.append(f"command_interface must be one of {INTERFACES}, got {self.command_interface!r}")
        if self.command_type == "joint_trajectory" and self.command_interface != "position":
            problems.append("command_type joint_trajectory sends positions: use command_interface: position")
        if self.trajectory_mode not in TRAJECTORY_MODES:
            problems.append(f"trajectory_mode must be one of {TRAJECTORY_MODES}, got {self.trajectory_mode!r}")
        if min(self.control_frequency, self.max_sensor_age_s, self.max_sensor_skew_s) <= 0:
            problems.append("control_frequency, max_sensor_age_s and max_sensor_skew_s must be > 0")
        if not isinstance(self.safety, dict):
            problems.append("safety must be a mapping (position_min, position_max, max_velocity, ...)")
        if problems:
            raise ValueError("ROS 2 config: " + "; ".join(problems))
        try:
            self.layout = JointLayout.build(
                self.joint_names, self.state_layout, self.action_layout, self.command_interface,
                self.include_velocity,
            )
            self.safety_config = SafetyConfig.from_dict(self.safety, len(self.joint_names))
        except ValueError as err:
            raise ValueError(f"ROS 2 config: {err}") from None

    @property
    def period_s(self) -> float:
        return 1.0 / self.control_frequency

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


@dataclass(frozen=True)
class JointSample:
    stamp: float  # s, on the ROS clock
    position: float
    velocity: float  # NaN when the driver sent none


def nearest(samples, t: float) -> JointSample:
    return min(samples, key=lambda s: abs(s.stamp - t))


class Ros2Robot:
    """RobotPort over rclpy, in a context of its own; subscriptions are served on their own thread."""

    def __init__(self, config: Ros2Config, *, ros_args: list[str] | None = None):
        try:
            import rclpy
            from rclpy.context import Context
            from rclpy.executors import SingleThreadedExecutor
            from rclpy.node import Node
            from rclpy.parameter import Parameter
            from rclpy.qos import qos_profile_sensor_data
            from rclpy.signals import SignalHandlerOptions
            from sensor_msgs.msg import CompressedImage, Image, JointState
        except ImportError as err:
            raise ImportError(f"the ROS 2 robot needs rclpy ({err}): {ROS2_INSTALL_HINT}") from None

        self._context = Context()
        # No rclpy signal handlers: Ctrl-C and SIGTERM belong to robot_client, which holds the
        # robot before this context goes; rclpy's would shut it down first.
        rclpy.init(args=ros_args, context=self._context, signal_handler_options=SignalHandlerOptions.NO)
        self.node = Node(config.node_name, context=self._context)
        self.config = self._with_parameters(config)
        if self.config.use_sim_time and not self.node.get_parameter("use_sim_time").value:
            self.node.set_parameters([Parameter("use_sim_time", value=True)])
        self.layout = self.config.layout
        self.safety = SafetyLayer(
            self.config.safety_config, self.config.period_s, len(self.config.joint_names), self.layout.interface
        )
        # Reentrant: the command path reads the measured positions under the lock it already holds.
        self._lock = threading.RLock()
        self._joints: dict[str, deque[JointSample]] = {n: deque() for n in self.config.joint_names}
        self._frames: list[tuple[object, float] | None] = [None] * len(self.config.camera_topics)
        self._unstamped: set[str] = set()
        self._target: np.ndarray | None = None  # the last decoded command, before the safety layer
        self._stop_timer = None
        self._publish = self._make_publisher()
        self.node.create_subscription(JointState, self.config.joint_state_topic, self._on_joint_state, 10)
        for i, (topic, kind) in enumerate(zip(self.config.camera_topics, self.config.camera_types)):
            msg_type = CompressedImage if kind == "compressed" else Image
            self.node.create_subscription(
                msg_type, topic, lambda msg, i=i: self._on_frame(i, msg), qos_profile_sensor_data
            )
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self.node)
        self._spinner = threading.Thread(target=self._executor.spin, name="ros2-spin", daemon=True)
        self._spinner.start()
        logger.info(
            "ROS 2: state from %s (%d joints), %d cameras, commands to %s as %s (%s%s), %s clock; safety: %s",
            self.config.joint_state_topic,
            len(self.config.joint_names),
            len(self.config.camera_topics),
            self.config.command_topic,
            self.config.command_type,
            self.layout.interface,
            f", {self.config.trajectory_mode}" if self.config.command_type == "joint_trajectory" else "",
            "sim" if self.node.get_parameter("use_sim_time").value else "system",
            self.config.safety_config.describe(),
        )

    @property
    def num_joints(self) -> int:
        return len(self.config.joint_names)

    @property
    def action_width(self) -> int:
        """Values of the model's action vector this robot uses (control_loop checks the model has them)."""
        return self.layout.action_width

    @property
    def max_action_age_s(self) -> float | None:
        return self.config.safety_config.max_action_age_s

    @property
    def follows_plans(self) -> bool:
        """Whether follow_plan hands the controller whole trajectories (robot_client.control_loop)."""
        return self.config.command_type == "joint_trajectory" and self.config.trajectory_mode == "chunk"

    def _with_parameters(self, config: Ros2Config) -> Ros2Config:
        """Declare every scalar and list setting as a ROS parameter (YAML value as default), read back overrides."""
        values = asdict(config)
        for name, value in values.items():
            if name == "use_sim_time" or isinstance(value, dict) or (isinstance(value, list) and not value):
                # use_sim_time: rclpy declares it itself. Mappings and empty lists (rclpy cannot
                # type them) come from the YAML only.
                continue
            values[name] = self.node.declare_parameter(name, value).value
        for name in ("joint_names", "camera_topics", "camera_types", "state_layout", "action_layout"):
            values[name] = list(values[name])
        return Ros2Config.from_dict(values)

    def _now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def _stamp(self, msg, source: str) -> float:
        stamp = msg.header.stamp
        if stamp.sec == 0 and stamp.nanosec == 0:
            if source not in self._unstamped:
                self._unstamped.add(source)
                logger.warning("%s: messages carry no header stamp; using their arrival time", source)
            return self._now()
        return stamp.sec + stamp.nanosec * 1e-9

    def _make_publisher(self):
        cfg = self.config
        if cfg.command_type == "joint_trajectory":
            from builtin_interfaces.msg import Duration
            from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

            publisher = self.node.create_publisher(JointTrajectory, cfg.command_topic, 10)
            first = cfg.trajectory_time_from_start_s or cfg.period_s

            def at(t: float) -> Duration:
                sec = int(t)
                return Duration(sec=sec, nanosec=round((t - sec) * 1e9))

            def publish(rows: np.ndarray | None) -> None:
                # Rows one period apart from the stamp; none: an empty trajectory, which stops the
                # controller where it is.
                message = JointTrajectory(joint_names=list(cfg.joint_names))
                message.header.stamp = self.node.get_clock().now().to_msg()
                if rows is not None:
                    message.points = [
                        JointTrajectoryPoint(positions=row.tolist(), time_from_start=at(first + i * cfg.period_s))
                        for i, row in enumerate(np.atleast_2d(rows))
                    ]
                publisher.publish(message)

            return publish
        from std_msgs.msg import Float64MultiArray

        publisher = self.node.create_publisher(Float64MultiArray, cfg.command_topic, 10)

        def publish(rows: np.ndarray | None) -> None:
            if rows is not None:
                publisher.publish(Float64MultiArray(data=np.atleast_2d(rows)[0].tolist()))

        return publish

    # --- subscriptions (executor thread) -------------------------------------

    def _on_joint_state(self, msg) -> None:
        stamp = self._stamp(msg, self.config.joint_state_topic)
        velocities = list(msg.velocity)
        with self._lock:
            for i, name in enumerate(msg.name):
                history = self._joints.get(name)
                if history is None or i >= len(msg.position):
                    continue
                velocity = float(velocities[i]) if i < len(velocities) else float("nan")
                history.append(JointSample(stamp, float(msg.position[i]), velocity))
                while history and history[0].stamp < stamp - JOINT_HISTORY_S:
                    history.popleft()

    def _on_frame(self, index: int, msg) -> None:
        topic = self.config.camera_topics[index]
        try:
            frame = compressed_to_frame(msg) if self.config.camera_types[index] == "compressed" else image_to_rgb(msg)
        except ValueError as err:
            logger.warning("camera %s: %s", topic, err)
            return
        stamp = self._stamp(msg, topic)
        with self._lock:
            self._frames[index] = (frame, stamp)

    # --- RobotPort (control thread) ------------------------------------------

    def measured_positions(self) -> np.ndarray | None:
        with self._lock:
            latest = [h[-1] if h else None for h in self._joints.values()]
        return None if any(s is None for s in latest) else np.array([s.position for s in latest])

    def observe(self) -> Observation:
        cfg = self.config
        now = self._now()
        with self._lock:
            histories = {name: list(h) for name, h in self._joints.items()}
            frames = list(self._frames)
        missing = [name for name, h in histories.items() if not h]
        if missing:
            raise ObservationUnavailable(f"{cfg.joint_state_topic}: no position yet for joints {missing}")
        for topic, frame in zip(cfg.camera_topics, frames):
            if frame is None:
                raise ObservationUnavailable(f"{topic}: no image yet")
        if frames:
            stamps = [f[1] for f in frames]
            if max(stamps) - min(stamps) > cfg.max_sensor_skew_s:
                raise ObservationUnavailable(
                    f"cameras out of step: frames {max(stamps) - min(stamps):.3f} s apart "
                    f"(max_sensor_skew_s {cfg.max_sensor_skew_s})"
                )
            t = float(np.mean(stamps))
        else:
            t = min(h[-1].stamp for h in histories.values())
        samples = [nearest(histories[name], t) for name in cfg.joint_names]
        skew = max(abs(s.stamp - t) for s in samples)
        if skew > cfg.max_sensor_skew_s:
            raise ObservationUnavailable(
                f"{cfg.joint_state_topic}: no joint state within {cfg.max_sensor_skew_s} s of the frames "
                f"(nearest {skew:.3f} s away)"
            )
        age = now - t
        if age > cfg.max_sensor_age_s or age < -cfg.max_sensor_skew_s:
            hint = "" if abs(age) < 3600 else "; sensors and this node on different clocks? (use_sim_time)"
            raise ObservationUnavailable(f"sensors are {age:.3f} s old (max_sensor_age_s {cfg.max_sensor_age_s}){hint}")
        positions = np.array([s.position for s in samples])
        velocities = np.array([s.velocity for s in samples])
        if self.layout.needs_velocity and not np.isfinite(velocities).all():
            raise ObservationUnavailable(f"{cfg.joint_state_topic}: the state layout needs velocities; none published")
        state = self.layout.state_vector(positions, velocities)
        return Observation(images=[f[0] for f in frames], state=state)

    def _targets(self, rows: np.ndarray) -> np.ndarray:
        """Action rows -> joint targets through the layout (before the safety layer), and the measured positions."""
        measured = self.measured_positions()
        if self.safety.last is None:
            self.safety.reset(measured if self.layout.interface == "position" else None)
        reference = self._target if self._target is not None else measured
        targets = []
        for row in rows:
            reference = self.layout.command(row, reference)
            targets.append(reference)
        return np.asarray(targets), measured

    def apply_action(self, action: np.ndarray) -> None:
        with self._lock:
            self._cancel_stop()
            (target,), measured = self._targets(np.atleast_2d(action))
            self._target = target
            command = self.safety.command(target, measured)
        if not self.follows_plans:  # a trajectory controller is already executing this row
            self._publish(command)

    def follow_plan(self, rows: np.ndarray) -> None:
        """The rows planned from this tick on, one period apart: one trajectory, replacing the tail."""
        with self._lock:
            self._cancel_stop()
            targets, measured = self._targets(rows)
            trajectory = self.safety.preview(targets, measured)
            self._target = targets[0]
            self.safety.command(targets[0], measured)
        self._publish(trajectory)

    def hold(self) -> None:
        with self._lock:
            if self.layout.interface == "velocity":
                self._start_stop()
                return
            last = self.safety.last
            self.safety.reset(None)
            self._target = None
        if self.config.command_type == "joint_trajectory":
            self._publish(None)
        elif last is not None:
            self._publish(last)

    # --- velocity hold: a ramp down on the node's own timer -------------------

    def _start_stop(self) -> None:
        if self._stop_timer is None:
            from rclpy.clock import Clock, ClockType

            # Steady time: a ramp that follows sim time would stall if the simulator paused.
            self._stop_timer = self.node.create_timer(
                self.config.period_s, self._stop_step, clock=Clock(clock_type=ClockType.STEADY_TIME)
            )
            self._stop_step_locked()

    def _stop_step(self) -> None:
        with self._lock:
            self._stop_step_locked()

    def _stop_step_locked(self) -> None:
        velocity = self.safety.stopping()
        if velocity is None:
            velocity = np.zeros(self.num_joints)
            self._cancel_stop()
            self.safety.reset(None)
            self._target = None
        self._publish(velocity)

    def _cancel_stop(self) -> None:
        if self._stop_timer is not None:
            self._stop_timer.cancel()
            self.node.destroy_timer(self._stop_timer)
            self._stop_timer = None

    @property
    def stopping(self) -> bool:
        with self._lock:
            return self._stop_timer is not None

    def close(self, stop_timeout_s: float = 5.0) -> None:
        """Let a velocity ramp finish (never leave a robot moving), then leave the ROS graph."""
        deadline = time.monotonic() + stop_timeout_s
        while self.stopping and time.monotonic() < deadline:
            time.sleep(self.config.period_s)
        self._executor.shutdown()
        self._spinner.join(timeout=2.0)
        self.node.destroy_node()
        if self._context.ok():
            self._context.shutdown()
