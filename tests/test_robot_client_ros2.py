"""The ROS 2 adapter on real rclpy and real DDS (loopback, a domain of this run's own).

A test driver node (tests/ros2_driver.py) plays the robot's drivers and controllers in a
context of its own; the adapter under test discovers it over DDS as it would another process.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.ros2_driver import Driver, wait_until  # first: puts ROS 2 on loopback before rclpy loads

from robot_client.control_loop import ControlLoop, LoopConfig  # noqa: E402
from robot_client.image_codec import EncodedFrame  # noqa: E402
from robot_client.robot import ObservationUnavailable  # noqa: E402
from robot_client.ros2_node import Ros2Config, Ros2Robot  # noqa: E402
from tests.payloads import encode, frame  # noqa: E402
from tests.robot_client_fixtures import FakeClock, ScriptedWorker, demo_spec  # noqa: E402

JOINTS = ["shoulder", "elbow", "wrist", "gripper"]


@pytest.fixture()
def driver():
    d = Driver()
    yield d
    d.close()


@pytest.fixture()
def make_robot():
    robots = []

    def make(ros_args=None, **config):
        config.setdefault("joint_names", JOINTS)
        # Generous: a first message on a topic waits for discovery. The age test sets its own.
        config.setdefault("max_sensor_age_s", 5.0)
        robot = Ros2Robot(Ros2Config(**config), ros_args=ros_args)
        robots.append(robot)
        return robot

    yield make
    for robot in robots:
        robot.close()


def observed(robot, until=lambda obs: True, timeout_s: float = 10.0):
    """The robot's observation once it is available and `until` holds (messages take a moment to arrive)."""

    def attempt():
        try:
            obs = robot.observe()
        except ObservationUnavailable:
            return None
        return obs if until(obs) else None

    return wait_until(attempt, timeout_s, "an observation")


def unavailable(robot, match: str, timeout_s: float = 10.0) -> str:
    def attempt():
        try:
            robot.observe()
        except ObservationUnavailable as err:
            return str(err) if match in str(err) else None
        return None

    return wait_until(attempt, timeout_s, f"ObservationUnavailable matching {match!r}")


def commanded(robot, driver, topic: str, msg_type) -> None:
    """Listen on a command topic and wait until the robot's publisher has found the listener."""
    driver.listen(msg_type, topic)
    wait_until(lambda: robot.node.count_subscribers(topic) > 0, 10.0, f"the driver listening on {topic}")


# --- sensors --------------------------------------------------------------------


