"""Watchdog: hold the robot when no fresh action has come by the deadline, resume when one does.

The deadline is the time of the last fresh action plus `timeout_s`. The loop
checks it every tick, so the hold comes at the first tick at or after the
deadline: within one control period of it. Before the first action the robot
has not been moved by the policy, so there is nothing to hold.
"""

from __future__ import annotations


class Watchdog:
    def __init__(self, timeout_s: float):
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.last_fresh: float | None = None
        self.holding = False

    @property
    def deadline(self) -> float | None:
        return None if self.last_fresh is None else self.last_fresh + self.timeout_s

    def feed(self, now: float) -> bool:
        """A fresh action ran at `now`. Returns True if this ends a hold."""
        self.last_fresh = now
        resumed, self.holding = self.holding, False
        return resumed

    def check(self, now: float) -> bool:
        """No fresh action this tick. Returns True exactly when the robot must start holding."""
        if self.holding or self.deadline is None or now < self.deadline:
            return False
        self.holding = True
        return True
