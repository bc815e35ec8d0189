"""The serving engine: wire observations in, action chunks out, one forward pass at a time.

Plain Python (no Ray): the Serve replica (serve_app/replica.py), the direct
baseline (benchmarks/direct_server.py) and the unit tests are adapters around it.

    submit(request, deadline)
      -> decode (on the event loop for robot-sized frames, else the decode pool)
      -> DeadlineQueue (serve_app/deadlines.py)
      -> trigger: who says "run a pass now" (@serve.batch inside a replica)
      -> _run_pass: take the most urgent observations, drop the hopeless,
         stack + policy.predict + RTC prefix pinning on the one device thread
      -> ChunkResult

There is one batching layer. Each observation triggers a pass through the
trigger, passes never overlap, and a pass takes from the queue whatever is
waiting (up to max_batch_size), not just the observations that triggered it:
under load, work that arrives while the device is busy rides the next pass.
An observation a pass did not take triggers again. Triggers whose observations
were already served find nothing to do and cost no device time.

Inside a replica the trigger is `@serve.batch(max_concurrent_batches=1)`, which
adds its batch wait timeout and Serve's batch metrics. Outside Serve it is a
lock (SerialTrigger): `@serve.batch` needs a replica context in Ray 2.60
(_BatchQueue asks serve.get_replica_context() for max_ongoing_requests).
Pass composition is the same either way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Protocol

import grpc
import numpy as np

from serve_app.deadlines import CANCELLED, EXPIRED, DeadlineQueue, Drop, PassClock, Ticket
from serve_app.device import device_responds
from serve_app.errors import RequestError
from serve_app.images import ImageLimits
from serve_app.observation import Observation, ObservationBatch
from serve_app.parse import decode_cost, parse_observation
from serve_app.policies import Policy
from serve_app.responses import ChunkResult
from serve_app.rtc import pin_prefix

logger = logging.getLogger("ray.serve")

SCHEDULINGS = ("deadline", "fifo")
FAILED_PASSES_UNHEALTHY = 3  # consecutive failed forward passes that make the replica report unhealthy


@dataclass(frozen=True)
class BatchSettings:
    """The live-tunable part of serving (`user_config` in serve_config.yaml); the engine is its only reader."""

    max_batch_size: int = 16  # observations per forward pass
    batch_wait_timeout_s: float = 0.0  # how long a pass waits for more observations (inside Serve)
    scheduling: str = "deadline"  # "deadline": most urgent first, hopeless ones dropped; "fifo": arrival order

    @classmethod
    def from_user_config(cls, config: dict) -> BatchSettings:
        known = sorted(f.name for f in fields(cls))
        unknown = set(config) - set(known)
        if unknown:
            raise ValueError(f"user_config: unknown keys {sorted(unknown)}; known: {known}")
        settings = cls(**config)
        if settings.max_batch_size < 1 or settings.batch_wait_timeout_s < 0:
            raise ValueError(f"user_config: need max_batch_size >= 1 and batch_wait_timeout_s >= 0, got {settings}")
        if settings.scheduling not in SCHEDULINGS:
            raise ValueError(f"user_config: scheduling must be one of {SCHEDULINGS}, got {settings.scheduling!r}")
        return settings


@dataclass(frozen=True)
class PassReport:
    size: int
    inference_ms: float
    longest_queue_ms: float  # from enqueued to the pass starting, for the longest waiter
    tightest_slack_ms: float | None  # the most urgent member's deadline minus the pass's expected end


class EngineListener(Protocol):
    """Where the engine reports, on the event loop (metrics, the autoscaler's load meter)."""

    def forward_pass(self, report: PassReport) -> None: ...

    def dropped(self, reason: str, count: int) -> None: ...


class Trigger(Protocol):
    def __call__(self, ticket: Ticket) -> Awaitable: ...

    def configure(self, settings: BatchSettings) -> None: ...


RunPass = Callable[[list[Ticket]], Awaitable[list[None]]]


class SerialTrigger:
    """Outside Serve: one pass per trigger, one at a time."""

    def __init__(self, run_pass: RunPass, settings: BatchSettings):
        self._run_pass = run_pass
        self._lock, self._loop = asyncio.Lock(), None

    async def __call__(self, ticket: Ticket) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a lock serves one event loop (tests and scripts may run several in turn)
            self._lock, self._loop = asyncio.Lock(), loop
        async with self._lock:
            await self._run_pass([ticket])

    def configure(self, settings: BatchSettings) -> None:
        """Nothing to apply: without Serve there is no batch wait."""


@dataclass(frozen=True)
class EngineExecutors:
    """The threads an engine computes on: decoding of large frames, and the one device thread."""

    decode: ThreadPoolExecutor
    device: ThreadPoolExecutor

    @classmethod
    def own(cls, decode_threads: int = 2) -> EngineExecutors:
        return cls(ThreadPoolExecutor(decode_threads, thread_name_prefix="decode"),
                   ThreadPoolExecutor(1, thread_name_prefix="device"))


class SharedTrigger:
    """One trigger for the engines of several models in a replica: their passes run one at a time.

    Each engine's pass still takes only its own queue, so a batch never mixes models. Inside Serve
    the underlying trigger is one `@serve.batch` for the replica: a model loaded or evicted at run
    time adds or leaves no batching task behind (a `@serve.batch` per engine would keep an evicted
    model alive in its queue's task). Serve splits a batch by `multiplexed_model_id` and runs the
    parts concurrently, so the lock here keeps passes strictly in turn: the pass clock's estimates,
    and so the deadline drops, assume a pass has the device to itself.
    """

    def __init__(self, make: Callable[[RunPass, BatchSettings], Trigger], settings: BatchSettings):
        self._trigger = make(self._run_passes, settings)
        self._lock, self._loop = asyncio.Lock(), None

    def __call__(self, run_pass: RunPass, ticket: Ticket) -> Awaitable:
        return self._trigger((run_pass, ticket))

    def for_engine(self, run_pass: RunPass, settings: BatchSettings) -> Trigger:
        """An engine's trigger (pass this method as Engine's `trigger`)."""
        return _EngineTrigger(self, run_pass)

    def configure(self, settings: BatchSettings) -> None:
        self._trigger.configure(settings)

    async def _run_passes(self, items: list[tuple[RunPass, Ticket]]) -> list[None]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a lock serves one event loop (tests run several in turn)
            self._lock, self._loop = asyncio.Lock(), loop
        by_engine: dict[RunPass, list[Ticket]] = {}
        for run_pass, ticket in items:
            by_engine.setdefault(run_pass, []).append(ticket)
        async with self._lock:
            for run_pass, tickets in by_engine.items():
                await run_pass(tickets)
        return [None] * len(items)


class _EngineTrigger:
    def __init__(self, shared: SharedTrigger, run_pass: RunPass):
        self._shared, self._run_pass = shared, run_pass

    def __call__(self, ticket: Ticket) -> Awaitable:
        return self._shared(self._run_pass, ticket)

    def configure(self, settings: BatchSettings) -> None:
        self._shared.configure(settings)


class Engine:
    def __init__(
        self,
        policy: Policy,
        *,
        settings: BatchSettings = BatchSettings(),
        trigger: Callable[[RunPass, BatchSettings], Trigger] = SerialTrigger,
        listener: EngineListener | None = None,
        limits: ImageLimits | None = None,
        decode_threads: int = 2,
        inline_decode_max_pixels: int = 2 * 640 * 480,
        clock: Callable[[], float] = time.perf_counter,
        executors: EngineExecutors | None = None,
    ):
        self.policy = policy
        self.spec = policy.spec
        self._limits = limits or ImageLimits()
        self._listener = listener
        self._clock = clock
        # Observations up to inline_decode_max_pixels decode on the event loop:
        # for robot-sized frames (two 224x224 JPEGs: ~0.3 ms) the hop to a pool
        # thread and back cost more than the decode, and 16 robots got 25% more
        # chunks/s without it. Larger frames go to the pool so that one robot's
        # 4K camera cannot stall every other robot on this replica.
        self._inline_decode_max_pixels = inline_decode_max_pixels
        # One device thread: forward passes never overlap on the device. Engines of several models in
        # one replica share theirs (and the decode pool), so that they still take turns on the device.
        executors = executors or EngineExecutors.own(decode_threads)
        self._decode_pool, self._device = executors.decode, executors.device
        self._settings = settings
        self._queue = DeadlineQueue(deadline_aware=settings.scheduling == "deadline")
        self._pass_clock = PassClock()
        self._failed_passes, self._last_failure = 0, None
        self._trigger = trigger(self._run_pass, settings)

    @property
    def settings(self) -> BatchSettings:
        return self._settings

    def configure(self, settings: BatchSettings) -> None:
        self._settings = settings
        self._queue.set_deadline_aware(settings.scheduling == "deadline")
        self._trigger.configure(settings)

    # --- the hot path ----------------------------------------------------

    async def submit(self, request, deadline: float | None) -> ChunkResult:
        """The chunk for one ObservationRequest; RequestError for bad input or a dropped observation.

        `deadline` is on this engine's clock (serve_app.deadlines.deadline_of); None: none known.
        """
        observation = await self.decode(request)
        future = asyncio.get_running_loop().create_future()
        ticket = Ticket(observation, self._clock(), deadline, functools.partial(_wake, future))
        self._queue.push(ticket)
        self._pull(ticket)
        try:
            await future
        except asyncio.CancelledError:
            ticket.cancelled = True  # the robot gave up: its pass will skip it
            raise
        if isinstance(ticket.outcome, BaseException):
            raise ticket.outcome
        return ticket.outcome

    async def decode(self, request) -> Observation:
        if len(request.images) <= self.spec.num_cameras and decode_cost(request) <= self._inline_decode_max_pixels:
            return parse_observation(request, self.spec, self.policy.frames, self._limits)
        return await asyncio.get_running_loop().run_in_executor(
            self._decode_pool, parse_observation, request, self.spec, self.policy.frames, self._limits
        )

    def _pull(self, ticket: Ticket) -> None:
        task = asyncio.ensure_future(self._trigger(ticket))
        task.add_done_callback(functools.partial(self._pulled, ticket))

    def _pulled(self, ticket: Ticket, task: asyncio.Future) -> None:
        failure = None if task.cancelled() else task.exception()
        if ticket.finished or ticket.cancelled:
            return
        if failure is not None:
            ticket.finish(failure)
        elif task.cancelled():
            ticket.finish(RequestError(grpc.StatusCode.UNAVAILABLE, "the replica is shutting down; retry"))
        else:
            self._pull(ticket)  # that pass took more urgent observations: ride the next

    async def _run_pass(self, triggers: list[Ticket]) -> list[None]:
        now = self._clock()
        size = self._settings.max_batch_size
        batch, drops = self._queue.take(now, size, self._pass_clock)
        self._drop(drops, now)
        if batch:
            expected_end = now + self._pass_clock.estimate(len(batch))
            dated = [t.deadline for t in batch if t.deadline is not None]
            slack_ms = (min(dated) - expected_end) * 1e3 if dated else None
            try:
                started, seconds, actions = await asyncio.get_running_loop().run_in_executor(
                    self._device, self._forward, [t.observation for t in batch]
                )
            except Exception as exc:  # noqa: BLE001 - every member must hear about it
                self._failed_passes, self._last_failure = self._failed_passes + 1, exc
                for ticket in batch:
                    ticket.finish(exc)
            else:
                self._failed_passes = 0
                self._pass_clock.record(len(batch), seconds)
                inference_ms = seconds * 1e3
                for ticket, chunk in zip(batch, actions):
                    queue_ms = (started - ticket.enqueued_at) * 1e3
                    ticket.finish(ChunkResult(chunk, inference_ms, queue_ms, len(batch)))
                longest = (started - min(t.enqueued_at for t in batch)) * 1e3
                self._report("forward_pass", PassReport(len(batch), inference_ms, longest, slack_ms))
        return [None] * len(triggers)

    def _forward(self, observations: list[Observation]) -> tuple[float, float, np.ndarray]:
        """On the device thread: (start, seconds, actions), stacking included (the deadline clock counts it)."""
        started = self._clock()
        batch = ObservationBatch.stack(observations)
        actions = pin_prefix(self.policy.predict(batch), batch)
        if not np.isfinite(actions).all():  # never a NaN to a motor
            raise RuntimeError(f"the policy returned non-finite actions for a pass of {len(observations)}")
        return started, self._clock() - started, actions

    def _drop(self, drops: list[Drop], now: float) -> None:
        counts: dict[str, int] = {}
        for drop in drops:
            counts[drop.reason] = counts.get(drop.reason, 0) + 1
            if drop.reason != CANCELLED:  # a cancelled caller hears nothing
                drop.ticket.finish(RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, self._why(drop, now)))
        for reason, count in counts.items():
            self._report("dropped", reason, count)

    def _why(self, drop: Drop, now: float) -> str:
        waited_ms = (now - drop.ticket.enqueued_at) * 1e3
        if drop.reason == EXPIRED:
            return (f"dropped before the forward pass: its deadline passed {drop.late_by_s * 1e3:.0f} ms ago, after "
                    f"{waited_ms:.0f} ms in the queue; the replica is overloaded (more replicas, or fewer robots)")
        return (f"dropped before the forward pass: the next pass would end {drop.late_by_s * 1e3:.0f} ms after its "
                f"deadline (it waited {waited_ms:.0f} ms); a later chunk would be of no use to the robot")

    def _report(self, what: str, *args) -> None:
        if self._listener is None:
            return
        try:
            getattr(self._listener, what)(*args)
        except Exception:
            logger.exception("engine listener %s failed", what)

    # --- health ------------------------------------------------------------

    def warm_up(self) -> None:
        """A blank pass that pays for lazy initialisation, then a timed one.

        A policy with its own warm_up (pi05: one pass per batch bucket, on CUDA each a graph
        capture, so that no robot's request pays for one) runs it as that first pass."""
        own = getattr(self.policy, "warm_up", None)
        if callable(own):
            own()
        else:
            self.probe()
        started = self._clock()
        self.probe()
        self._pass_clock.record(1, self._clock() - started)

    async def check(self) -> None:
        """Serve's health probe, with no forward pass (a probe pass every 10 s would stall every robot here).

        Unhealthy when the last FAILED_PASSES_UNHEALTHY passes all failed. Then a no-op
        on the device thread, between passes: a wedged device hangs it, and Ray's
        health_check_timeout_s replaces the replica; and a one-element op on the
        device: a lost GPU raises.
        """
        if self._failed_passes >= FAILED_PASSES_UNHEALTHY:
            raise RuntimeError(f"the last {self._failed_passes} forward passes failed; last: {self._last_failure!r}")
        await asyncio.get_running_loop().run_in_executor(self._device, device_responds, self.policy.device)

    def probe(self) -> None:
        spec = self.spec
        actions = self.policy.predict(ObservationBatch.stack([Observation.blank(spec, self.policy.frames.dtype)]))
        if actions.shape != (1, spec.chunk_length, spec.action_dim) or not np.isfinite(actions).all():
            raise RuntimeError(f"health probe: policy returned {actions.shape} with non-finite values")


def _wake(future: asyncio.Future, ticket: Ticket) -> None:
    if not future.done():
        future.set_result(None)
