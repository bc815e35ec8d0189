"""SafetyLayer: joint limits between the policy's action chunk and the motors.

Pure logic. It never reads a clock, sleeps or talks to ROS: callers pass the
targets, the measured joint positions and the control period, so every rule
here is tested with fake values. One call of `command` is one control tick.

Two controller interfaces:

- "position": targets are joint positions. A target outside the position
  limits is clamped to them; the command then moves toward the (clamped)
  target no faster than `max_velocity` and with a step that changes by at
  most `max_acceleration` per tick, so a chunk seam that jumps is ramped.
- "velocity": targets are joint velocities. The command is clipped to
  +-max_velocity, changes by at most `max_acceleration * period` per tick,
  and, when measured positions are given, is slowed early enough to stop at
  a position limit within the acceleration limit. `stopping()` brings it to
  rest at that same rate when the loop holds.

Braking (position interface). All motion is planned in steps per tick: the
speed limit is `v = max_velocity * period` and the acceleration limit is
`a = max_acceleration * period**2`. From a distance d, the largest step that
can still stop exactly on a point is the one whose sequence u, u - a,
u - 2a, ... sums to d (`_stopping_step`, the discrete form of sqrt(2 a d)).
The layer estimates the target's own step from consecutive targets and adds
to it, toward the remaining error, at most that stopping step: a target
that moves within the limits is followed exactly (the error stays zero and
the command *is* the target, bit for bit), while a step is approached at
full acceleration and speed, decelerated at exactly `a` per tick and reached
without overshoot. Position limits are braked toward the same way, as fixed
points, so the command never has to decelerate harder than `a` to respect them.

Limits of the design. The stopping step is relative to the target's
estimated step, assuming the target keeps it: a target that itself stops or
reverses harder than `max_acceleration` (e.g. a seam while moving) is
overshot by about the distance the robot needs to stop. Safety never depends
on that estimate: whatever the targets, every command respects the position
limits, max_velocity and max_acceleration. The velocity interface assumes
the robot follows its commanded velocity; if it lags, the layer still never
decelerates harder than `max_acceleration` (the robot could not either).

Counters count ticks (a tick counts once per kind however many joints):
  "position_clamped"      the target lay outside the position limits and was clamped
  "velocity_limited"      max_velocity cut the step (position) or velocity
  "acceleration_limited"  max_acceleration cut the change of step or of velocity
  "limit_braking"         motion toward a position limit was slowed so it can stop there
  "ramped"                the command differs from the (clamped) target: the robot is
                          being moved toward it, not there (position), or not at the
                          asked velocity (velocity); clamping alone does not count here
  "stopping"              velocity interface: a tick of `stopping()` decelerating to rest
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, fields

import numpy as np

INTERFACES = ("position", "velocity")
PER_JOINT_KEYS = ("position_min", "position_max", "max_velocity", "max_acceleration")


@dataclass(frozen=True)
class SafetyConfig:
    position_min: tuple[float, ...] | None = None  # per joint; None: no limit (-.inf in YAML for one joint)
    position_max: tuple[float, ...] | None = None
    max_velocity: tuple[float, ...] | None = None  # per joint, > 0, rad/s (or m/s); .inf: no limit for that joint
    max_acceleration: tuple[float, ...] | None = None  # per joint, > 0, rad/s^2 (or m/s^2)
    max_action_age_s: float | None = None  # enforced by the control loop; carried here with the other limits

    def __post_init__(self):
        for key in PER_JOINT_KEYS:
            values = getattr(self, key)
            if values is not None and any(math.isnan(x) for x in values):
                raise ValueError(f"safety.{key}: NaN is not a limit, got {list(values)}")
        for key in ("max_velocity", "max_acceleration"):
            values = getattr(self, key)
            if values is not None and any(x <= 0 for x in values):
                raise ValueError(f"safety.{key}: every limit must be > 0 (.inf for none), got {list(values)}")
        if self.position_min is not None and any(x == math.inf for x in self.position_min):
            raise ValueError(f"safety.position_min: +inf allows no position at all, got {list(self.position_min)}")
        if self.position_max is not None and any(x == -math.inf for x in self.position_max):
            raise ValueError(f"safety.position_max: -inf allows no position at all, got {list(self.position_max)}")
        if self.position_min is not None and self.position_max is not None:
            if len(self.position_min) != len(self.position_max):
                raise ValueError(
                    f"safety.position_min has {len(self.position_min)} values, position_max {len(self.position_max)}"
                )
            crossed = [i for i, (lo, hi) in enumerate(zip(self.position_min, self.position_max)) if lo > hi]
            if crossed:
                raise ValueError(f"safety.position_min > position_max for joints {crossed}")
        age = self.max_action_age_s
        if age is not None and not age > 0:  # `not >` also rejects NaN
            raise ValueError(f"safety.max_action_age_s: must be > 0, got {age}")

    @classmethod
    def from_dict(cls, values: dict | None, num_joints: int) -> SafetyConfig:
        """The `safety:` section of a robot's YAML. A missing section means no limits."""
        values = values or {}
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"safety: unknown keys {unknown}; known: {known}")
        parsed: dict[str, object] = {}
        for key, value in values.items():
            if value is None:
                continue
            if key == "max_action_age_s":
                parsed[key] = _number(key, value)
            else:
                parsed[key] = _per_joint(key, value, num_joints)
        return cls(**parsed)

    def check_joint_count(self, num_joints: int) -> None:
        """Raise unless every per-joint limit has one value per joint."""
        for key in PER_JOINT_KEYS:
            values = getattr(self, key)
            if values is not None and len(values) != num_joints:
                raise ValueError(f"safety.{key}: {len(values)} values for {num_joints} joints")

    def describe(self) -> str:
        """One line for the log."""
        parts = [f"{key} {_brief(getattr(self, key))}" for key in PER_JOINT_KEYS if getattr(self, key) is not None]
        if self.max_action_age_s is not None:
            parts.append(f"max_action_age_s {self.max_action_age_s:g}")
        return "safety: " + (", ".join(parts) if parts else "no limits")


