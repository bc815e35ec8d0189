"""InferenceWorker: encodes and sends one observation at a time on its own thread.

The control tick only submits and polls, so the network (a slow answer, a
reconnect, a backoff wait) never delays the robot's next action.

Whatever goes wrong in a job comes back to the loop as a result with a
PolicyError, and the worker is free again after it: an exception that killed
this thread would leave the loop waiting on it forever, the robot held with no
error said. An observation that cannot be encoded is the robot's configuration
(ObservationUnencodable: the loop stops); any other unexpected exception is a
ClientFault, logged with its traceback and retried with backoff.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from robot_client.backoff import Backoff
from robot_client.chunk_executor import ChunkRequest
from robot_client.errors import ClientFault, ObservationUnencodable, PolicyError
from robot_client.policy_client import ActionChunk, PolicyClient
from robot_client.robot import Observation

logger = logging.getLogger("robot_client")

# 0 on the wire means "not given" (no deadline), so a budget already spent when the message is
# built (a late tick, slow encoding) goes out as this: too little for any server, which drops it.
SPENT_BUDGET_MS = 1e-3


def time_to_starvation_ms(starves_at: float | None, now: float, wait_s: float) -> float:
    """How long from `now` (the moment of sending) an answer is still of use, for the wire.

    `starves_at`: clock time the robot runs out of actions to execute. None: nothing is executing
    (before the first chunk, or after the plan ran dry), so the robot loses nothing more by waiting
    and the budget is the wait itself. Either way an answer later than `wait_s` (the call's deadline)
    is never read, so that bounds it too. Sending it rather than 0 tells the server exactly when
    to stop spending work on this observation, and that a robot still moving is more urgent.
    """
    budget_s = wait_s if starves_at is None else min(wait_s, starves_at - now)
    return max(budget_s * 1e3, SPENT_BUDGET_MS)


@dataclass(frozen=True)
class InferenceResult:
    request: ChunkRequest
    chunk: ActionChunk | None
    error: PolicyError | None
    received_at: float


class InferenceWorker:
    """One job at a time: submit() when not busy, poll() for results; close() ends the thread."""

    def __init__(
        self, client: PolicyClient, prompt: str, timeout_s: float, clock=time.monotonic, backoff: Backoff | None = None
    ):
        self.client, self.prompt, self.timeout_s, self.clock = client, prompt, timeout_s, clock
        # Paces retries after a fault of our own; the client paces those the server caused.
        self.backoff = backoff or Backoff()
        self._faults_logged: set[tuple[str, str]] = set()  # since the last success
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

    def submit(
        self, request: ChunkRequest, observation: Observation, prefix, delay: int, starves_at: float | None = None
    ) -> None:
        """Queue one observation; `starves_at`: clock time the robot runs out of actions (None: not executing)."""
        self._busy = True
        self._jobs.put((request, observation, prefix, delay, starves_at))

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
            try:
                result = self._attempt(*job)
                self._results.put(result)
                error = result.error
                if error is not None and error.transient:
                    # Pace retries; the loop's next observation is taken after the wait, so it is fresh.
                    own = isinstance(error, ClientFault)
                    self._stop.wait(self.backoff.failure() if own else self.client.retry_delay())
            finally:
                self._busy = False

    def _attempt(self, request: ChunkRequest, observation: Observation, prefix, delay, starves_at) -> InferenceResult:
        try:
            try:
                # The budget is read as the message is built: encoding its frames (a few ms) counts
                # as part of sending, as the network time does.
                message = self.client.build_request(
                    observation,
                    self.prompt,
                    prefix=prefix,
                    delay=delay,
                    request_id=request.request_id,
                    time_to_starvation_ms=time_to_starvation_ms(starves_at, self.clock(), self.timeout_s),
                )
            except (ValueError, TypeError) as err:  # a frame or state no encoder takes
                raise ObservationUnencodable(
                    f"cannot encode the robot's observation: {err}; check its cameras and state "
                    "(--num_cameras, the ROS config)"
                ) from err
            chunk = self.client.infer(message, self.timeout_s)
        except PolicyError as err:
            return InferenceResult(request, None, err, self.clock())
        except Exception as err:  # noqa: BLE001 - whatever it is, the loop must hear of it
            return InferenceResult(request, None, self._fault(err), self.clock())
        self._faults_logged.clear()
        self.backoff.reset()
        return InferenceResult(request, chunk, None, self.clock())

    def _fault(self, err: Exception) -> ClientFault:
        """An exception no PolicyError describes: logged with its traceback, once while it repeats."""
        name = type(err).__name__
        if (name, str(err)) not in self._faults_logged:
            self._faults_logged.add((name, str(err)))
            logger.error("inference worker: unexpected %s: %s; retrying with backoff", name, err, exc_info=err)
        return ClientFault(f"unexpected {name} in the robot client: {err}")
