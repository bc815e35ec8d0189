"""A ROS 2 robot's side of the graph, for tests: sensor publishers and controller command subscribers.

Real rclpy and real DDS (loopback only, a domain of this process's own: testbed/ros2_env.py),
in a context of its own, spun on its own thread, so it talks to the adapter under test exactly
as another process's driver would.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import numpy as np

from testbed.ros2_env import keep_ros_on_loopback

keep_ros_on_loopback()

import rclpy  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402
from rclpy.time import Time  # noqa: E402


def wait_until(condition, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(f"{what} not met within {timeout_s} s")


def stamp_msg(seconds: float):
    return Time(nanoseconds=int(round(seconds * 1e9))).to_msg()


class Driver:
    """Publishes what a robot's drivers would; records what reaches its controllers' topics."""

    def __init__(self, name: str = "test_driver"):
        self.context = Context()
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        self.node = Node(name, context=self.context)
        self.received: dict[str, list] = defaultdict(list)
        self._lock = threading.Lock()
        self._publishers = {}
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._executor.spin, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return self.node.get_clock().now().nanoseconds * 1e-9

    def publisher(self, msg_type, topic: str, sensor: bool = False):
        if topic not in self._publishers:
            self._publishers[topic] = self.node.create_publisher(
                msg_type, topic, qos_profile_sensor_data if sensor else 10
            )
        return self._publishers[topic]

    def publish(self, topic: str, msg, sensor: bool = False, wait_s: float = 10.0) -> None:
        """Publish once the topic has a subscriber (discovery takes a moment)."""
        first = topic not in self._publishers
        publisher = self.publisher(type(msg), topic, sensor)
        wait_until(lambda: publisher.get_subscription_count() > 0, wait_s, f"a subscriber on {topic}")
        if first:
            # The publisher sees the reader before the reader has matched the publisher; what is
            # sent in between is lost (best effort) or never resent (volatile). Let both sides match.
            time.sleep(0.3)
        publisher.publish(msg)

    def listen(self, msg_type, topic: str) -> None:
        def keep(msg, topic=topic):
            with self._lock:
                self.received[topic].append((time.monotonic(), msg))

        self.node.create_subscription(msg_type, topic, keep, 100)

    def messages(self, topic: str) -> list:
        with self._lock:
            return [m for _, m in self.received[topic]]

    def timed(self, topic: str) -> list[tuple[float, object]]:
        with self._lock:
            return list(self.received[topic])

    def joint_state(self, names, positions, velocities=(), stamp: float | None = None, topic="/joint_states"):
        from sensor_msgs.msg import JointState

        msg = JointState(name=list(names), position=[float(p) for p in positions],
                         velocity=[float(v) for v in velocities])
        msg.header.stamp = stamp_msg(self.now() if stamp is None else stamp)
        self.publish(topic, msg)

    def image(self, topic: str, pixels: np.ndarray, encoding: str = "rgb8", pad: int = 0, stamp: float | None = None):
        from sensor_msgs.msg import Image

        h, w, c = pixels.shape
        rows = np.zeros((h, w * c + pad), np.uint8)
        rows[:, : w * c] = pixels.reshape(h, w * c)
        msg = Image(height=h, width=w, encoding=encoding, step=w * c + pad, data=rows.tobytes())
        msg.header.stamp = stamp_msg(self.now() if stamp is None else stamp)
        self.publish(topic, msg, sensor=True)

    def compressed(self, topic: str, data: bytes, fmt: str = "rgb8; jpeg compressed bgr8", stamp: float | None = None):
        from sensor_msgs.msg import CompressedImage

        msg = CompressedImage(format=fmt, data=data)
        msg.header.stamp = stamp_msg(self.now() if stamp is None else stamp)
        self.publish(topic, msg, sensor=True)

    def close(self) -> None:
        self._executor.shutdown()
        self._thread.join(timeout=2.0)
        self.node.destroy_node()
        if self.context.ok():
            self.context.shutdown()
