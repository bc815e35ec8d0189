"""The command line's defaults: which robot `--robot auto` drives, and which call mode a robot uses.

rclpy is hidden (None in sys.modules: its import fails) or stood in for by an
empty module, so these tests say the same on a machine with ROS 2 installed.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types

import pytest

from robot_client.__main__ import choose_robot, parser
from robot_client.policy_client import PolicyClient
from robot_client.replay_robot import ReplayRobot
from tests.conftest import REPO_ROOT, free_port

WITHOUT_RCLPY = (
    "import sys; sys.modules['rclpy'] = None; from robot_client.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


def args(*extra: str):
    parsed = parser().parse_args(["--prompt", "x", *extra])
    parsed.ros_args = ["robot_client"]
    return parsed


@pytest.mark.parametrize("robot", [[], ["--robot", "auto"]])
def test_without_rclpy_auto_refuses_with_one_line_saying_how_to_get_ros2_or_ask_for_replay(robot):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_RCLPY, "--server_address", f"127.0.0.1:{free_port()}", "--prompt", "x", *robot],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("robot_client: error:")]
    assert line.startswith("robot_client: error: --robot auto: rclpy does not import (import of rclpy halted")
    assert 'pip install "robot-policy-serve[ros2]"' in line and "setup.bash" in line and "--robot replay" in line
    assert "Traceback" not in result.stderr and "running at" not in result.stderr  # no robot ran, replay or other
    assert time.monotonic() - started < 30


def test_only_an_explicit_replay_runs_the_replay_robot(monkeypatch):
    monkeypatch.setitem(sys.modules, "rclpy", None)
    robot, frequency = choose_robot(args("--robot", "replay", "--num_cameras", "1"), 30.0)
    assert isinstance(robot, ReplayRobot) and frequency == 30.0


def test_auto_with_rclpy_importable_is_the_ros2_robot(monkeypatch):
    monkeypatch.setitem(sys.modules, "rclpy", types.ModuleType("rclpy"))
    with pytest.raises(ValueError, match="--robot ros2 needs --ros_config FILE"):
        choose_robot(args("--robot", "auto"), 30.0)


def test_a_robot_streams_unless_told_otherwise():
    assert args().mode == "stream" and args("--mode", "unary").mode == "unary"
    client = PolicyClient(f"127.0.0.1:{free_port()}")  # never contacted
    assert client.mode == "stream"
    client.close()
