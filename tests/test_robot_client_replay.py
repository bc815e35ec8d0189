"""The replay robot: recordings on disk, replay on the wall clock, closed loop through commanded actions."""

from __future__ import annotations

import numpy as np
import pytest

from robot_client.image_codec import EncodedFrame
from robot_client.replay_robot import Recording, ReplayRobot, main, record_observations, synthetic_recording
from tests.robot_client_fixtures import FakeClock


def test_recording_round_trips_through_npz(tmp_path):
    rec = synthetic_recording(frames=5, num_cameras=3, height=20, width=30, state_dim=7, fps=15)
    loaded = Recording.load(rec.save(tmp_path / "rec.npz"))
    np.testing.assert_array_equal(loaded.images, rec.images)
    np.testing.assert_array_equal(loaded.state, rec.state)
    assert loaded.fps == 15 and loaded.num_cameras == 3 and loaded.images.shape == (5, 3, 20, 30, 3)


def test_bad_recordings_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="replay_robot synth"):
        Recording.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", frames=np.zeros(3))
    with pytest.raises(ValueError, match="not a robot_client recording"):
        Recording.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="cameras"):
        ReplayRobot(synthetic_recording(frames=2, num_cameras=1, height=8, width=8), num_cameras=2)


def test_replay_follows_the_clock_and_loops():
    clock = FakeClock()
    rec = synthetic_recording(frames=4, num_cameras=2, height=8, width=8, state_dim=3, fps=10)
    robot = ReplayRobot(rec, clock=clock, follow_commands=False)
    seen = []
    for _ in range(6):
        seen.append(robot.observe().state.copy())
        clock.sleep(0.1)
    expected = [rec.state[i % 4] for i in range(6)]
    np.testing.assert_array_equal(np.stack(seen), np.stack(expected))


def test_commanded_actions_come_back_in_the_state_closing_the_loop():
    clock = FakeClock()
    robot = ReplayRobot(synthetic_recording(frames=2, height=8, width=8, state_dim=6), clock=clock)
    robot.apply_action(np.array([9.0, 8.0, 7.0]))
    state = robot.observe().state
    np.testing.assert_array_equal(state[:3], [9, 8, 7])
    robot.hold()
    assert robot.holds == [clock()] and len(robot.applied) == 1


def test_jpeg_replay_hands_out_encoded_frames():
    robot = ReplayRobot(synthetic_recording(frames=2, height=16, width=16), as_jpeg=True, clock=FakeClock())
    images = robot.observe().images
    assert len(images) == 2 and all(isinstance(f, EncodedFrame) and f.encoding == "jpeg" for f in images)


def test_any_robot_port_can_be_recorded_for_replay():
    source = ReplayRobot(synthetic_recording(frames=3, height=12, width=16, state_dim=4), follow_commands=False)
    rec = record_observations(source, seconds=0.2, fps=50)
    assert rec.images.shape[1:] == (2, 12, 16, 3) and rec.state.shape[1] == 4 and len(rec.images) >= 3


def test_synth_command_writes_a_recording(tmp_path, capsys):
    out = tmp_path / "demo.npz"
    main(["synth", "--out", str(out), "--frames", "3", "--height", "24", "--width", "32", "--state_dim", "5"])
    assert "3 frames, 2 cameras 32x24, state dim 5" in capsys.readouterr().out
    assert Recording.load(out).state.shape == (3, 5)