def _number(key: str, value: object) -> float:
    # bool is an int in Python; `max_velocity: yes` is a typo, not 1 rad/s.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"safety.{key}: expected a number, got {value!r}")
    return float(value)


def _per_joint(key: str, value: object, num_joints: int) -> tuple[float, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != num_joints:
            raise ValueError(
                f"safety.{key}: expected {num_joints} values (one per joint) or one number, got {len(value)}"
            )
        return tuple(_number(key, x) for x in value)
    return (_number(key, value),) * num_joints  # one number: the same limit for every joint


def _brief(values: tuple[float, ...]) -> str:
    if len(set(values)) == 1:
        return f"{values[0]:g} (all joints)"
    return "[" + ", ".join(f"{x:g}" for x in values) + "]"


def _stopping_step(distance: np.ndarray, accel: np.ndarray) -> np.ndarray:
    """The largest step u >= 0 this tick from which steps u - a, u - 2a, ... stop within `distance`.

    With m the largest integer such that a * m(m+1)/2 <= d, the steps
    u, u - a, ..., u - m*a sum to exactly d when u = d/(m+1) + a*m/2, and the
    last one is in (0, a], so the next tick can be 0. Negative distances (already
    past the point) give 0. No acceleration limit: the whole distance at once.
    """
    d = np.maximum(distance, 0.0)
    finite = np.isfinite(d) & np.isfinite(accel)
    a = np.where(finite, accel, 1.0)  # placeholders keep inf/inf out of the arithmetic
    dd = np.where(finite, d, 0.0)
    m = np.floor((np.sqrt(1.0 + 8.0 * dd / a) - 1.0) / 2.0)
    # sqrt rounds: settle m exactly against its definition.
    m = np.where(a * m * (m + 1) / 2 > dd, m - 1, m)
    m = np.where(a * (m + 1) * (m + 2) / 2 <= dd, m + 1, m)
    step = np.where(m == 0, dd, dd / (m + 1) + a * m / 2)  # m == 0: the whole distance, exactly
    return np.where(finite, step, d)  # inf distance: unbounded; inf accel: all of d


@dataclass(frozen=True)
class _Motion:
    """What the next tick depends on. Immutable, so `preview` can run ahead on copies."""

    position: np.ndarray | None  # position interface: last commanded (or measured) position
    rate: np.ndarray  # last step per tick (position interface) or last velocity (velocity interface)
    target: np.ndarray | None  # position interface: last clamped target, to estimate the target's step


class SafetyLayer:
    def __init__(self, config: SafetyConfig, period_s: float, num_joints: int, interface: str = "position"):
        if not period_s > 0:
            raise ValueError(f"safety: control period must be > 0, got {period_s}")
        if num_joints < 1:
            raise ValueError(f"safety: need at least one joint, got {num_joints}")
        if interface not in INTERFACES:
            raise ValueError(f"safety: interface must be one of {INTERFACES}, got {interface!r}")
        config.check_joint_count(num_joints)
        self.config = config
        self.period_s = period_s
        self.num_joints = num_joints
        self.interface = interface

        def limits(values: tuple[float, ...] | None, default: float) -> np.ndarray:
            return np.full(num_joints, default) if values is None else np.asarray(values, dtype=np.float64)

        self._lo = limits(config.position_min, -np.inf)
        self._hi = limits(config.position_max, np.inf)
        self._max_velocity = limits(config.max_velocity, np.inf)
        self._max_acceleration = limits(config.max_acceleration, np.inf)
        # Position interface plans in steps per tick: the speed and acceleration limits as steps.
        self._step_limit = self._max_velocity * period_s
        self._accel_step = self._max_acceleration * period_s**2
        self.counters: collections.Counter[str] = collections.Counter()
        self._motion = _Motion(None, np.zeros(num_joints), None)
        self._last: np.ndarray | None = None

    def reset(self, measured: np.ndarray | None = None) -> None:
        """Forget motion state (at start, after a hold).

        Position interface: the next command ramps from `measured`, at rest. With
        `measured` None there is nothing to ramp from: the next command is passed as
        is (after position clamping) unless it brings `measured` itself, and motion
        is limited from there on, starting at rest.
        Velocity interface: the commanded velocity is taken as 0.
        """
        position = None
        if measured is not None and self.interface == "position":
            position = self._checked("measured", measured)
        self._motion = _Motion(position, np.zeros(self.num_joints), None)
        self._last = None

    def command(self, target: np.ndarray, measured: np.ndarray | None = None) -> np.ndarray:
        """One tick, committed: the command to send for `target`.

        `measured` (the robot's joint positions): velocity interface, needed to brake
        before position limits; position interface, used only when there is nothing
        to ramp from (as reset(measured) would). Raises ValueError on NaN/inf.
        """
        output, self._motion, kinds = self._advance(self._motion, target, measured)
        self.counters.update(kinds)
        self._last = output
        return output.copy()

    def preview(self, targets: np.ndarray, measured: np.ndarray | None = None) -> np.ndarray:
        """The commands for a sequence of target rows, from the current state, committing nothing.

        Velocity interface: `measured` is the position at row 0; later rows assume
        the robot moved as commanded (position + velocity * period), so command(row,
        that position) on each row in turn reproduces this exactly.
        """
        rows = np.asarray(targets, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.num_joints:
            raise ValueError(f"safety: targets must have shape (rows, {self.num_joints}), got {rows.shape}")
        motion = self._motion
        out = np.empty_like(rows)
        for i, row in enumerate(rows):
            out[i], motion, _ = self._advance(motion, row, measured)
            if self.interface == "velocity" and measured is not None:
                measured = measured + out[i] * self.period_s
        return out

    def stopping(self) -> np.ndarray | None:
        """Velocity interface: the next command of a stop within max_acceleration; None once at rest.

        Position interface: None, as a position controller holds by itself.
        """
        velocity = self._motion.rate
        if self.interface == "position" or not velocity.any():
            return None
        brake = self._max_acceleration * self.period_s
        # The last braking step lands on 0 exactly; the tolerance absorbs the rounding of
        # repeated subtraction, which would otherwise leave a 1e-17 rad/s tick at the end.
        done = np.abs(velocity) <= brake * (1 + 1e-9)
        slower = velocity - np.sign(velocity) * np.minimum(np.abs(velocity), brake)
        output = np.where(done, 0.0, slower)
        self._motion = _Motion(None, output, None)
        self.counters["stopping"] += 1
        self._last = output
        return output.copy()

    @property
    def last(self) -> np.ndarray | None:
        """The last command returned since reset (None before the first)."""
        return None if self._last is None else self._last.copy()

    def _checked(self, name: str, values: np.ndarray) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (self.num_joints,):
            raise ValueError(f"safety: {name} must have shape ({self.num_joints},), got {array.shape}")
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            raise ValueError(f"safety: {name} is not finite for joints {bad.tolist()}: {array[bad].tolist()}")
        return array

    def _advance(
        self, motion: _Motion, target: np.ndarray, measured: np.ndarray | None
    ) -> tuple[np.ndarray, _Motion, set[str]]:
        target = self._checked("target", target)
        if measured is not None:
            measured = self._checked("measured", measured)
        if self.interface == "velocity":
            return self._advance_velocity(motion, target, measured)
        return self._advance_position(motion, target, measured)

    def _advance_position(
        self, motion: _Motion, target: np.ndarray, measured: np.ndarray | None
    ) -> tuple[np.ndarray, _Motion, set[str]]:
        kinds: set[str] = set()
        goal = np.clip(target, self._lo, self._hi)
        if (goal != target).any():
            kinds.add("position_clamped")
        position = motion.position if motion.position is not None else measured
        if position is None:  # nothing to ramp from: the first command goes as is, at rest there
            return goal, _Motion(goal, np.zeros(self.num_joints), goal), kinds

        previous_goal = goal if motion.target is None else motion.target
        goal_step = goal - previous_goal  # the target's own motion, followed as feed-forward
        error = previous_goal - position  # what is left to catch up before this tick's motion
        catch_up = np.sign(error) * _stopping_step(np.abs(error), self._accel_step)
        wanted = goal_step + catch_up

        step = np.clip(wanted, -self._step_limit, self._step_limit)
        if (step != wanted).any():
            kinds.add("velocity_limited")
        braked = np.clip(
            step,
            -_stopping_step(position - self._lo, self._accel_step),
            _stopping_step(self._hi - position, self._accel_step),
        )
        if (braked != step).any():
            kinds.add("limit_braking")
        # Applied last, so smoothness wins if rounding ever makes the bounds disagree.
        smooth = np.clip(braked, motion.rate - self._accel_step, motion.rate + self._accel_step)
        if (smooth != braked).any():
            kinds.add("acceleration_limited")

        # Nothing limited and the error closed this tick: command the target itself, so a
        # trajectory within the limits is passed bit for bit (position + step may round).
        reached = (smooth == wanted) & (catch_up == error)
        # Rounding may land a hair past a limit; never command beyond one, nor further out
        # than the robot already is (a start outside the limits is ramped back in, not jumped).
        output = np.where(
            reached, goal, np.clip(position + smooth, np.minimum(self._lo, position), np.maximum(self._hi, position))
        )
        if (output != goal).any():
            kinds.add("ramped")
        return output, _Motion(output, output - position, goal), kinds

    def _advance_velocity(
        self, motion: _Motion, target: np.ndarray, measured: np.ndarray | None
    ) -> tuple[np.ndarray, _Motion, set[str]]:
        kinds: set[str] = set()
        asked = np.clip(target, -self._max_velocity, self._max_velocity)
        if (asked != target).any():
            kinds.add("velocity_limited")
        velocity = asked
        if measured is not None:
            # Same stopping distance as the position interface, in steps per tick, back to per second.
            up = _stopping_step(self._hi - measured, self._accel_step) / self.period_s
            down = _stopping_step(measured - self._lo, self._accel_step) / self.period_s
            velocity = np.clip(asked, -down, up)
            if (velocity != asked).any():
                kinds.add("limit_braking")
        change = self._max_acceleration * self.period_s
        smooth = np.clip(velocity, motion.rate - change, motion.rate + change)
        if (smooth != velocity).any():
            kinds.add("acceleration_limited")
        if (smooth != asked).any():
            kinds.add("ramped")
        return smooth, _Motion(None, smooth, None), kinds
