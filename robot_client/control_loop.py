"""The control loop: robot port + chunk executor + policy client, at the control frequency.

One thread ticks: take the planned action, apply it (or let the watchdog
hold), and when the plan runs low, take an observation and hand it to the
inference worker. The worker's thread encodes, calls the server and posts the
answer back; the tick only ever polls, so the network never stalls the robot.

The loop knows nothing about ROS 2, files or simulators: only RobotPort.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from robot_client.chunk_executor import ChunkExecutor, ExecutorConfig, PlannedAction, Verdict
from robot_client.errors import ObservationDropped, PolicyError, ServerOverloaded
from robot_client.inference_worker import InferenceResult, InferenceWorker
from robot_client.policy_client import PolicyClient
from robot_client.robot import Observation, ObservationUnavailable, RobotPort
from robot_client.server_spec import ServerSpec
from robot_client.stats import LoopStats
from robot_client.watchdog import Watchdog

logger = logging.getLogger("robot_client")
HOLD_MODES = ("stop", "last_position")


@dataclass(frozen=True)
class LoopConfig:
    prompt: str
    control_frequency: float = 30.0
    merge: str = "replace"  # or "blend"
    max_chunk_age_s: float | None = None  # None: the duration of one chunk
    watchdog_timeout_s: float | None = None  # None: 2.5 control periods
    hold_mode: str = "stop"  # "stop": robot.hold(); "last_position": keep commanding the last action
    margin_ticks: int = 3
    stats_interval_s: float = 10.0
    # An action whose observation is older than this when its tick comes does not run (the
    # robot starves, and the watchdog holds it). None: only max_chunk_age_s applies, at merge.
    max_action_age_s: float | None = None

    def __post_init__(self):
        if self.control_frequency <= 0:
            raise ValueError(f"control frequency must be > 0 Hz, got {self.control_frequency}")
        if self.max_action_age_s is not None and self.max_action_age_s <= 0:
            raise ValueError(f"max action age must be > 0 s, got {self.max_action_age_s}")
        if self.hold_mode not in HOLD_MODES:
            raise ValueError(f"hold mode must be one of {HOLD_MODES}, got {self.hold_mode!r}")

    @property
    def period_s(self) -> float:
        return 1.0 / self.control_frequency


@dataclass(frozen=True)
class TickRecord:
    tick: int
    time: float
    kind: str  # "act" (a fresh action), "starve" (none, not yet holding), "hold" (holding)
    request_id: str = ""
    row: int = -1


class ControlLoop:
    def __init__(
        self,
        robot: RobotPort,
        client: PolicyClient | None,
        spec: ServerSpec,
        config: LoopConfig,
        *,
        clock=time.monotonic,
        sleep=time.sleep,
        worker=None,
        trace_length: int = 100_000,
    ):
        period = config.period_s
        chunk_s = spec.chunk_length * period if spec.chunk_length else 0.5
        max_age = config.max_chunk_age_s or chunk_s
        self.robot, self.spec, self.config = robot, spec, config
        self.clock, self.sleep = clock, sleep
        self.executor = ChunkExecutor(
            ExecutorConfig(
                control_period_s=period,
                merge=config.merge,
                max_chunk_age_s=max_age,
                margin_ticks=config.margin_ticks,
                max_delay=spec.max_delay,
                max_prefix=spec.chunk_length,
            )
        )
        # Default deadline between two ticks (2.5 periods): a tick that lands exactly on a
        # whole-period deadline would hold or not depending on microseconds of jitter.
        self.watchdog = Watchdog(config.watchdog_timeout_s or 2.5 * period)
        # Waiting longer than max_age for an answer is pointless: it would be dropped.
        self.worker = worker or InferenceWorker(client, config.prompt, min(client.timeout_s, max_age), clock)
        self.stats = LoopStats()
        counters = getattr(getattr(robot, "safety", None), "counters", None)
        if counters is not None:
            self.stats.count_safety_of(counters)
        # A port that hands its controller whole trajectories (ROS 2 joint trajectory controller)
        # gets the plan at each merge and after a hold; on the other ticks only its action.
        self._follows_plans = bool(getattr(robot, "follows_plans", False))
        self._plan_sent: int | None = None
        self._stale_from = ""  # request whose actions were last refused as too old (logged once)
        self.trace: deque[TickRecord] = deque(maxlen=trace_length)
        self.hold_times: list[float] = []
        self.error: PolicyError | None = None
        self._last_action: np.ndarray | None = None
        self._in_gap = False
        self._dropping = False  # the last answer was a server drop: log the next ones quietly
        self._overloaded = False  # the last answer was RESOURCE_EXHAUSTED: log the next ones quietly
        self._observe_complaint = ""
        self._t0: float | None = None  # clock time of tick 0, set by run()

    @classmethod
    def connect(
        cls, robot: RobotPort, client: PolicyClient, config: LoopConfig, ready_timeout_s: float = 30.0, **kw
    ) -> ControlLoop:
        """Wait for the server and the robot's sensors, check the robot fits the model, build the loop."""
        spec = client.wait_ready(ready_timeout_s)
        logger.info("policy server %s: %s", client.address, spec.describe())
        observation = wait_for_observation(robot, ready_timeout_s)
        spec.check_robot(
            num_cameras=len(observation.images),
            state_dim=int(np.asarray(observation.state).size),
            prompt=config.prompt,
            joints=getattr(robot, "action_width", getattr(robot, "num_joints", 0)),
        )
        return cls(robot, client, spec, config, **kw)

    # --- one tick -----------------------------------------------------------

    def step(self, tick: int, now: float) -> None:
        for result in self.worker.poll():
            self._on_result(result, tick, now)
        planned = self._fresh(self.executor.action_for(tick), now)
        if planned is not None:
            if self._follows_plans and self._plan_sent != self.executor.plan_version:
                self.robot.follow_plan(self._plan_ahead(tick))
                self._plan_sent = self.executor.plan_version
            else:
                self.robot.apply_action(planned.values)
            self._last_action = planned.values
            self.stats.acted += 1
            if self.watchdog.feed(now):
                self.stats.resumes += 1
                logger.info("resumed: fresh actions from %s", planned.request_id)
            self.trace.append(TickRecord(tick, now, "act", planned.request_id, planned.row))
        else:
            if self.watchdog.last_fresh is not None:
                self.stats.starved += 1
            if self.watchdog.check(now):
                self._start_hold(now)
            elif self.watchdog.holding:
                self.stats.held_ticks += 1
                if self.config.hold_mode == "last_position" and self._last_action is not None:
                    self.robot.apply_action(self._last_action)
            self.trace.append(TickRecord(tick, now, "hold" if self.watchdog.holding else "starve"))
        if self.error is None and not self.worker.busy and self.executor.should_request(tick):
            self._request(tick, now)

    def _fresh(self, planned: PlannedAction | None, now: float) -> PlannedAction | None:
        """The planned action, unless its observation is older than max_action_age_s."""
        limit = self.config.max_action_age_s
        if planned is None or limit is None or now - planned.observed_at <= limit:
            return planned
        self.stats.safety["stale_action"] += 1
        if planned.request_id != self._stale_from:
            self._stale_from = planned.request_id
            logger.warning(
                "actions of %s are %.0f ms old (max_action_age_s %.3f): not executed",
                planned.request_id, (now - planned.observed_at) * 1e3, limit,
            )
        return None

    def _plan_ahead(self, tick: int) -> np.ndarray:
        """The plan from this tick on, cut where its actions would be too old by the time they are due."""
        rows, observed = self.executor.planned_from(tick)
        limit = self.config.max_action_age_s
        if limit is not None:
            t0 = self._t0 if self._t0 is not None else 0.0
            due = t0 + (tick + np.arange(len(rows))) * self.config.period_s
            fresh = due - observed <= limit
            # This tick's row passed _fresh: always keep it.
            rows = rows[: max(1, int(np.argmin(fresh))) if not fresh.all() else len(rows)]
        return rows

    def _start_hold(self, now: float) -> None:
        self._plan_sent = None  # a resume sends the whole plan again
        self.stats.holds += 1
        self.stats.held_ticks += 1
        self.hold_times.append(now)
        late = now - self.watchdog.last_fresh
        logger.warning("no fresh action for %.0f ms: holding the robot (%s)", late * 1e3, self.config.hold_mode)
        if self.config.hold_mode == "last_position" and self._last_action is not None:
            self.robot.apply_action(self._last_action)
        else:
            self.robot.hold()

    def _request(self, tick: int, now: float) -> None:
        try:
            observation = self.robot.observe()
        except ObservationUnavailable as err:
            if str(err) != self._observe_complaint:  # say it once, not 30 times a second
                logger.warning("no observation to send: %s", err)
                self._observe_complaint = str(err)
            return
        self._observe_complaint = ""
        request = self.executor.make_request(tick, now, self.worker.next_request_id())
        prefix, delay = self.executor.wire_prefix(request)
        self.worker.submit(request, observation, prefix, delay, starves_at=self._starves_at(tick, now))
        self.stats.requests += 1

    def _starves_at(self, tick: int, now: float) -> float | None:
        """Clock time the robot runs out of actions to execute: the start of the first tick with none
        (an answer merged at that tick still runs there). None when nothing is executing."""
        starving = self.executor.starvation_tick(tick)
        if starving is None:
            return None
        t0 = self._t0 if self._t0 is not None else now - tick * self.config.period_s
        return t0 + starving * self.config.period_s

    def _on_result(self, result: InferenceResult, tick: int, now: float) -> None:
        if result.error is None:
            chunk = result.chunk
            report = self.executor.accept(result.request, chunk.actions, tick, now, result.received_at)
            self.stats.chunk(report, chunk.inference_ms, chunk.queue_ms)
            if report.verdict is not Verdict.ACCEPTED:
                logger.info(
                    "dropped chunk %s: %s (age %.0f ms)", chunk.request_id, report.verdict.value, report.age_s * 1e3
                )
            elif self._in_gap:
                self._in_gap = False
                logger.info("policy server answering again (replica %s)", chunk.replica_id)
            self._dropping = self._overloaded = False
            return
        self.executor.request_failed(result.request)
        error = result.error
        if isinstance(error, ObservationDropped):
            # The server answered, in time, that this observation came too late to be of use: the
            # connection is fine (no new epoch, no backoff) and the plan in hand still runs. The next
            # tick that wants a chunk sends a fresh observation.
            self.stats.server_drops += 1
            log = logger.debug if self._dropping else logger.warning
            log("request %s: %s; executing the actions in hand", result.request.request_id, error)
            self._dropping = True
            return
        self.stats.failure(error.code.name if error.code is not None else type(error).__name__)
        if not error.transient:
            self.error = error
            return
        if isinstance(error, ServerOverloaded):
            # The server is up and refused this one call: the channel stays, chunks already asked
            # for still count (no new epoch), and the client paces its next attempt.
            log = logger.debug if self._overloaded else logger.warning
            log("%s; retrying on the same connection after a pause", error)
            self._overloaded = True
            return
        self._overloaded = False
        self.executor.connection_lost()
        if not self._in_gap:
            self._in_gap = True
            logger.warning("%s; reconnecting (pre-gap chunks will be dropped)", error)
        else:
            logger.debug("still no server: %s", error)

    # --- the schedule ---------------------------------------------------------

    def run(self, duration_s: float | None = None, stop: threading.Event | None = None) -> LoopStats:
        """Tick until duration_s has passed, `stop` is set, or a fatal error (raised after holding the robot)."""
        period = self.config.period_s
        start = getattr(self.worker, "start", None)
        if start is not None:
            start()
        t0 = self._t0 = self.clock()
        next_log = t0 + self.config.stats_interval_s
        tick = 0
        try:
            while True:
                scheduled = t0 + tick * period
                now = self.clock()
                if now < scheduled:
                    self.sleep(scheduled - now)
                    now = self.clock()
                # A tick more than a period late skips ahead: the plan is indexed by
                # time, so the robot stays on schedule instead of lagging behind it.
                behind = int((now - scheduled) / period)
                tick += behind
                self.stats.tick(now - (t0 + tick * period), behind)
                self.step(tick, now)
                if self.error is not None:
                    raise self.error
                if (duration_s is not None and now - t0 >= duration_s) or (stop is not None and stop.is_set()):
                    return self.stats
                if now >= next_log:
                    logger.info("stats: %s", self.stats.line())
                    next_log += self.config.stats_interval_s
                tick += 1
        finally:
            if self.watchdog.last_fresh is not None and not self.watchdog.holding:
                self.robot.hold()  # leaving the loop: never leave a robot moving on its own
            close = getattr(self.worker, "close", None)
            if close is not None:
                close()
            logger.info("final stats: %s", self.stats.line())


def wait_for_observation(robot: RobotPort, timeout_s: float, poll_s: float = 0.1) -> Observation:
    """The first complete observation; sensors on a real robot take a moment to publish."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return robot.observe()
        except ObservationUnavailable as err:
            if time.monotonic() >= deadline:
                raise ObservationUnavailable(f"robot not ready after {timeout_s:.1f} s: {err}") from None
            time.sleep(poll_s)
