"""Expert demonstrations -> a chunked behaviour-cloning dataset.

Each demonstration starts the arm at a random pose (the closed-loop task
starts every new target from wherever the last one left the arm) and lets the
expert reach Reacher's target and hold it. Short bursts of random setpoints
knock the arm off the expert's path so the data also shows recoveries from
states the expert alone never visits.

Frames are exactly what the server sees: rendered at the model resolution and
passed through the robot client's JPEG encoding (quality 90). Each frame is
labelled with the next CHUNK expert setpoint actions; frames whose next CHUNK actions
include a random burst are not used as samples.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sim.expert import ReachExpert
from sim.scene import ReacherScene, action_for

CHUNK = 16
JPEG_QUALITY = 90  # robot_client's default encoding


@dataclass
class Dataset:
    images: np.ndarray  # (N, cams, H, W, 3) uint8, as decoded by the server
    state: np.ndarray  # (N, 6) float32, the policy-visible state
    actions: np.ndarray  # (N, CHUNK, 3) float32, the expert's next CHUNK setpoints (cos q0, sin q0, q1)

    def __len__(self) -> int:
        return len(self.state)


def jpeg_roundtrip(frame: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def randomise_arm(scene: ReacherScene, rng: np.random.Generator) -> None:
    """Put the arm at a random pose with a small random velocity (the target stays where reset put it)."""
    qpos, qvel = scene.data.qpos.copy(), scene.data.qvel.copy()
    qpos[0] = rng.uniform(-np.pi, np.pi)
    qpos[1] = rng.uniform(-2.6, 2.6)
    qvel[:2] = rng.normal(0.0, 0.5, 2)
    scene.env.set_state(qpos, qvel)


def random_action(rng: np.random.Generator) -> np.ndarray:
    return action_for(np.array([rng.uniform(-np.pi, np.pi), rng.uniform(-3.0, 3.0)]))


def make_dataset(episodes: int, ticks: int = 20, seed: int = 0, burst_prob: float = 0.03, log=print) -> Dataset:
    scene, expert = ReacherScene(), ReachExpert()
    images, states, labels = [], [], []
    started = time.monotonic()
    try:
        for e in range(episodes):
            frames, state, actions, clean = record_demo(scene, expert, seed * 1_000_003 + e, ticks, burst_prob)
            for t in range(ticks):
                if clean[t : t + CHUNK].all():
                    images.append(frames[t])
                    states.append(state[t])
                    labels.append(actions[t : t + CHUNK])
            if log and (e + 1) % 250 == 0:
                log(f"  demos: {e + 1}/{episodes} episodes, {len(states)} samples, {time.monotonic() - started:.0f} s")
    finally:
        scene.close()
    return Dataset(np.stack(images), np.stack(states).astype(np.float32), np.stack(labels).astype(np.float32))


def record_demo(scene: ReacherScene, expert: ReachExpert, seed: int, ticks: int, burst_prob: float):
    """One demonstration: frames, policy states, executed actions, and which actions were the expert's."""
    rng = np.random.default_rng(seed)
    scene.reset(seed)
    randomise_arm(scene, rng)
    frames, states, actions, clean = [], [], [], []
    burst = 0
    for t in range(ticks + CHUNK):
        if t < ticks:  # the last CHUNK ticks only supply labels
            frames.append([jpeg_roundtrip(f) for f in scene.render()])
            states.append(scene.policy_state())
        if burst == 0 and rng.random() < burst_prob:
            burst = int(rng.integers(2, 8))
        if burst:
            action = random_action(rng)
            burst -= 1
            clean.append(False)
        else:
            q, qd = scene.joints
            action = expert.action(q, qd, scene.target)
            clean.append(True)
        actions.append(action)
        scene.step_to(action)
    return np.asarray(frames), np.asarray(states), np.asarray(actions), np.asarray(clean)
