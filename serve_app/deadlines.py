"""When each observation's chunk is due, and which observations ride the next forward pass.

An observation's deadline is the earlier of its call's gRPC deadline (where the
server can see it) and the robot's time to starvation (ObservationRequest field
100), counted from when the replica received it. A chunk that arrives later is
of no use: the robot has run out of actions and holds.

`DeadlineQueue.take` forms one forward pass. Deadline-aware (the default): the
most urgent observations first, and an observation whose deadline has passed,
or cannot be met by the pass being formed, is dropped before any compute is
spent on it. FIFO: arrival order, nothing dropped for time (the behaviour
before deadlines; kept as the baseline benchmarks/overload.py compares with).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app.errors import invalid

# An observation with no deadline is ordered as if due this long after it
# arrived, so that deadline-carrying traffic cannot starve it; it is never
# dropped for time.
UNDATED_ORDER_S = 1.0

EXPIRED = "expired"  # the deadline passed while the observation waited
UNMEETABLE = "unmeetable"  # the next pass would end after the deadline
CANCELLED = "cancelled"  # the caller went away (gRPC deadline, robot hung up)


def deadline_of(received_at: float, time_to_starvation_ms: float, call_time_remaining_s: float | None) -> float | None:
    """The observation's deadline on the replica's clock (None: none known)."""
    ttl = time_to_starvation_ms
    if not math.isfinite(ttl) or ttl < 0:
        raise invalid(f"time_to_starvation_ms: {ttl} is not a duration; send milliseconds > 0, or 0 for none")
    due = [received_at + ttl / 1e3] if ttl > 0 else []
    if call_time_remaining_s is not None:
        due.append(received_at + call_time_remaining_s)
    return min(due) if due else None


@dataclass(eq=False)
class Ticket:
    """One observation waiting for its pass; `outcome` is set once, by the pass or the drop."""

    observation: object
    enqueued_at: float
    deadline: float | None
    done: Callable[[Ticket], None]  # called once the outcome is set
    seq: int = 0
    cancelled: bool = False
    outcome: object = None  # a ChunkResult, or the exception the caller gets
    finished: bool = False

    def finish(self, outcome) -> None:
        if not self.finished:
            self.finished, self.outcome = True, outcome
            self.done(self)


@dataclass
class Drop:
    ticket: Ticket
    reason: str
    late_by_s: float  # how far past its deadline the chunk would have arrived (0 for cancelled)


class PassClock:
    """How long a forward pass of n observations takes: a running mean per batch size."""

    def __init__(self, smoothing: float = 0.2):
        self._mean: dict[int, float] = {}
        self._smoothing = smoothing

    def record(self, size: int, seconds: float) -> None:
        old = self._mean.get(size)
        self._mean[size] = seconds if old is None else old + self._smoothing * (seconds - old)

    def estimate(self, size: int) -> float:
        """Seconds; 0 until a pass has been timed. A size not timed yet is taken to be as fast as the next
        larger size timed, or as the largest: an estimate errs towards computing, never drops on a guess."""
        if not self._mean:
            return 0.0
        larger = [s for s in self._mean if s >= size]
        return self._mean[min(larger) if larger else max(self._mean)]


@dataclass
class DeadlineQueue:
    deadline_aware: bool = True
    _heap: list = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)

    def push(self, ticket: Ticket) -> None:
        ticket.seq = next(self._seq)
        heapq.heappush(self._heap, (self._key(ticket), ticket.seq, ticket))

    def set_deadline_aware(self, deadline_aware: bool) -> None:
        if deadline_aware != self.deadline_aware:
            self.deadline_aware = deadline_aware
            self._heap = [(self._key(t), seq, t) for _, seq, t in self._heap]
            heapq.heapify(self._heap)

    def _key(self, ticket: Ticket) -> float:
        if not self.deadline_aware:
            return ticket.seq
        if ticket.deadline is None:
            return ticket.enqueued_at + UNDATED_ORDER_S
        return ticket.deadline

    def take(self, now: float, max_size: int, clock: PassClock) -> tuple[list[Ticket], list[Drop]]:
        """The next pass's tickets (most urgent first) and the tickets dropped while forming it."""
        batch: list[Ticket] = []
        drops: list[Drop] = []
        while True:
            while self._heap and len(batch) < max_size:
                ticket = heapq.heappop(self._heap)[2]
                if ticket.finished:  # answered already (its trigger failed)
                    continue
                if ticket.cancelled:
                    drops.append(Drop(ticket, CANCELLED, 0.0))
                elif self.deadline_aware and ticket.deadline is not None and ticket.deadline <= now:
                    drops.append(Drop(ticket, EXPIRED, now - ticket.deadline))
                else:
                    batch.append(ticket)
            if not self.deadline_aware or not batch:
                return batch, drops
            ends = now + clock.estimate(len(batch))
            late = [t for t in batch if t.deadline is not None and t.deadline < ends]
            if not late:
                return batch, drops
            # They would be computed for nothing; the pass shrinks, so refill it from the queue.
            drops.extend(Drop(t, UNMEETABLE, ends - t.deadline) for t in late)
            batch = [t for t in batch if t not in late]
            if not self._heap:
                return batch, drops
