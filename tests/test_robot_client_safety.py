"""SafetyLayer: joint limits between action chunks and motors. Pure logic, fake values only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from robot_client.safety import SafetyConfig, SafetyLayer

PERIOD = 0.04  # 25 Hz
EPS = 1e-9


def layer(num_joints: int = 1, interface: str = "position", period: float = PERIOD, **limits) -> SafetyLayer:
    values = {k: (v if isinstance(v, tuple) else (v,) * num_joints) for k, v in limits.items()}
    return SafetyLayer(SafetyConfig(**values), period, num_joints, interface)


def run(safety: SafetyLayer, targets: np.ndarray) -> np.ndarray:
    return np.stack([safety.command(row) for row in targets])


def assert_motion_within(positions: np.ndarray, max_velocity, max_acceleration, period: float = PERIOD) -> None:
    """Steps and changes of step of a commanded position sequence (rows = ticks) respect the limits."""
    steps = np.diff(positions, axis=0)
    assert np.all(np.abs(steps) <= np.asarray(max_velocity) * period + EPS)
    assert np.all(np.abs(np.diff(steps, axis=0)) <= np.asarray(max_acceleration) * period**2 + EPS)


def resting_at(start: np.ndarray, commands: np.ndarray) -> np.ndarray:
    """The commanded positions preceded by two ticks at rest at `start`."""
    return np.vstack([start, start, commands])


def cosine(max_velocity: np.ndarray, max_acceleration: np.ndarray, ticks: int) -> np.ndarray:
    """Per joint, A cos(w t) with peak velocity 0.8 max_velocity and peak acceleration 0.8 max_acceleration.

    It starts at rest, so a layer at rest at its start has nothing to ramp.
    """
    w = max_acceleration / max_velocity
    amplitude = 0.8 * max_velocity**2 / max_acceleration
    t = np.arange(ticks)[:, None] * PERIOD
    return amplitude * np.cos(w * t)


# --- a good policy passes untouched ---------------------------------------------------------


@pytest.mark.parametrize("start", ["measured", "none"])
def test_trajectory_within_the_limits_passes_bit_for_bit(start):
    vmax, amax = np.array([1.0, 2.0, 0.5]), np.array([2.0, 4.0, 3.0])
    safety = layer(3, max_velocity=tuple(vmax), max_acceleration=tuple(amax), position_min=-1.0, position_max=1.0)
    targets = cosine(vmax, amax, 500)
    safety.reset(targets[0] if start == "measured" else None)
    np.testing.assert_array_equal(run(safety, targets), targets)
    assert not safety.counters


def test_no_limits_returns_the_target_unchanged():
    safety = SafetyLayer(SafetyConfig.from_dict(None, 2), PERIOD, 2)
    safety.reset(np.array([5.0, -5.0]))
    targets = np.array([[0.0, 0.0], [3.0, -7.0], [-100.0, 1e6]])
    np.testing.assert_array_equal(run(safety, targets), targets)
    assert not safety.counters


@settings(max_examples=60, deadline=None)
@given(
    interface=st.sampled_from(["position", "velocity"]),
    rows=st.lists(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=2), min_size=1, max_size=20),
    measured=st.none() | st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=2),
)
def test_no_limits_never_changes_anything(interface, rows, measured):
    safety = SafetyLayer(SafetyConfig(), PERIOD, 2, interface)
    safety.reset(None if measured is None else np.array(measured))
    targets = np.array(rows)
    commands = [safety.command(row, None if measured is None else np.array(measured)) for row in targets]
    np.testing.assert_array_equal(np.stack(commands), targets)


# --- jumps are ramped -----------------------------------------------------------------------


def test_a_seam_jump_is_ramped_at_full_rate_and_lands_without_overshoot():
    safety = layer(max_velocity=1.0, max_acceleration=4.0)
    safety.reset(np.zeros(1))
    out = run(safety, np.full((80, 1), 2.0))
    assert_motion_within(resting_at(np.zeros(1), out), 1.0, 4.0)
    assert out.max() <= 2.0 + 1e-12  # brakes onto the target, does not overshoot it
    reached = int(np.argmax(out[:, 0] == 2.0))
    # Time-optimal is 2 rad / 1 rad/s + 1 rad/s / 4 rad/s^2 = 2.25 s, 56.25 ticks.
    assert 56 <= reached <= 58 and np.all(out[reached:] == 2.0)
    assert safety.counters["ramped"] == reached
    assert safety.counters["velocity_limited"] > 0 and safety.counters["acceleration_limited"] > 0


def test_a_seam_inside_a_good_trajectory_is_ramped_then_followed_exactly_again():
    vmax, amax = np.array([1.0]), np.array([2.0])
    safety = layer(max_velocity=1.0, max_acceleration=2.0)
    targets = cosine(vmax, amax, 300)
    targets[100:] += 0.3  # the next chunk starts 0.3 rad away
    safety.reset(targets[0])
    out = run(safety, targets)
    assert_motion_within(resting_at(targets[0], out), vmax, amax)
    np.testing.assert_array_equal(out[:100], targets[:100])
    assert np.any(out[100] != targets[100])
    np.testing.assert_array_equal(out[200:], targets[200:])


def test_a_moving_target_is_caught_up_at_full_speed_then_followed_exactly():
    safety = layer(max_velocity=1.0, max_acceleration=2.0)
    safety.reset(np.zeros(1))
    targets = 0.5 + 0.5 * np.arange(100)[:, None] * PERIOD  # 0.5 rad ahead, moving at 0.5 rad/s
    out = run(safety, targets)
    assert_motion_within(resting_at(np.zeros(1), out), 1.0, 2.0)
    assert np.max(np.diff(out[:, 0])) == pytest.approx(1.0 * PERIOD)  # catching up uses the full speed
    assert np.all(out <= targets + 1e-12)  # and does not overtake the target
    np.testing.assert_array_equal(out[45:], targets[45:])


# --- position limits ------------------------------------------------------------------------


def test_a_target_outside_the_position_limits_is_held_at_the_limit():
    safety = layer(2, position_min=-1.0, position_max=1.0)
    safety.reset(np.zeros(2))
    out = run(safety, np.array([[3.0, -3.0]] * 5))
    np.testing.assert_array_equal(out, [[1.0, -1.0]] * 5)
    assert safety.counters["position_clamped"] == 5  # once per tick, not per joint
    assert safety.counters["ramped"] == 0  # no rate limits: the limit is reached at once


def test_clamped_targets_are_also_ramped_and_braked_onto_the_limit():
    safety = layer(position_min=-1.0, position_max=1.0, max_velocity=1.0, max_acceleration=2.0)
    safety.reset(np.zeros(1))
    out = run(safety, np.full((100, 1), 5.0))
    assert out.max() <= 1.0 and out[-1, 0] == 1.0
    assert_motion_within(resting_at(np.zeros(1), out), 1.0, 2.0)
    assert safety.counters["position_clamped"] == 100


def test_a_start_outside_the_limits_is_ramped_back_in_not_jumped():
    safety = layer(position_min=-1.0, position_max=1.0, max_velocity=1.0, max_acceleration=2.0)
    start = np.array([1.5])
    safety.reset(start)
    out = run(safety, np.zeros((100, 1)))
    assert out.max() < 1.5 and out[-1, 0] == 0.0
    assert_motion_within(resting_at(start, out), 1.0, 2.0)


def test_without_measured_the_first_command_goes_as_is_then_motion_is_limited():
    safety = layer(position_min=-1.0, position_max=1.0, max_velocity=1.0, max_acceleration=2.0)
    assert safety.command(np.array([0.7]))[0] == 0.7
    safety.reset()
    assert safety.command(np.array([-2.0]))[0] == -1.0  # clamped, otherwise as is
    out = run(safety, np.full((60, 1), 1.0))
    assert_motion_within(resting_at(np.array([-1.0]), out), 1.0, 2.0)
    fresh = layer(max_velocity=1.0, max_acceleration=2.0)  # with measured, it ramps from there
    assert fresh.command(np.array([0.7]), measured=np.array([0.0]))[0] == pytest.approx(2.0 * PERIOD**2)


# --- velocity interface ---------------------------------------------------------------------


def test_velocity_is_clipped_and_rate_limited():
    safety = layer(interface="velocity", max_velocity=1.0, max_acceleration=2.0)
    out = run(safety, np.full((20, 1), 5.0))[:, 0]
    np.testing.assert_allclose(out[:12], 0.08 * np.arange(1, 13))
    assert np.all(out[12:] == 1.0)  # 0.96 + 0.08 > 1: the 13th tick is cut by max_velocity only
    assert safety.counters["velocity_limited"] == 20 and safety.counters["acceleration_limited"] == 12


def test_velocity_brakes_to_rest_at_a_position_limit():
    safety = layer(interface="velocity", position_min=-1.0, position_max=1.0, max_velocity=1.0, max_acceleration=2.0)
    position, velocities = np.zeros(1), []
    for _ in range(150):
        velocity = safety.command(np.array([1.0]), position)
        position = position + velocity * PERIOD  # a robot that follows its command
        velocities.append(velocity)
        assert position[0] <= 1.0 + EPS
    v = np.array(velocities)[:, 0]
    assert position[0] == pytest.approx(1.0, abs=1e-9) and v[-1] == 0.0
    assert np.all(np.abs(np.diff(np.concatenate([[0.0], v]))) <= 2.0 * PERIOD + EPS)
    assert safety.counters["limit_braking"] > 0
    assert safety.command(np.array([-1.0]), position)[0] == pytest.approx(-2.0 * PERIOD)  # away is allowed


def test_stopping_decelerates_to_exactly_zero_within_the_acceleration_limit():
    safety = layer(interface="velocity", max_velocity=1.0, max_acceleration=2.0)
    while safety.last is None or safety.last[0] < 1.0:
        safety.command(np.array([1.0]))
    stop = []
    while (command := safety.stopping()) is not None:
        stop.append(command[0])
    assert len(stop) == math.ceil(1.0 / (2.0 * PERIOD)) == 13
    assert stop[-1] == 0.0 and all(s > 0 for s in stop[:-1])
    assert np.all(np.abs(np.diff([1.0, *stop])) <= 2.0 * PERIOD + EPS)
    assert safety.counters["stopping"] == 13
    assert safety.stopping() is None and safety.last[0] == 0.0


def test_stopping_without_an_acceleration_limit_is_immediate():
    safety = layer(2, interface="velocity", max_velocity=1.0)
    safety.command(np.array([0.5, -0.5]))
    np.testing.assert_array_equal(safety.stopping(), [0.0, 0.0])
    assert safety.stopping() is None


def test_stopping_is_none_for_a_position_controller_or_at_rest():
    assert layer(max_acceleration=1.0).stopping() is None
    velocity = layer(interface="velocity", max_acceleration=1.0)
    assert velocity.stopping() is None
    velocity.command(np.array([0.0]))
    assert velocity.stopping() is None


def test_reset_takes_the_commanded_velocity_as_zero():
    safety = layer(interface="velocity", max_acceleration=2.0)
    for _ in range(30):
        safety.command(np.array([1.0]))
    safety.reset()
    assert safety.last is None
    assert safety.command(np.array([1.0]))[0] == pytest.approx(2.0 * PERIOD)


# --- bad inputs -----------------------------------------------------------------------------


@pytest.mark.parametrize("interface", ["position", "velocity"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_targets_raise_and_change_nothing(interface, bad):
    safety, twin = (layer(2, interface, max_velocity=1.0, max_acceleration=2.0) for _ in range(2))
    for s in (safety, twin):
        s.reset(np.zeros(2))
        s.command(np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="not finite for joints \\[1\\]"):
        safety.command(np.array([0.5, bad]))
    with pytest.raises(ValueError):
        safety.preview(np.array([[0.5, 0.5], [bad, 0.5]]))
    with pytest.raises(ValueError, match="measured"):
        safety.command(np.array([0.5, 0.5]), measured=np.array([bad, 0.0]))
    np.testing.assert_array_equal(safety.command(np.array([0.6, 0.6])), twin.command(np.array([0.6, 0.6])))
    assert safety.counters == twin.counters


def test_wrong_shapes_raise():
    safety = layer(3)
    with pytest.raises(ValueError, match="shape"):
        safety.command(np.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        safety.preview(np.zeros(3))


# --- configuration --------------------------------------------------------------------------


def test_config_from_yaml_broadcasts_scalars_and_reads_inf_as_no_limit():
    section = yaml.safe_load(
        """
        position_min: [-.inf, -1.0]
        position_max: [.inf, 1.0]
        max_velocity: 2
        max_acceleration: [.inf, 4.0]
        max_action_age_s: 0.2
        """
    )
    config = SafetyConfig.from_dict(section, num_joints=2)
    assert config.max_velocity == (2.0, 2.0) and config.max_action_age_s == 0.2
    safety = SafetyLayer(config, PERIOD, 2)
    assert safety.command(np.array([5.0, 5.0]))[1] == 1.0
    assert safety.command(np.array([5.0, 5.0]))[0] == pytest.approx(5.0)  # first command: passed as is
    assert safety.command(np.array([7.0, 1.0]))[0] == pytest.approx(5.0 + 2.0 * PERIOD)  # speed only, no ramp up


def test_missing_section_means_no_limits():
    assert SafetyConfig.from_dict(None, 3) == SafetyConfig() == SafetyConfig.from_dict({}, 3)
    assert SafetyConfig().describe() == "safety: no limits"


def test_describe_is_one_line_with_the_limits():
    config = SafetyConfig.from_dict({"max_velocity": [1.0, 2.5], "max_acceleration": 3.0, "max_action_age_s": 0.2}, 2)
    text = config.describe()
    assert "\n" not in text
    assert "max_velocity [1, 2.5]" in text and "max_acceleration 3 (all joints)" in text and "0.2" in text


@pytest.mark.parametrize(
    "section, key",
    [
        ({"max_speed": 1.0}, "max_speed"),
        ({"max_velocity": [1.0, 2.0]}, "max_velocity"),
        ({"position_min": 1.0, "position_max": [2.0, 0.5, 3.0]}, "position_min"),
        ({"max_velocity": 0.0}, "max_velocity"),
        ({"max_acceleration": [1.0, -2.0, 1.0]}, "max_acceleration"),
        ({"max_velocity": "fast"}, "max_velocity"),
        ({"max_velocity": True}, "max_velocity"),
        ({"position_max": math.nan}, "position_max"),
        ({"position_max": -math.inf}, "position_max"),
        ({"max_action_age_s": 0}, "max_action_age_s"),
    ],
)
def test_bad_config_raises_one_line_naming_the_key(section, key):
    with pytest.raises(ValueError) as raised:
        SafetyConfig.from_dict(section, num_joints=3)
    assert key in str(raised.value) and "\n" not in str(raised.value)


def test_layer_checks_its_config_against_the_joints():
    with pytest.raises(ValueError, match="max_velocity: 2 values for 3 joints"):
        SafetyLayer(SafetyConfig(max_velocity=(1.0, 1.0)), PERIOD, 3)
    with pytest.raises(ValueError, match="interface"):
        SafetyLayer(SafetyConfig(), PERIOD, 1, "torque")
    with pytest.raises(ValueError, match="period"):
        SafetyLayer(SafetyConfig(), 0.0, 1)


# --- invariants, for any targets and limits -------------------------------------------------


@st.composite
def scenarios(draw, interface: str):
    """Random limits (some joints unlimited), a start inside them, and wild target rows."""
    n = draw(st.integers(1, 3))
    period = draw(st.sampled_from([0.01, PERIOD, 1 / 30]))
    joint = st.floats(0.0, 1.0)
    lo = [draw(st.floats(-3.0, 0.0)) if draw(st.booleans()) else -math.inf for _ in range(n)]
    hi = [draw(st.floats(0.1, 3.0)) if draw(st.booleans()) else math.inf for _ in range(n)]
    vmax = tuple(draw(st.floats(0.1, 5.0)) for _ in range(n))
    amax = tuple(draw(st.floats(0.5, 50.0)) for _ in range(n))
    start = np.array([max(lo[j], -3.0) + draw(joint) * (min(hi[j], 3.0) - max(lo[j], -3.0)) for j in range(n)])
    span = 5.0 if interface == "position" else 10.0
    rows = draw(st.lists(st.lists(st.floats(-span, span), min_size=n, max_size=n), min_size=1, max_size=40))
    config = SafetyConfig(tuple(lo), tuple(hi), vmax, amax)
    return SafetyLayer(config, period, n, interface), start, np.array(rows), draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(scenarios("position"))
def test_position_commands_always_respect_every_limit(scenario):
    safety, start, targets, from_measured = scenario
    safety.reset(start if from_measured else None)
    out = run(safety, targets)
    config = safety.config
    assert np.all(out >= np.array(config.position_min) - EPS) and np.all(out <= np.array(config.position_max) + EPS)
    # After reset(None) the first command is exempt (nothing to ramp from); from it on, the robot starts at rest.
    origin = start if from_measured else out[0]
    assert_motion_within(resting_at(origin, out), config.max_velocity, config.max_acceleration, safety.period_s)


@settings(max_examples=150, deadline=None)
@given(scenarios("velocity"))
def test_velocity_commands_always_respect_every_limit(scenario):
    safety, position, targets, _ = scenario
    config, period = safety.config, safety.period_s
    velocities = []
    for row in targets:
        velocities.append(safety.command(row, position))
        position = position + velocities[-1] * period
        assert np.all(position >= np.array(config.position_min) - EPS)
        assert np.all(position <= np.array(config.position_max) + EPS)
    v = np.vstack([np.zeros(len(position)), velocities])
    assert np.all(np.abs(v) <= np.array(config.max_velocity) + EPS)
    assert np.all(np.abs(np.diff(v, axis=0)) <= np.array(config.max_acceleration) * period + EPS)


@settings(max_examples=100, deadline=None)
@given(interface=st.sampled_from(["position", "velocity"]), data=st.data())
def test_preview_equals_sequential_commands_and_commits_nothing(interface, data):
    safety, start, targets, from_measured = data.draw(scenarios(interface))
    safety.reset(start if from_measured else None)
    warmup = data.draw(st.integers(0, len(targets) - 1))
    measured = start
    for row in targets[:warmup]:  # start from some state mid-way
        command = safety.command(row, measured)
        if interface == "velocity":
            measured = measured + command * safety.period_s
    rest = targets[warmup:]
    counters, last = safety.counters.copy(), safety.last
    previewed = safety.preview(rest, measured)
    assert safety.counters == counters
    assert (safety.last is None and last is None) or np.array_equal(safety.last, last)
    assert np.array_equal(safety.preview(rest, measured), previewed)  # nothing was committed
    for i, row in enumerate(rest):
        command = safety.command(row, measured)
        np.testing.assert_array_equal(command, previewed[i])
        if interface == "velocity":
            measured = measured + command * safety.period_s
