"""The trained demo checkpoint drives the simulated robot through the real app (Serve gRPC proxy on loopback)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported
pytestmark = pytest.mark.serve

pytest.importorskip("mujoco")
pytest.importorskip("gymnasium")

from robot_client.chunk_executor import ExecutorConfig
from sim.episode import SyncChunkExecutor, run_episode
from sim.network_delay import DelayedPolicyClient
from sim.robot import SimRobot


def test_a_closed_loop_episode_through_the_app_reaches_targets(demo_app):
    client = DelayedPolicyClient(demo_app, timeout_s=10)
    robot = SimRobot()
    try:
        assert client.wait_ready(30).image_hw == (96, 96)
        record, stats = run_episode(robot, client, seed=10_000, execution="async")
    finally:
        robot.close()
        client.close()
    assert stats["chunks_accepted"] >= 2 and stats["failures"] == {}
    assert not all(record.held)  # the served policy moved the arm
    assert record.reached >= 1, f"no target reached; closest approach {min(record.distances):.3f} m"


def test_added_delay_lengthens_every_round_trip(demo_app):
    timings = {}
    for delay_ms in (0, 60):
        client = DelayedPolicyClient(demo_app, delay_ms=delay_ms, timeout_s=10)
        try:
            client.health()
            started = time.monotonic()
            client.health()
            timings[delay_ms] = time.monotonic() - started
        finally:
            client.close()
    assert timings[60] - timings[0] >= 0.11  # 60 ms out + 60 ms back


def test_sync_execution_asks_only_when_the_chunk_has_run_out():
    executor = SyncChunkExecutor(ExecutorConfig(control_period_s=0.04))
    assert executor.should_request(0)
    request = executor.make_request(0, 0.0, "r1")
    executor.accept(request, np.zeros((16, 2)), tick=2, now=0.08)
    assert not any(executor.should_request(t) for t in range(2, 17))
    assert executor.should_request(17)


def test_the_documented_episode_command_reports_its_outcome(demo_app, capsys):
    from sim.episode import main

    code = main(["--server_address", demo_app, "--seed", "10000", "--timeout", "10"])
    out = capsys.readouterr().out
    assert '"targets_reached"' in out and ("SUCCESS" in out) == (code == 0)
