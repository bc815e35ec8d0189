"""How a policy's state and action vectors map onto a robot's joints.

A policy is trained on some arrangement of joint values: plain positions, positions and
velocities, or a continuous joint given as (cos q, sin q) so that its angle has no jump at
+-pi. A layout names each entry as "<feature> <joint>":

    state_layout:  [cos joint0, cos joint1, sin joint0, sin joint1, velocity joint0, velocity joint1]
    action_layout: [cos joint0, sin joint0, position joint1]

Features: `position`, `velocity`, `cos`, `sin`. The state is built from measured positions and
velocities in that order. An action is decoded into one command per joint, in joint_names
order: positions for a position interface (from `position`, or from a `cos`/`sin` pair), or
velocities for a velocity interface. Entries of the action vector beyond the layout (a wider
model) are ignored, as before.

An angle decoded from (cos, sin) lies in (-pi, pi]; a continuous joint's measured angle may be
anywhere (4.0 rad after a turn). The command is unwrapped to the equivalent angle nearest the
previous command, so a target crossing +-pi is a small step, not a 2 pi one that the safety
layer would ramp the long way round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("position", "velocity", "cos", "sin")


def _parse(entries: list[str], joint_names: list[str], what: str) -> list[tuple[str, int]]:
    parsed = []
    for entry in entries:
        parts = str(entry).split()
        if len(parts) != 2 or parts[0] not in FEATURES:
            raise ValueError(f"{what}: entry {entry!r} must be '<feature> <joint>' with a feature in {FEATURES}")
        if parts[1] not in joint_names:
            raise ValueError(f"{what}: joint {parts[1]!r} of {entry!r} is not in joint_names {joint_names}")
        parsed.append((parts[0], joint_names.index(parts[1])))
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"{what}: entries repeat: {entries}")
    return parsed


@dataclass(frozen=True)
class JointLayout:
    joint_names: tuple[str, ...]
    state: tuple[tuple[str, int], ...]
    action: tuple[tuple[str, int], ...]
    interface: str  # "position" or "velocity": what one decoded command per joint is

    @classmethod
    def build(
        cls, joint_names: list[str], state_layout: list[str], action_layout: list[str], interface: str,
        include_velocity: bool = False,
    ) -> JointLayout:
        names = list(joint_names)
        command = "velocity" if interface == "velocity" else "position"
        state = _parse(state_layout, names, "state_layout") if state_layout else [
            ("position", i) for i in range(len(names))
        ] + ([("velocity", i) for i in range(len(names))] if include_velocity else [])
        action = _parse(action_layout, names, "action_layout") if action_layout else [
            (command, i) for i in range(len(names))
        ]
        given = {(f, j) for f, j in action}
        for j, name in enumerate(names):
            if command == "velocity":
                ok = ("velocity", j) in given
                need = f"'velocity {name}'"
            else:
                ok = ("position", j) in given or {("cos", j), ("sin", j)} <= given
                need = f"'position {name}' or both 'cos {name}' and 'sin {name}'"
            if not ok:
                raise ValueError(f"action_layout: a {command} interface needs {need}")
        return cls(tuple(names), tuple(state), tuple(action), command)

    @property
    def action_width(self) -> int:
        return len(self.action)

    @property
    def needs_velocity(self) -> bool:
        return any(f == "velocity" for f, _ in self.state)

    def state_vector(self, positions: np.ndarray, velocities: np.ndarray) -> np.ndarray:
        values = {"position": positions, "velocity": velocities, "cos": np.cos(positions), "sin": np.sin(positions)}
        return np.asarray([values[f][j] for f, j in self.state], np.float32)

    def command(self, action: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """Action row -> one command per joint (float64). `previous`: the last command, for unwrapping."""
        action = np.asarray(action, np.float64).ravel()
        if len(action) < self.action_width:
            raise ValueError(f"action has {len(action)} values; action_layout needs {self.action_width}")
        by = {(f, j): action[i] for i, (f, j) in enumerate(self.action)}
        out = np.empty(len(self.joint_names))
        for j in range(len(self.joint_names)):
            if (self.interface, j) in by:
                out[j] = by[(self.interface, j)]
                continue
            angle = np.arctan2(by[("sin", j)], by[("cos", j)])
            if previous is not None:
                angle = previous[j] + (angle - previous[j] + np.pi) % (2 * np.pi) - np.pi
            out[j] = angle
        return out
