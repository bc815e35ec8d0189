"""ReachExpert: the scripted demonstrator. Inverse kinematics for the target, as a joint setpoint.

It reads the target's position from the simulator, which the policy never sees.
Of the two elbow solutions it takes the one nearer the arm's current angles,
so its choice is a function of what the cameras show. The arm's joint PD
(sim.scene.joint_torque) does the rest.
"""

from __future__ import annotations

import numpy as np

from sim.scene import LINKS, action_for, joint_error


def inverse_kinematics(target: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Joint angles that put the fingertip on `target` (x, y), the elbow solution nearest to q."""
    l1, l2 = LINKS
    x, y = float(target[0]), float(target[1])
    c2 = np.clip((x * x + y * y - l1 * l1 - l2 * l2) / (2 * l1 * l2), -1.0, 1.0)
    best, best_cost = None, np.inf
    for q1 in (np.arccos(c2), -np.arccos(c2)):
        q0 = np.arctan2(y, x) - np.arctan2(l2 * np.sin(q1), l1 + l2 * np.cos(q1))
        goal = np.array([q0, q1])
        cost = float(np.abs(joint_error(goal, q)).sum())
        if cost < best_cost:
            best, best_cost = goal, cost
    return best


class ReachExpert:
    def action(self, q: np.ndarray, qd: np.ndarray, target: np.ndarray) -> np.ndarray:
        """(3,) setpoint action (cos q0, sin q0, q1) at the inverse-kinematics solution."""
        return action_for(inverse_kinematics(target, q))
