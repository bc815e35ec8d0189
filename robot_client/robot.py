"""The robot port: the only thing the control loop knows about a robot.

A ROS 2 robot, a simulator and a recorded log are three implementations of
these three methods. The loop calls them from one thread, at the control
frequency, so each must return quickly (read the latest sensor values, send a
command); anything slow belongs in the robot's own threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Observation:
    """What the robot sees now, in the robot's own units."""

    # One entry per camera, in the order the policy expects: HxWx3 pixels
    # (uint8 RGB or float in [0, 1]) or an EncodedFrame that is already JPEG/PNG.
    images: list = field(default_factory=list)
    state: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (state_dim,)


class ObservationUnavailable(RuntimeError):
    """The robot cannot produce a complete, fresh observation right now (a sensor is missing or stale).

    The loop skips the request and retries on a later tick; the watchdog keeps
    the robot safe meanwhile.
    """


@runtime_checkable
class RobotPort(Protocol):
    def observe(self) -> Observation:
        """The latest observation; raise ObservationUnavailable if it is incomplete or stale."""

    def apply_action(self, action: np.ndarray) -> None:
        """Command one action (one row of a chunk, robot units)."""

    def hold(self) -> None:
        """Stop safely: hold position, brake, or whatever this robot's stop is."""
