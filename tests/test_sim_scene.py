"""The simulated robot: what the policy sees, the expert, the demonstrations, real-time stepping."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is first imported

pytest.importorskip("mujoco")
pytest.importorskip("gymnasium")

from robot_client.robot import RobotPort
from sim.agents import ExpertAgent, RandomAgent, run_sim_episodes
from sim.demos import CHUNK, make_dataset
from sim.expert import ReachExpert
from sim.robot import SimRobot
from sim.scene import ACTION_DIM, CONTROL_DT, IMAGE_HW, STATE_DIM, ReacherScene, reached, setpoint

SEEDS = range(10_000, 10_005)  # the first closed-loop benchmark seeds


@pytest.fixture(scope="module")
def scene():
    s = ReacherScene()
    yield s
    s.close()


def move_target(scene: ReacherScene, xy) -> None:
    qpos, qvel = scene.data.qpos.copy(), scene.data.qvel.copy()
    qpos[2:4] = xy
    scene.env.set_state(qpos, qvel)


def test_the_policy_state_carries_no_target_but_the_cameras_see_it(scene):
    scene.reset(3)
    state, frames = scene.policy_state(), scene.render()
    move_target(scene, -scene.target)
    assert state.shape == (STATE_DIM,)
    np.testing.assert_array_equal(scene.policy_state(), state)  # the target is not in the state ...
    moved = scene.render()
    assert len(frames) == 2 and all(f.shape == (*IMAGE_HW, 3) and f.dtype == np.uint8 for f in frames)
    for before, after in zip(frames, moved):
        assert before.std() > 10  # a real rendered scene, not a blank frame
        assert np.abs(before.astype(int) - after.astype(int)).max() > 50  # ... but it is in both images


def test_the_expert_reaches_every_target_and_a_random_policy_does_not():
    assert run_sim_episodes(ExpertAgent(), SEEDS).success_rate == 1.0
    assert run_sim_episodes(RandomAgent(), SEEDS).success_rate == 0.0


def test_success_needs_the_target_held():
    assert reached([0.01] * 5) and not reached([0.01] * 4 + [0.05] + [0.01] * 4)


def test_demonstrations_label_each_frame_with_the_next_chunk_of_expert_torques():
    data = make_dataset(2, ticks=10, burst_prob=0.0, log=None)
    assert data.images.shape == (20, 2, *IMAGE_HW, 3) and data.actions.shape == (20, CHUNK, ACTION_DIM)
    np.testing.assert_array_equal(data.actions[1, :-1], data.actions[0, 1:])  # consecutive frames: shifted chunks
    assert np.abs(data.actions[..., :2]).max() <= 1.0 and np.abs(data.actions[..., 2]).max() <= 3.0


def test_sim_robot_is_a_robot_port_that_runs_in_real_time_and_holds():
    robot = SimRobot(ticks=10)
    try:
        assert isinstance(robot, RobotPort)
        robot.reset(10_000)
        first = robot.observe()
        assert len(first.images) == 2 and first.state.shape == (STATE_DIM,)
        started = time.monotonic()
        robot.start()
        record = robot.wait(timeout_s=10)
        elapsed = time.monotonic() - started
        assert record.ticks == 10 and all(record.held)  # no command yet: the arm holds its pose
        assert elapsed >= 9 * CONTROL_DT  # wall-clock time, not as fast as possible
        np.testing.assert_allclose(robot.observe().state[:4], first.state[:4], atol=0.05)
    finally:
        robot.close()


def test_the_expert_commands_the_inverse_kinematics_setpoint(scene):
    scene.reset(10_000)
    q, qd = scene.joints
    goal = setpoint(ReachExpert().action(q, qd, scene.target))
    qpos, qvel = scene.data.qpos.copy(), scene.data.qvel.copy()
    qpos[:2], qvel[:2] = goal, 0.0
    scene.env.set_state(qpos, qvel)
    assert scene.distance() < 1e-6
