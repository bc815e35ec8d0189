"""robot_client: the package that runs on the robot.

Needs only grpcio, protobuf, numpy and pillow (plus rclpy on a ROS 2 robot,
imported only by robot_client.ros2_node). Never torch, never ray.
"""

from robot_client.chunk_executor import ChunkExecutor, ExecutorConfig
from robot_client.control_loop import ControlLoop, LoopConfig
from robot_client.errors import (
    AuthenticationFailed,
    IncompatibleServer,
    ObservationDropped,
    ObservationRejected,
    PolicyError,
    ServerUnavailable,
)
from robot_client.image_codec import EncodedFrame, encode_camera
from robot_client.policy_client import ActionChunk, PolicyClient
from robot_client.robot import Observation, ObservationUnavailable, RobotPort
from robot_client.server_spec import ServerSpec
from robot_client.watchdog import Watchdog

__all__ = [
    "ActionChunk",
    "AuthenticationFailed",
    "ChunkExecutor",
    "ControlLoop",
    "EncodedFrame",
    "ExecutorConfig",
    "IncompatibleServer",
    "LoopConfig",
    "Observation",
    "ObservationDropped",
    "ObservationRejected",
    "ObservationUnavailable",
    "PolicyClient",
    "PolicyError",
    "RobotPort",
    "ServerSpec",
    "ServerUnavailable",
    "Watchdog",
    "encode_camera",
]
