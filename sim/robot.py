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

What the joint PD tracks is a `JointGoal`: the latest `Command`, asked once
per tick for the setpoint at that tick's time on the robot's clock. The
robot port's own commands are a position goal and holding; other front ends
(sim/ros2_sim.py: ros2_control's controllers) bring commands that move the
goal with time. After every tick, and after a reset, an optional `on_sample`
hook gets what the sensors saw, stamped on that clock, to publish it.

All MuJoCo calls (stepping, rendering, reset) happen on the physics thread:
an EGL context belongs to the thread that made it.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from robot_client.robot import Observation, ObservationUnavailable
from sim.scene import ACTION_DIM, CONTROL_DT, EPISODE_TICKS, ReacherScene, ReachTask, joint_torque, setpoint

ELBOW_LIMIT = 3.0  # rad: Reacher's joint1 range; a goal beyond it would only press the arm into its stop
HOLD = "hold"  # the name of the command while the arm holds its pose


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
    goals: list = field(default_factory=list)  # (q0, q1) setpoint the joint PD tracked in each tick
    sources: list = field(default_factory=list)  # name of the command behind each tick's goal (HOLD: none)
    times: list = field(default_factory=list)  # robot-clock time (s) each tick's goal was taken for

    @property
    def success(self) -> bool:
        return self.reached >= self.targets

    @property
    def ticks(self) -> int:
        return len(self.distances)


class Command:
    """One source of the joint goal: the setpoint at time t (seconds on the robot's clock)."""

    name = ""

    def replaces(self, previous: Command) -> None:
        """Told which command it takes over from; most take over at once and need not know."""

    def goal(self, t: float, q: np.ndarray, previous: np.ndarray | None) -> tuple[np.ndarray, str]:
        """The goal and the name of the command that set it (one that has not begun yet names its predecessor).

        q: the measured joint angles; previous: the goal of the tick before (None at an episode's start).
        """
        raise NotImplementedError


class Hold(Command):
    """Hold the pose measured at the first tick after the command."""

    name = HOLD

    def __init__(self):
        self._pose: np.ndarray | None = None

    def goal(self, t, q, previous):
        if self._pose is None:
            self._pose = q.copy()
        return self._pose, self.name


class Position(Command):
    name = "position"

    def __init__(self, goal):
        self._goal = np.array(goal, np.float64)

    def goal(self, t, q, previous):
        return self._goal, self.name


class JointGoal:
    """What the arm's joint PD tracks: the latest command, asked once per physics tick.

    Commands arrive on any thread; `goal` runs on the physics thread. `commanded`
    is set by the first command after a reset, for a robot that starts its
    episode when told to move.
    """

    def __init__(self):
        self.commanded = threading.Event()
        self._lock = threading.Lock()
        self._command: Command = Hold()
        self._previous: np.ndarray | None = None

    def command(self, command: Command) -> None:
        with self._lock:
            command.replaces(self._command)
            self._command = command
            self.commanded.set()

    def position(self, goal) -> None:
        self.command(Position(goal))

    def hold(self) -> None:
        self.command(Hold())

    def reset(self) -> None:
        """A new episode: hold the starting pose until commanded."""
        with self._lock:
            self._command, self._previous = Hold(), None
            self.commanded.clear()

    def goal(self, t: float, q: np.ndarray) -> tuple[np.ndarray, str]:
        with self._lock:
            goal, name = self._command.goal(t, q, self._previous)
            goal = np.array(goal, np.float64)
            goal[1] = np.clip(goal[1], -ELBOW_LIMIT, ELBOW_LIMIT)
            self._previous = goal
            return goal.copy(), name


class Clock(Protocol):
    def now_ns(self) -> int: ...

    def advance(self, dt: float) -> None:
        """One physics tick of dt seconds has run."""


class MonotonicClock:
    """The host's monotonic clock: it runs by itself, so a tick does not move it."""

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def advance(self, dt: float) -> None:
        pass


@dataclass(frozen=True)
class Sample:
    """What the sensors saw after tick `tick` (0: right after a reset), at `stamp_ns` on the robot's clock."""

    tick: int
    stamp_ns: int
    q: np.ndarray
    qd: np.ndarray
    frames: list


class SimRobot:
    """A RobotPort: observe / apply_action / hold, plus reset(seed) / start() / wait() for episodes."""

    num_joints = 2

    def __init__(self, control_dt: float = CONTROL_DT, ticks: int = EPISODE_TICKS, frame_every: int = 0,
                 goals: JointGoal | None = None, clock: Clock | None = None,
                 on_sample: Callable[[Sample], None] | None = None):
        self.control_dt, self.ticks, self.frame_every = control_dt, ticks, frame_every
        self.goals = goals or JointGoal()
        self.clock = clock or MonotonicClock()
        self.on_sample = on_sample  # runs on the physics thread: keep it short, it delays the next tick
        self.episode_over = threading.Event()  # set when the episode's ticks are done or every target is reached
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._latest: Observation | None = None
        self._record: EpisodeRecord | None = None
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
        self.goals.position(setpoint(np.asarray(action, np.float64).ravel()[:ACTION_DIM]))

    def hold(self) -> None:
        self.goals.hold()  # the physics thread takes the pose at its next step

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
                    self.goals.reset()
                    with self._lock:
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
            q, qd = scene.joints
            t = self.clock.now_ns() / 1e9
            goal, source = self.goals.goal(t, q)
            scene.step(joint_torque(goal, q, qd))
            self.clock.advance(self.control_dt)
            task.after_tick()
            record.distances.append(task.distances[-1])
            record.held.append(source == HOLD)
            record.goals.append(goal)
            record.sources.append(source)
            record.times.append(t)
            record.reached, record.reached_at = task.reached, list(task.reached_at)
            self._publish(scene, n + 1)
            if task.done:
                break
        self.episode_over.set()

    def _publish(self, scene: ReacherScene, tick: int) -> None:
        stamp_ns = self.clock.now_ns()  # the state is sampled now, the frames rendered from it
        q, qd = scene.joints
        frames = scene.render()
        observation = Observation(images=frames, state=scene.policy_state())
        with self._lock:
            self._latest = observation
        if self.frame_every and tick % self.frame_every == 0 and self._record is not None:
            self._record.frames.append((tick, frames))
        if self.on_sample is not None:
            self.on_sample(Sample(tick, stamp_ns, q, qd, frames))
