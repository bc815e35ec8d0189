"""SimRobot: the Reacher scene behind the robot port, running in real time on its own thread.

Like a real arm, the simulation does not wait for the policy. A physics
thread steps the scene every CONTROL_DT seconds of wall-clock time with the
latest command (a motor controller holds its last command until told
otherwise), renders both cameras after each step (cameras at the control
rate) and scores the task. `observe` returns the latest frames and state;
`apply_action` sets the joint setpoint (cos q0, sin q0, q1) that the arm's
joint PD tracks; `hold` makes the arm hold the pose it is in at that moment,
which is also what it does at the start of an episode until the first action
arrives.

All MuJoCo calls (stepping, rendering, reset) happen on the physics thread:
an EGL context belongs to the thread that made it.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from robot_client.robot import Observation, ObservationUnavailable
from sim.scene import ACTION_DIM, CONTROL_DT, EPISODE_TICKS, ReacherScene, ReachTask, joint_torque, setpoint


@dataclass
class EpisodeRecord:
    seed: int
    targets: int
    reached: int = 0
    reached_at: list = field(default_factory=list)  # tick of each target reached
    distances: list = field(default_factory=list)  # fingertip-target distance after each tick
    held: list = field(default_factory=list)  # True where the arm was holding (no command)
    late_ticks: int = 0  # physics ticks that started more than half a period late (host overloaded)
    frames: list = field(default_factory=list)  # (tick, [frames]) every `frame_every` ticks, when asked

    @property
    def success(self) -> bool:
        return self.reached >= self.targets

    @property
    def ticks(self) -> int:
        return len(self.distances)


class SimRobot:
    """A RobotPort: observe / apply_action / hold, plus reset(seed) / start() / wait() for episodes."""

    num_joints = 2

    def __init__(self, control_dt: float = CONTROL_DT, ticks: int = EPISODE_TICKS, frame_every: int = 0):
        self.control_dt, self.ticks, self.frame_every = control_dt, ticks, frame_every
        self.episode_over = threading.Event()  # set when the episode's ticks are done or every target is reached
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._latest: Observation | None = None
        self._command: np.ndarray | None = None  # joint setpoint (q0, q1); None: hold
        self._hold_pose: np.ndarray | None = None
        self._record: EpisodeRecord | None = None
        self._running = False
        self._closed = False
        self._thread = threading.Thread(target=self._physics, name="sim-physics", daemon=True)
        self._thread.start()

    # --- the robot port ---------------------------------------------------

    def observe(self) -> Observation:
        with self._lock:
            latest = self._latest
        if latest is None:
            raise ObservationUnavailable("simulation not reset yet: no camera frame")
        return Observation(images=list(latest.images), state=latest.state.copy())

    def apply_action(self, action: np.ndarray) -> None:
        goal = setpoint(np.asarray(action, np.float64).ravel()[:ACTION_DIM])
        with self._lock:
            self._command = goal

    def hold(self) -> None:
        with self._lock:
            self._command = None
            self._hold_pose = None  # the physics thread takes the pose at its next step

    # --- episodes ---------------------------------------------------------

    def reset(self, seed: int, timeout_s: float = 30.0) -> None:
        """Start a new episode (physics paused, arm holding) and publish its first frames."""
        done = threading.Event()
        self._jobs.put(("reset", seed, done))
        if not done.wait(timeout_s):
            raise TimeoutError("simulation did not reset")

    def start(self) -> None:
        """Let the physics run in real time from now until the episode is over."""
        self._jobs.put(("start", None, None))

    def wait(self, timeout_s: float | None = None) -> EpisodeRecord:
        self.episode_over.wait(timeout_s)
        return self._record

    def close(self) -> None:
        self._closed = True
        self._jobs.put(("close", None, None))
        self._thread.join(timeout=5)

    # --- the physics thread -------------------------------------------------

    def _physics(self) -> None:
        scene = ReacherScene()
        task: ReachTask | None = None
        try:
            while not self._closed:
                kind, arg, done = self._jobs.get()
                if kind == "close":
                    return
                if kind == "reset":
                    task = ReachTask(scene, arg)
                    self.episode_over.clear()
                    with self._lock:
                        self._command, self._hold_pose = None, None
                        self._record = EpisodeRecord(seed=arg, targets=task.targets)
                    self._publish(scene, 0)
                    done.set()
                elif kind == "start" and task is not None:
                    self._run_episode(scene, task)
        finally:
            scene.close()

    def _run_episode(self, scene: ReacherScene, task: ReachTask) -> None:
        record = self._record
        # Half a period out of phase with a control loop started right after us, so each
        # command lands squarely between two physics steps.
        t0 = time.monotonic() + 0.5 * self.control_dt
        for n in range(self.ticks):
            if self._closed or not self._jobs.empty():
                break  # closed, or reset mid-episode
            delay = t0 + n * self.control_dt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif -delay > 0.5 * self.control_dt:
                record.late_ticks += 1
            with self._lock:
                goal = self._command
                q, qd = scene.joints
                if goal is None:
                    if self._hold_pose is None:
                        self._hold_pose = q
                    goal = self._hold_pose
            scene.step(joint_torque(goal, q, qd))
            task.after_tick()
            record.distances.append(task.distances[-1])
            record.held.append(self._command is None)
            record.reached, record.reached_at = task.reached, list(task.reached_at)
            self._publish(scene, n + 1)
            if task.done:
                break
        self.episode_over.set()

    def _publish(self, scene: ReacherScene, tick: int) -> None:
        frames = scene.render()
        observation = Observation(images=frames, state=scene.policy_state())
        with self._lock:
            self._latest = observation
        if self.frame_every and tick % self.frame_every == 0 and self._record is not None:
            self._record.frames.append((tick, frames))
