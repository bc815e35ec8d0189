"""InferenceWorker: encodes and sends one observation at a time on its own thread.

The control tick only submits and polls, so the network (a slow answer, a
reconnect, a backoff wait) never delays the robot's next action.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from robot_client.chunk_executor import ChunkRequest
from robot_client.errors import PolicyError
from robot_client.policy_client import ActionChunk, PolicyClient
from robot_client.robot import Observation


@dataclass(frozen=True)
class InferenceResult:
    request: ChunkRequest
    chunk: ActionChunk | None
    error: PolicyError | None
    received_at: float


class InferenceWorker:
    """One job at a time: submit() when not busy, poll() for results; close() ends the thread."""

    def __init__(self, client: PolicyClient, prompt: str, timeout_s: float, clock=time.monotonic):
        self.client, self.prompt, self.timeout_s, self.clock = client, prompt, timeout_s, clock
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    @property
    def busy(self) -> bool:
        return self._busy

    def next_request_id(self) -> str:
        return self.client.next_request_id()

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: ChunkRequest, observation: Observation, prefix, delay: int) -> None:
        self._busy = True
        self._jobs.put((request, observation, prefix, delay))

    def poll(self) -> list[InferenceResult]:
        results = []
        while True:
            try:
                results.append(self._results.get_nowait())
            except queue.Empty:
                return results

    def close(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=self.timeout_s + 1.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                return
            request, observation, prefix, delay = job
            try:
                message = self.client.build_request(
                    observation, self.prompt, prefix=prefix, delay=delay, request_id=request.request_id
                )
                result = InferenceResult(request, self.client.infer(message, self.timeout_s), None, self.clock())
            except PolicyError as err:
                result = InferenceResult(request, None, err, self.clock())
            except (ValueError, TypeError) as err:  # a frame or state we cannot even encode
                result = InferenceResult(
                    request, None, PolicyError(f"cannot encode the observation: {err}"), self.clock()
                )
            self._results.put(result)
            if result.error is not None and result.error.transient:
                # Pace reconnects; the loop's next observation is taken after the wait, so it is fresh.
                self._stop.wait(self.client.retry_delay())
            self._busy = False
