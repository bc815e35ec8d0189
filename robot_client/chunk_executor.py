"""ChunkExecutor: which action runs at each control tick, and when to ask for the next chunk.

Pure timing and merging logic. It never reads a clock or sleeps: callers pass
the tick number and the time, so every rule here is tested with a fake clock.

Timeline. Ticks are numbered; tick n runs at t0 + n * period. The plan maps
ticks to actions. A request made at tick k (after k's action ran) observes the
robot there, so row 0 of its answer is meant for tick k + 1. While it is in
flight the plan keeps running: those rows go out as `prefix_action`, and
`delay` says how many of them will have run before the answer can be used, so
a server that supports real-time chunking returns a chunk whose first `delay`
rows equal them (the seam is then continuous).

When the answer arrives, at tick m, the robot has executed
e = min(m - k - 1, len(prefix)) more rows of the old plan: all ticks in between
if the plan covered them, or the whole prefix and then stood still at its
last row. Row e of the answer is therefore the next one to run. Ticks where
the old plan still has actions are merged by the configured rule.

Starvation. The answer is merged before the tick's action is taken, so an
answer that arrives at any time before tick m starts runs at m. With R rows
planned after tick k, the robot executes tick k's action until tick k + 1 and
the last planned one until tick k + R + 1: that tick is where it starves, and
an answer arriving before it starts still runs there (from row e = R, the row
right after the prefix), seamlessly. So a request made at tick k has
(R + 1) periods from tick k's start in which its answer is useful, not R.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum

import numpy as np

MERGE_RULES = ("replace", "blend")


@dataclass(frozen=True)
class ExecutorConfig:
    control_period_s: float
    merge: str = "replace"  # "replace": the new chunk wins; "blend": cross-fade over the overlap
    max_chunk_age_s: float = 0.5  # answers to observations older than this are dropped
    margin_ticks: int = 3  # extra rows kept in hand on top of the expected latency
    max_delay: int = 0  # the server's limit for `delay`; 0 means send no prefix at all
    max_prefix: int = 0  # longest prefix to send (the chunk length); 0 means no limit
    initial_latency_s: float = 0.1  # latency assumed before the first answer is measured
    latency_window: int = 20  # how many recent round trips the estimate looks at
    latency_quantile: float = 0.9

    def __post_init__(self):
        if self.control_period_s <= 0:
            raise ValueError(f"control period must be > 0, got {self.control_period_s}")
        if self.merge not in MERGE_RULES:
            raise ValueError(f"merge rule must be one of {MERGE_RULES}, got {self.merge!r}")
        if self.max_chunk_age_s <= 0:
            raise ValueError(f"max chunk age must be > 0, got {self.max_chunk_age_s}")


@dataclass(frozen=True)
class ChunkRequest:
    request_id: str
    tick: int  # last tick executed before the observation; row 0 of the answer is for tick + 1
    epoch: int  # connection epoch when sent; answers from an older epoch predate a gap
    sent_at: float  # clock time the observation was taken
    prefix: np.ndarray  # (n, action_dim) the plan for ticks tick+1 .. tick+n
    delay: int  # rows of the answer expected to run (from the prefix) before it is used


class Verdict(Enum):
    ACCEPTED = "accepted"
    STALE_EPOCH = "requested before a connection gap"
    TOO_OLD = "older than max_chunk_age"
    EXPIRED = "every row already in the past"
    NOT_IN_FLIGHT = "not the request in flight"


@dataclass(frozen=True)
class MergeReport:
    verdict: Verdict
    age_s: float  # from the observation to the tick the answer is merged at
    latency_s: float  # round trip: from the observation to the answer's arrival
    first_row: int = 0  # row of the answer that runs first (rows before it already ran from the old plan)
    overlap: int = 0  # ticks where the old plan and the answer both had an action
    disagreement: float = 0.0  # max |answer - old plan| over the overlap (0 where the prefix was kept)
    seam_step: float = 0.0  # max |first action after the merge - last action executed|: the jerk felt


@dataclass(frozen=True)
class PlannedAction:
    values: np.ndarray  # (action_dim,)
    request_id: str  # which answer it came from
    row: int  # its row in that answer
    observed_at: float = 0.0  # clock time of the observation the answer was computed from


class ChunkExecutor:
    def __init__(self, config: ExecutorConfig):
        self.config = config
        self.epoch = 0
        self.in_flight: ChunkRequest | None = None
        self._latencies: deque[float] = deque(maxlen=config.latency_window)
        self._start = 0  # tick of self._plan[0]
        self._plan = np.zeros((0, 0), np.float32)
        self._source: list[tuple[str, int, float]] = []  # (request_id, row, observed_at) per plan row
        self.plan_version = 0  # bumped at every merge: a port following whole plans is sent the new one
        self._last: np.ndarray | None = None  # last action handed out

    # --- the plan ----------------------------------------------------------

    def action_for(self, tick: int) -> PlannedAction | None:
        """The action planned for this tick, or None (starved). Rows before `tick` are discarded."""
        self._drop_before(tick)
        if not len(self._plan) or tick != self._start:
            return None
        request_id, row, observed_at = self._source[0]
        self._last = self._plan[0].copy()
        return PlannedAction(self._last, request_id, row, observed_at)

    def planned_from(self, tick: int) -> tuple[np.ndarray, np.ndarray]:
        """The plan's rows from `tick` on and the observation time of each (empty if none)."""
        self._drop_before(tick)
        if not len(self._plan) or tick != self._start:
            return self._plan[:0], np.zeros(0)
        return self._plan.copy(), np.array([s[2] for s in self._source])

    def remaining(self, tick: int) -> int:
        """Planned actions for ticks after `tick`."""
        return max(0, self._start + len(self._plan) - (tick + 1))

    def starvation_tick(self, tick: int) -> int | None:
        """The first tick after `tick` with no planned action: the robot starves there unless an
        answer has arrived before it starts. None when `tick` itself has no action (before the
        first chunk, or the plan already ran dry): nothing is executing that could run out."""
        if not self._start <= tick < self._start + len(self._plan):
            return None
        return tick + 1 + self.remaining(tick)

    def _rows_after(self, tick: int) -> np.ndarray:
        return self._plan[max(0, tick + 1 - self._start) :]

    def _drop_before(self, tick: int) -> None:
        cut = min(max(0, tick - self._start), len(self._plan))
        if cut:
            self._plan, self._source, self._start = self._plan[cut:], self._source[cut:], self._start + cut

    # --- latency ----------------------------------------------------------

    @property
    def latency_estimate_s(self) -> float:
        if not self._latencies:
            return self.config.initial_latency_s
        return float(np.quantile(np.asarray(self._latencies), self.config.latency_quantile))

    def latency_ticks(self) -> int:
        """Ticks an answer is expected to take: it is usable at the first tick after it arrives."""
        return max(1, math.ceil(self.latency_estimate_s / self.config.control_period_s - 1e-9))

    def request_threshold(self) -> int:
        """Ask for the next chunk once no more than this many actions remain."""
        return self.latency_ticks() + self.config.margin_ticks

    # --- requests -------------------------------------------------------

    def should_request(self, tick: int) -> bool:
        return self.in_flight is None and self.remaining(tick) <= self.request_threshold()

    def make_request(self, tick: int, now: float, request_id: str) -> ChunkRequest:
        """Record a request made at `tick` (after its action ran); its prefix is the rest of the plan."""
        prefix = self._rows_after(tick).copy()
        delay = min(self.latency_ticks(), len(self._wire_rows(prefix)), self.config.max_delay)
        self.in_flight = ChunkRequest(request_id, tick, self.epoch, now, prefix, max(0, delay))
        return self.in_flight

    def _wire_rows(self, prefix: np.ndarray) -> np.ndarray:
        if self.config.max_delay <= 0:
            return prefix[:0]  # the server does not continue a prefix; others would only be confused by one
        return prefix[: self.config.max_prefix] if self.config.max_prefix else prefix

    def wire_prefix(self, request: ChunkRequest) -> tuple[np.ndarray | None, int]:
        """What goes on the wire as prefix_action/delay (nothing for servers without real-time chunking)."""
        rows = self._wire_rows(request.prefix)
        return (rows, request.delay) if len(rows) else (None, 0)

    def request_failed(self, request: ChunkRequest) -> None:
        if self.in_flight is request:
            self.in_flight = None

    def connection_lost(self) -> None:
        """A gap: every answer to a request sent before now is refused from here on."""
        self.epoch += 1

    # --- answers ------------------------------------------------------------

    def accept(
        self, request: ChunkRequest, actions: np.ndarray, tick: int, now: float, received_at: float | None = None
    ) -> MergeReport:
        """Merge an answer into the plan at `tick` (before that tick's action is taken), or refuse it."""
        if self.in_flight is request:
            self.in_flight = None
        age = now - request.sent_at
        latency = (now if received_at is None else received_at) - request.sent_at
        if request.epoch != self.epoch:
            return MergeReport(Verdict.STALE_EPOCH, age, latency)
        self._latencies.append(latency)  # measured only on answers from the live connection
        if age > self.config.max_chunk_age_s:
            return MergeReport(Verdict.TOO_OLD, age, latency)
        actions = np.asarray(actions, np.float32)
        first = min(max(0, tick - request.tick - 1), len(request.prefix))
        if first >= len(actions):
            return MergeReport(Verdict.EXPIRED, age, latency, first_row=first)
        new = actions[first:]
        self._drop_before(tick)
        old = self._plan[max(0, tick - self._start) :] if len(self._plan) and self._start <= tick else self._plan[:0]
        if len(old) and old.shape[1] != new.shape[1]:
            old = old[:0]  # a plan of another width (model changed): nothing to merge with
        overlap = min(len(old), len(new))
        disagreement = float(np.max(np.abs(new[:overlap] - old[:overlap]))) if overlap else 0.0
        merged = new.copy()
        if overlap and self.config.merge == "blend":
            # Linear cross-fade from the old plan to the answer over the overlap.
            weight = (np.arange(1, overlap + 1, dtype=np.float32) / (overlap + 1))[:, None]
            merged[:overlap] = (1.0 - weight) * old[:overlap] + weight * new[:overlap]
        last = self._last
        seam = float(np.max(np.abs(merged[0] - last))) if last is not None and last.shape == merged[0].shape else 0.0
        self._start, self._plan = tick, merged
        self._source = [(request.request_id, first + i, request.sent_at) for i in range(len(merged))]
        self.plan_version += 1
        return MergeReport(Verdict.ACCEPTED, age, latency, first, overlap, disagreement, seam)
