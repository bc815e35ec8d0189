"""The inference stage: one thread runs forward passes; work that arrives while it is busy rides the next one.

`@serve.batch` forms a batch as soon as its wait timeout expires and only then
queues it for the device, so under load it hands over many small batches. This
stage merges every batch waiting for the device into one forward pass (up to
`max_batch_size` observations), so the batch size follows the load: one robot
gets an immediate pass of one, sixteen robots get passes of up to sixteen.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from serve_app.observation import Observation
from serve_app.responses import ChunkResult

logger = logging.getLogger("ray.serve")


@dataclass
class Queued:
    observation: Observation
    enqueued_at: float  # time.perf_counter() when it entered the batch queue


class CoalescingInference:
    def __init__(
        self,
        forward: Callable[[list[Observation]], np.ndarray],
        executor: Executor,
        max_batch_size: int,
        on_pass: Callable[[int, float, float], None] | None = None,
    ):
        """`on_pass(batch_size, inference_ms, longest_queue_ms)` runs on the event loop after each pass."""
        self._forward = forward
        self._on_pass = on_pass
        self._executor = executor
        self.max_batch_size = max_batch_size
        self._waiting: list[tuple[list[Queued], asyncio.Future]] = []
        self._draining = False

    async def submit(self, group: list[Queued]) -> list[ChunkResult]:
        """Results for `group`, in order, once a forward pass containing it has run."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((group, future))
        if not self._draining:
            self._draining = True
            asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                taken = self._take()
                queued = [q for group, _ in taken for q in group]
                try:
                    started, actions = await loop.run_in_executor(self._executor, self._timed_forward, queued)
                except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                inference_ms = (time.perf_counter() - started) * 1e3
                if self._on_pass is not None:
                    oldest = min(q.enqueued_at for q in queued)
                    try:
                        self._on_pass(len(queued), inference_ms, (started - oldest) * 1e3)
                    except Exception:  # noqa: BLE001 - a metrics fault must not strand the waiters
                        logger.exception("on_pass callback failed")
                i = 0
                for group, future in taken:
                    results = [
                        ChunkResult(
                            actions=actions[i + k],
                            inference_ms=inference_ms,
                            queue_ms=(started - q.enqueued_at) * 1e3,
                            batch_size=len(queued),
                        )
                        for k, q in enumerate(group)
                    ]
                    i += len(group)
                    if not future.done():
                        future.set_result(results)
        finally:
            self._draining = False

    def _take(self) -> list[tuple[list[Queued], asyncio.Future]]:
        """Whole groups, oldest first, up to max_batch_size observations (always at least one group)."""
        taken, size = [], 0
        while self._waiting and (not taken or size + len(self._waiting[0][0]) <= self.max_batch_size):
            group, future = self._waiting.pop(0)
            taken.append((group, future))
            size += len(group)
        return taken

    def _timed_forward(self, queued: list[Queued]) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        return started, self._forward([q.observation for q in queued])
