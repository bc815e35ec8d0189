"""Exponential backoff with jitter between reconnect attempts.

Jitter matters with a fleet: robots that lost the same server at the same
moment must not all knock on it again at the same moment.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(
        self,
        initial_s: float = 0.05,
        max_s: float = 1.0,
        multiplier: float = 2.0,
        jitter: float = 0.2,
        rng=random.random,
    ):
        self.initial_s, self.max_s, self.multiplier, self.jitter = initial_s, max_s, multiplier, jitter
        self._rng = rng
        self.failures = 0

    def failure(self) -> float:
        """Count one failed attempt; return how long to wait before the next one."""
        base = min(self.max_s, self.initial_s * self.multiplier**self.failures)
        self.failures += 1
        return base * (1.0 + self.jitter * (2.0 * self._rng() - 1.0))

    def reset(self) -> None:
        self.failures = 0
