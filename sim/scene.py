"""ReacherScene: gymnasium's Reacher-v5 with two offscreen cameras and the target hidden from the state.

Reacher-v5's own observation carries the target's position and the
fingertip-to-target vector. The policy gets neither: its state is the joint
angles (cos, sin) and velocities only, so it has to find the target in the
images. The target is drawn as a red ball the size of the success radius; both cameras see it.

Control: one `step` is one control tick of `CONTROL_DT` seconds (frame_skip 4,
25 Hz). Like a real arm, the robot takes joint position setpoints and runs its
own joint PD controller (`joint_torque`) that turns them into Reacher's
torques in [-1, 1]. A policy action is the setpoint as
(cos q0, sin q0, q1): the shoulder turns freely, so its angle is given as a
direction (no jump at +-pi); the elbow is limited to +-3 rad.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering without a display

import gymnasium as gym
import mujoco

FRAME_SKIP = 4  # physics steps (0.01 s) per control tick
CONTROL_DT = 0.01 * FRAME_SKIP  # 0.04 s: 25 Hz
IMAGE_HW = (96, 96)  # the demo checkpoint's resolution; frames are rendered at it (no letterbox needed)
STATE_DIM = 6  # cos q0, cos q1, sin q0, sin q1, qd0, qd1
ACTION_DIM = 3  # setpoint (cos q0, sin q0, q1); a wider policy action uses the first three
KP, KD = 0.35, 0.06  # the arm's joint PD: torque per rad, per rad/s
SUCCESS_RADIUS = 0.02  # m: fingertip within this of the target ...
SUCCESS_HOLD_TICKS = 5  # ... for this many consecutive ticks (0.2 s) counts as reaching it
TARGETS_PER_EPISODE = 3  # an episode is won when all its targets are reached in turn ...
EPISODE_TICKS = 100  # ... within 4.0 s
MIN_TARGET_JUMP = 0.1  # m: a new target is at least this far from the previous one
LINKS = (0.1, 0.11)  # link lengths: shoulder->elbow, elbow->fingertip
TARGET_MARKER = (0.02, (1.0, 0.0, 0.0, 1.0))  # the target is drawn as a red ball the size of the success radius


@dataclass(frozen=True)
class CameraView:
    name: str
    azimuth: float
    elevation: float
    distance: float


# Top-down over the arena, and an oblique view from the south-east corner.
CAMERAS = (CameraView("top", 90.0, -90.0, 0.62), CameraView("oblique", 135.0, -55.0, 0.62))


class ReacherScene:
    """One Reacher-v5 arm, rendered by two fixed cameras. Not thread-safe: one thread drives it."""

    def __init__(self, image_hw: tuple[int, int] = IMAGE_HW):
        self.env = gym.make("Reacher-v5", frame_skip=FRAME_SKIP, max_episode_steps=None).unwrapped
        self.model, self.data = self.env.model, self.env.data
        # Visual only (the target geom never collides): a marker a 96x96 camera resolves.
        marker = self.model.geom("target")
        marker.size[0], marker.rgba[:] = TARGET_MARKER[0], TARGET_MARKER[1]
        self.image_hw = image_hw
        self._renderer: mujoco.Renderer | None = None  # made lazily: its GL context belongs to the rendering thread
        self._cameras = []
        for view in CAMERAS:
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FREE
            cam.lookat[:] = (0.0, 0.0, 0.0)
            cam.azimuth, cam.elevation, cam.distance = view.azimuth, view.elevation, view.distance
            self._cameras.append(cam)

    def reset(self, seed: int) -> None:
        """Reacher-v5's own reset: arm near straight, target uniform in a disc of radius 0.2."""
        self.env.reset(seed=int(seed))

    def step(self, torque) -> None:
        """One control tick with these joint torques (clipped to [-1, 1])."""
        torque = np.clip(np.asarray(torque, np.float64).ravel()[:2], -1.0, 1.0)
        self.env.do_simulation(torque, FRAME_SKIP)

    def step_to(self, action) -> None:
        """One control tick towards a setpoint action (cos q0, sin q0, q1, ...)."""
        q, qd = self.joints
        self.step(joint_torque(setpoint(action), q, qd))

    # --- what the policy may see --------------------------------------------

    def policy_state(self) -> np.ndarray:
        """(6,) float32: joint angles as cos/sin and joint velocities. No target, no fingertip-target vector."""
        q, qd = self.data.qpos[:2], self.data.qvel[:2]
        return np.concatenate([np.cos(q), np.sin(q), qd]).astype(np.float32)

    def render(self) -> list[np.ndarray]:
        """One (H, W, 3) uint8 RGB frame per camera."""
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, *self.image_hw)
        frames = []
        for cam in self._cameras:
            self._renderer.update_scene(self.data, camera=cam)
            frames.append(self._renderer.render().copy())
        return frames

    # --- what only the expert and the scorer see ---------------------------

    @property
    def joints(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data.qpos[:2].copy(), self.data.qvel[:2].copy()

    @property
    def target(self) -> np.ndarray:
        return self.data.qpos[2:4].copy()

    def distance(self) -> float:
        """Fingertip-to-target distance in the plane, metres."""
        tip = self.data.body("fingertip").xpos[:2]
        goal = self.data.body("target").xpos[:2]
        return float(np.linalg.norm(tip - goal))

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.env.close()


class ReachTask:
    """The closed-loop task: reach TARGETS_PER_EPISODE targets in turn, each held for SUCCESS_HOLD_TICKS.

    The first target is Reacher-v5's own (reset with the episode's seed); once it
    is reached the target jumps to the next one, drawn from the same disc with
    the same seed, so every policy faces the same sequence.
    """

    def __init__(self, scene: ReacherScene, seed: int, targets: int = TARGETS_PER_EPISODE):
        self.scene, self.targets = scene, targets
        scene.reset(seed)
        self._rng = np.random.default_rng([seed, 7])
        self.reached = 0
        self.reached_at: list[int] = []  # tick at which each target was reached
        self.distances: list[float] = []
        self._run = 0

    @property
    def done(self) -> bool:
        return self.reached >= self.targets

    def after_tick(self) -> None:
        """Score the tick that just ran; move the target on once it has been held long enough."""
        d = self.scene.distance()
        self.distances.append(d)
        if self.done:
            return
        self._run = self._run + 1 if d <= SUCCESS_RADIUS else 0
        if self._run >= SUCCESS_HOLD_TICKS:
            self.reached += 1
            self.reached_at.append(len(self.distances))
            self._run = 0
            if not self.done:
                self._move_target()

    def _move_target(self) -> None:
        old = self.scene.target
        while True:  # Reacher-v5's own distribution: uniform in the square, kept inside the disc
            new = self._rng.uniform(-0.2, 0.2, 2)
            if np.linalg.norm(new) < 0.2 and np.linalg.norm(new - old) >= MIN_TARGET_JUMP:
                break
        qpos, qvel = self.scene.data.qpos.copy(), self.scene.data.qvel.copy()
        qpos[2:4], qvel[2:4] = new, 0.0
        self.scene.env.set_state(qpos, qvel)


def wrap(angle):
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def joint_error(goal: np.ndarray, q: np.ndarray) -> np.ndarray:
    """goal - q; the shoulder the shortest way round, the elbow (limited to +-3 rad) without wrapping."""
    return np.array([wrap(goal[0] - q[0]), goal[1] - q[1]])


def setpoint(action) -> np.ndarray:
    """Policy action (cos q0, sin q0, q1, ...) -> joint angles (q0, q1)."""
    a = np.asarray(action, np.float64).ravel()
    return np.array([np.arctan2(a[1], a[0]), np.clip(a[2], -3.0, 3.0)])


def action_for(goal: np.ndarray) -> np.ndarray:
    """Joint angles (q0, q1) -> policy action (cos q0, sin q0, q1)."""
    return np.array([np.cos(goal[0]), np.sin(goal[0]), goal[1]], np.float32)


def joint_torque(goal: np.ndarray, q: np.ndarray, qd: np.ndarray, kp: float = KP, kd: float = KD) -> np.ndarray:
    """The arm's own joint PD: setpoint -> torques in [-1, 1]."""
    return np.clip(kp * joint_error(goal, q) - kd * qd, -1.0, 1.0)


def reached(distances, radius: float = SUCCESS_RADIUS, hold_ticks: int = SUCCESS_HOLD_TICKS) -> bool:
    """Success: the fingertip stayed within `radius` of the target for `hold_ticks` consecutive ticks."""
    run = 0
    for d in distances:
        run = run + 1 if d <= radius else 0
        if run >= hold_ticks:
            return True
    return False