def test_state_is_ordered_by_joint_names_across_split_messages(driver, make_robot):
    robot = make_robot(include_velocity=True)
    # The arm driver publishes its joints in its own order; the gripper comes from another driver.
    t = driver.now()
    driver.joint_state(["wrist", "shoulder", "elbow"], [3.0, 1.0, 2.0], [0.3, 0.1, 0.2], stamp=t)
    unavailable(robot, "no position yet for joints ['gripper']")
    driver.joint_state(["gripper", "unused"], [4.0, 9.0], [0.4, 0.0], stamp=t)
    np.testing.assert_allclose(observed(robot).state, [1, 2, 3, 4, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def test_a_state_layout_gives_the_policy_cos_sin_and_velocities(driver, make_robot):
    robot = make_robot(
        joint_names=["joint0", "joint1"],
        state_layout=["cos joint0", "cos joint1", "sin joint0", "sin joint1", "velocity joint0", "velocity joint1"],
        action_layout=["cos joint0", "sin joint0", "position joint1"],
    )
    driver.joint_state(["joint1", "joint0"], [0.5, 7.0], [-0.2, 0.1])
    state = observed(robot).state
    np.testing.assert_allclose(state, [np.cos(7.0), np.cos(0.5), np.sin(7.0), np.sin(0.5), 0.1, -0.2], rtol=1e-6)
    assert robot.action_width == 3


def test_sensor_age_comes_from_header_stamps(driver, make_robot):
    robot = make_robot(joint_names=["a"], camera_topics=["/cam/image_raw"], max_sensor_age_s=0.2)
    now = driver.now()
    driver.joint_state(["a"], [0.5], stamp=now - 1.0)
    unavailable(robot, "/cam/image_raw: no image yet")
    # Messages that arrive now but were taken a second ago are stale: the stamp counts, not the arrival.
    driver.image("/cam/image_raw", frame(8, 8), stamp=now - 1.0)
    message = unavailable(robot, "s old")
    assert "max_sensor_age_s 0.2" in message
    t = driver.now()
    driver.joint_state(["a"], [0.6], stamp=t)
    driver.image("/cam/image_raw", frame(8, 8), stamp=t)
    assert observed(robot, lambda o: o.state.tolist() == pytest.approx([0.6])).state.tolist() == pytest.approx([0.6])


def test_frames_are_paired_with_the_joint_sample_nearest_their_stamp(driver, make_robot):
    robot = make_robot(joint_names=["a"], camera_topics=["/cam/image_raw"], max_sensor_skew_s=0.02)
    driver.joint_state(["a"], [-1.0])  # discovery first: the stamps below must be fresh when they arrive
    driver.image("/cam/image_raw", frame(8, 8))
    t = driver.now()
    for k, offset in enumerate((-0.12, -0.08, -0.04, 0.0)):  # joint states at 25 Hz ...
        driver.joint_state(["a"], [float(k)], stamp=t + offset)
    driver.image("/cam/image_raw", frame(8, 8), stamp=t - 0.075)  # ... a frame taken between two of them
    obs = observed(robot)
    assert obs.state.tolist() == [1.0]  # the sample 5 ms from the frame, not the latest one
    driver.image("/cam/image_raw", frame(8, 8), stamp=t - 0.4)  # no joint sample within 20 ms of it
    unavailable(robot, "no joint state within 0.02 s of the frames")


def test_cameras_out_of_step_make_the_observation_unavailable(driver, make_robot):
    robot = make_robot(joint_names=["a"], camera_topics=["/left/image_raw", "/right/image_raw"],
                       max_sensor_skew_s=0.03)
    t = driver.now()
    driver.joint_state(["a"], [0.0], stamp=t)
    driver.image("/left/image_raw", frame(8, 8), stamp=t)
    driver.image("/right/image_raw", frame(8, 8), stamp=t - 0.1)
    unavailable(robot, "cameras out of step")
    driver.image("/right/image_raw", frame(8, 8), stamp=t)
    observed(robot)


def test_raw_images_become_rgb_and_compressed_ones_pass_through(driver, make_robot):
    robot = make_robot(joint_names=["a"], camera_topics=["/front/image_raw", "/wrist/image_raw/compressed",
                                                          "/side/mono"])
    assert robot.config.camera_types == ["image", "compressed", "image"]
    rgb = frame(6, 10)
    jpeg = encode(frame(48, 64), "JPEG")
    t = driver.now()
    driver.joint_state(["a"], [0.0], stamp=t)
    driver.image("/front/image_raw", rgb[:, :, ::-1].copy(), "bgr8", pad=4, stamp=t)  # BGR with row padding
    driver.compressed("/wrist/image_raw/compressed", jpeg, stamp=t)
    driver.image("/side/mono", rgb[:, :, :1].copy(), "mono8", stamp=t)
    front, wrist, side = observed(robot).images
    np.testing.assert_array_equal(front, rgb)
    assert wrist == EncodedFrame(jpeg, "jpeg")  # the camera's own JPEG, untouched
    np.testing.assert_array_equal(side, np.repeat(rgb[:, :, :1], 3, axis=2))


def test_sim_time_stamps_are_read_on_the_sim_clock(driver, make_robot):
    from rosgraph_msgs.msg import Clock

    wall = make_robot(joint_names=["a"], node_name="wall_clock_client")
    sim = make_robot(joint_names=["a"], node_name="sim_clock_client", use_sim_time=True)
    # A simulator's clock: 1000 s since it started, far from the system clock.
    for _ in range(3):
        driver.publish("/clock", Clock(clock=driver_stamp(1000.0)))
    wait_until(lambda: abs(sim._now() - 1000.0) < 1.0, 10.0, "the sim clock to reach the client")
    driver.joint_state(["a"], [0.25], stamp=1000.0)
    assert observed(sim).state.tolist() == [0.25]
    assert "use_sim_time" in unavailable(wall, "s old")  # on the system clock the stamps are decades old


def driver_stamp(seconds: float):
    from tests.ros2_driver import stamp_msg

    return stamp_msg(seconds)


# --- commands -------------------------------------------------------------------


def test_forward_position_commands_pass_the_safety_layer_and_hold_repeats_the_last(driver, make_robot):
    from std_msgs.msg import Float64MultiArray

    topic = "/forward_position_controller/commands"
    robot = make_robot(joint_names=["a", "b"], safety={"position_min": [-1.0, -1.0], "position_max": [1.0, 1.0]})
    commanded(robot, driver, topic, Float64MultiArray)
    driver.joint_state(["a", "b"], [0.0, 0.0])
    observed(robot)
    robot.apply_action(np.array([0.5, 3.0, 9.0]))  # b beyond its limit; the third value is not a joint
    robot.hold()
    sent = wait_until(lambda: len(driver.messages(topic)) >= 2 and driver.messages(topic), 5.0, "2 commands")
    assert [list(m.data) for m in sent] == [[0.5, 1.0]] * 2
    assert robot.safety.counters["position_clamped"] == 1
    with pytest.raises(ValueError, match="1 values"):
        robot.apply_action(np.zeros(1))


def test_a_jump_beyond_the_velocity_limit_is_ramped(driver, make_robot):
    from std_msgs.msg import Float64MultiArray

    topic = "/forward_position_controller/commands"
    robot = make_robot(joint_names=["a"], control_frequency=25.0,
                       safety={"max_velocity": 1.0, "max_acceleration": 10.0})
    commanded(robot, driver, topic, Float64MultiArray)
    driver.joint_state(["a"], [0.0])
    observed(robot)
    for _ in range(60):
        robot.apply_action(np.array([1.0]))  # 1 rad away at once
    sent = wait_until(lambda: len(driver.messages(topic)) >= 60 and driver.messages(topic), 5.0, "60 commands")
    positions = np.array([m.data[0] for m in sent])
    steps = np.diff(np.concatenate([[0.0], positions]))
    assert steps.max() <= 1.0 / 25.0 + 1e-9  # never faster than 1 rad/s
    assert positions[0] < 0.05 and positions[-1] == pytest.approx(1.0, abs=1e-6)
    assert robot.safety.counters["velocity_limited"] > 0


def test_velocity_controllers_decelerate_to_a_stop_on_hold(driver, make_robot):
    from std_msgs.msg import Float64MultiArray

    topic = "/forward_velocity_controller/commands"
    robot = make_robot(joint_names=["a", "b"], command_topic=topic, command_interface="velocity",
                       control_frequency=25.0, safety={"max_velocity": 2.0, "max_acceleration": 5.0})
    commanded(robot, driver, topic, Float64MultiArray)
    driver.joint_state(["a", "b"], [0.0, 0.0])
    observed(robot)
    for _ in range(20):
        robot.apply_action(np.array([1.0, -1.0]))
    robot.hold()  # the loop holds once; the ramp runs on the adapter's own timer
    wait_until(lambda: not robot.stopping, 5.0, "the stop ramp to finish")
    sent = [list(m.data) for m in wait_until(lambda: driver.messages(topic), 5.0, "commands")]
    ramp = np.array(sent[20:])
    assert ramp[-1].tolist() == [0.0, 0.0]  # it ends stopped: a forward velocity controller keeps its last command
    assert len(ramp) >= int(1.0 / (5.0 / 25.0))  # 1 rad/s down at 0.2 rad/s per tick: not in one step
    assert np.all(np.abs(np.diff(ramp[:, 0])) <= 5.0 / 25.0 + 1e-9)
    assert robot.safety.counters["stopping"] >= 4


def test_joint_trajectory_chunk_mode_sends_the_rest_of_the_chunk_as_one_trajectory(driver, make_robot):
    from trajectory_msgs.msg import JointTrajectory

    topic = "/joint_trajectory_controller/joint_trajectory"
    robot = make_robot(command_type="joint_trajectory", command_topic=topic, control_frequency=20)
    assert robot.follows_plans
    commanded(robot, driver, topic, JointTrajectory)
    rows = np.arange(40, dtype=np.float64).reshape(8, 5) / 100  # 8 rows of a 5-wide model, 4 joints
    before = driver.now()
    robot.follow_plan(rows)
    robot.apply_action(rows[1])  # the controller is executing this row already: nothing is sent
    robot.hold()
    move, stop = wait_until(lambda: len(driver.messages(topic)) >= 2 and driver.messages(topic), 5.0, "2 messages")
    assert move.joint_names == JOINTS and len(move.points) == 8
    for i, point in enumerate(move.points):
        assert point.positions.tolist() == pytest.approx(rows[i, :4].tolist())
        assert point.time_from_start.sec * 1e9 + point.time_from_start.nanosec == pytest.approx((i + 1) * 50e6)
    assert move.header.stamp.sec + move.header.stamp.nanosec * 1e-9 >= before - 0.01
    assert stop.points == [] and stop.joint_names == JOINTS  # the controller stops where it is


def test_joint_trajectory_point_mode_sends_one_point_a_period_ahead(driver, make_robot):
    from trajectory_msgs.msg import JointTrajectory

    topic = "/joint_trajectory_controller/joint_trajectory"
    robot = make_robot(command_type="joint_trajectory", command_topic=topic, trajectory_mode="point",
                       control_frequency=20)
    assert not robot.follows_plans
    commanded(robot, driver, topic, JointTrajectory)
    robot.apply_action(np.array([0.1, 0.2, 0.3, 0.4, 9.0]))
    (move,) = wait_until(lambda: driver.messages(topic), 5.0, "a trajectory")
    (point,) = move.points
    assert point.positions.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert (point.time_from_start.sec, point.time_from_start.nanosec) == (0, 50_000_000)


# --- settings -------------------------------------------------------------------


def test_settings_come_from_a_ros2_params_file_and_ros_args_override_them(driver, tmp_path):
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump({"policy_client": {"ros__parameters": {
        "joint_names": ["j1", "j2"],
        "camera_topics": ["/cam/compressed"],
        "control_frequency": 30,
        "command_type": "joint_trajectory",
        "command_topic": "/jtc/joint_trajectory",
        "safety": {"max_velocity": 2.0, "max_action_age_s": 0.8},
    }}}))
    config = Ros2Config.from_yaml(path)
    assert config.camera_types == ["compressed"] and config.control_frequency == 30.0
    assert config.safety_config.max_velocity == (2.0, 2.0)
    robot = Ros2Robot(config, ros_args=["robot_client", "--ros-args", "-p", "control_frequency:=15.0",
                                        "-p", "joint_state_topic:=/arm/joint_states"])
    try:
        assert robot.config.control_frequency == 15.0 and robot.config.joint_state_topic == "/arm/joint_states"
        assert robot.max_action_age_s == 0.8
        driver.joint_state(["j1", "j2"], [0.0, 0.0], topic="/arm/joint_states")  # waits for the subscription
    finally:
        robot.close()
    path.write_text(yaml.safe_dump({"joint_names": ["a"], "camera_topic": "/typo"}))
    with pytest.raises(ValueError, match=r"unknown keys \['camera_topic'\]"):
        Ros2Config.from_yaml(path)
    with pytest.raises(ValueError, match="joint_names is empty"):
        Ros2Config.from_dict({})
    with pytest.raises(ValueError, match="action_layout: a position interface needs"):
        Ros2Config(joint_names=["a", "b"], action_layout=["position a", "cos b"])
    with pytest.raises(ValueError, match="joint_trajectory sends positions"):
        Ros2Config(joint_names=["a"], command_type="joint_trajectory", command_interface="velocity")


# --- with the control loop --------------------------------------------------------


def scripted_run(robot) -> tuple[ControlLoop, ScriptedWorker]:
    """One second of the control loop at 30 Hz on a fake clock, a scripted server answering 16-row chunks."""
    clock = FakeClock()
    worker = ScriptedWorker(clock, latency_s=0.05, action_dim=8)
    loop = ControlLoop(robot, None, demo_spec(action_dim=8), LoopConfig(prompt="pick", control_frequency=30),
                       clock=clock, sleep=clock.sleep, worker=worker)
    loop.run(duration_s=1.0)
    return loop, worker


def test_the_control_loop_drives_the_ros2_robot_end_to_end(driver, make_robot):
    from std_msgs.msg import Float64MultiArray

    topic = "/forward_position_controller/commands"
    robot = make_robot(camera_topics=["/a/compressed", "/b/compressed"], max_sensor_age_s=30)
    commanded(robot, driver, topic, Float64MultiArray)
    jpeg = encode(frame(48, 64), "JPEG")
    t = driver.now()
    driver.joint_state(["gripper", "wrist", "elbow", "shoulder"], [4, 3, 2, 1], stamp=t)
    for cam in ("/a/compressed", "/b/compressed"):
        driver.compressed(cam, jpeg, fmt="jpeg", stamp=t)
    observed(robot)
    loop, worker = scripted_run(robot)
    acts = [r for r in loop.trace if r.kind == "act"]
    commands = wait_until(lambda: len(driver.messages(topic)) >= len(acts) + 1 and driver.messages(topic), 5.0,
                          "every command")
    assert len(commands) == len(acts) + 1  # one command per tick, then the hold at exit repeats the last
    for record, msg in zip(acts, commands):
        assert list(msg.data) == pytest.approx(worker.answers[record.request_id][record.row][:4].tolist())
    assert len(worker.sent) == 3  # 1 s at 30 Hz with 16-row chunks
    for sent in worker.sent:  # what went to the server: state in joint_names order, the cameras' own JPEG
        assert sent.observation.state.tolist() == [1, 2, 3, 4]
        assert sent.observation.images == [EncodedFrame(jpeg, "jpeg")] * 2


def test_the_control_loop_sends_a_trajectory_per_chunk_and_not_per_tick(driver, make_robot):
    from trajectory_msgs.msg import JointTrajectory

    topic = "/joint_trajectory_controller/joint_trajectory"
    robot = make_robot(command_type="joint_trajectory", command_topic=topic, max_sensor_age_s=30)
    commanded(robot, driver, topic, JointTrajectory)
    driver.joint_state(JOINTS, [1, 2, 3, 4])
    observed(robot)
    loop, worker = scripted_run(robot)
    accepted = loop.stats.summary()["chunks_accepted"]
    sent = wait_until(lambda: len(driver.messages(topic)) >= accepted + 1 and driver.messages(topic), 5.0,
                      "a trajectory per chunk and the stop")
    trajectories, stop = sent[:-1], sent[-1]
    assert len(trajectories) == accepted and stop.points == []
    first = [r for r in loop.trace if r.kind == "act"][0]
    np.testing.assert_allclose([p.positions.tolist() for p in trajectories[0].points],
                               worker.answers[first.request_id][first.row:, :4], rtol=1e-6)
