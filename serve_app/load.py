"""How loaded a replica is, as the autoscaler sees it: observations served and device time, per second.

A bidi stream is one ongoing request for its whole life, so Serve's default
policy scales on connected robots, not on the work they send. A replica
reports these instead (`record_autoscaling_stats`), and
serve_app.autoscaling sizes the deployment from them.
"""

from __future__ import annotations

import time
from typing import Callable

OBSERVATIONS_PER_S = "observations_per_s"  # observations through forward passes, per second of wall time
DEVICE_BUSY = "device_busy"  # fraction of wall time spent in forward passes (1.0: the device never idles)


class LoadMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._since = clock()
        self._observations = 0
        self._busy_s = 0.0

    def forward_pass(self, batch_size: int, inference_s: float) -> None:
        self._observations += batch_size
        self._busy_s += inference_s

    def sample(self) -> dict[str, float]:
        """Rates since the previous sample (Serve asks every few seconds), then start a new window."""
        now = self._clock()
        elapsed = max(now - self._since, 1e-9)
        out = {OBSERVATIONS_PER_S: self._observations / elapsed, DEVICE_BUSY: min(self._busy_s / elapsed, 1.0)}
        self._since, self._observations, self._busy_s = now, 0, 0.0
        return out
