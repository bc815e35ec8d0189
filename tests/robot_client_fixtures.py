"""Test doubles for robot_client: a fake clock, and a scripted stand-in for the inference worker.

The scripted worker answers like a real-time-chunking server (the first
`delay` rows repeat the prefix) after a latency measured on the fake clock,
and can be told the server is down for a while, or to answer a given request
with an error (a refusal, a server drop). Each answer's rows say where they
came from: row i of the n-th answer is [n, i, n + i/100, ...]. Each request
records the time to starvation the real worker would have sent with it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from policy_wire import robot_inference_pb2 as pb
from robot_client.errors import PolicyError, ServerUnavailable
from robot_client.inference_worker import InferenceResult, time_to_starvation_ms
from robot_client.policy_client import ActionChunk
from robot_client.replay_robot import ReplayRobot, synthetic_recording
from robot_client.server_spec import ServerSpec


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


def demo_spec(action_dim: int = 4, chunk_length: int = 16, max_delay: int = 16) -> ServerSpec:
    return ServerSpec(
        healthy=True,
        warmed_up=True,
        model_name="scripted",
        num_cameras=2,
        min_cameras=1,
        image_height=24,
        image_width=32,
        state_dim=32,
        action_dim=action_dim,
        chunk_length=chunk_length,
        max_delay=max_delay,
        max_prompt_bytes=2048,
    )


def health_reply(model_name: str, chunk_length: int = 8) -> pb.HealthCheckResponse:
    """What an in-test RobotPolicyService answers to HealthCheck: a warm 2-camera 96x96 model."""
    return pb.HealthCheckResponse(
        healthy=True,
        warmed_up=True,
        status="SERVING",
        model_name=model_name,
        num_cameras=2,
        min_cameras=1,
        image_height=96,
        image_width=96,
        state_dim=32,
        action_dim=4,
        chunk_length=chunk_length,
        max_delay=8,
    )


def run_in_thread(loop):
    """Run a ControlLoop until the returned event is set; its stats or its error land in `outcome`."""
    stop, outcome = threading.Event(), {}

    def run():
        try:
            outcome["stats"] = loop.run(stop=stop)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            outcome["error"] = err

    thread = threading.Thread(target=run, name="control-loop", daemon=True)
    thread.start()
    return stop, thread, outcome


def small_robot(clock) -> ReplayRobot:
    return ReplayRobot(synthetic_recording(frames=8, height=24, width=32, state_dim=6), clock=clock)


def scripted_chunk(n: int, length: int, dim: int) -> np.ndarray:
    rows = np.arange(length, dtype=np.float32)
    out = np.zeros((length, dim), np.float32)
    out[:, 0] = n
    out[:, 1] = rows
    out[:, 2:] = (n + rows / 100)[:, None]
    return out


@dataclass
class Sent:
    at: float
    request: object
    prefix: np.ndarray | None
    delay: int
    observation: object = None
    time_to_starvation_ms: float = 0.0  # what the real worker would put on the wire, sent at `at`


@dataclass
class ScriptedWorker:
    clock: FakeClock
    latency_s: float = 0.04
    chunk_length: int = 16
    action_dim: int = 4
    fail_after_s: float = 0.001  # a refused connection fails fast
    backoff_s: float = 0.1
    timeout_s: float = 0.5  # the call's deadline: bounds the time to starvation sent
    outages: list[tuple[float, float]] = field(default_factory=list)  # [start, end) the server is down
    slow: dict[int, float] = field(default_factory=dict)  # request number -> its latency instead
    errors: dict[int, PolicyError] = field(default_factory=dict)  # request number -> error to answer with
    sent: list[Sent] = field(default_factory=list)
    answers: dict[str, np.ndarray] = field(default_factory=dict)
    _pending: list = field(default_factory=list)
    _busy_until: float = -1.0

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self.clock() < self._busy_until

    def down(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.outages)

    def next_request_id(self) -> str:
        return f"r{len(self.sent) + 1}"

    def submit(self, request, observation, prefix, delay, starves_at=None) -> None:
        now = self.clock()
        n = len(self.sent) + 1
        budget = time_to_starvation_ms(starves_at, now, self.timeout_s)
        self.sent.append(Sent(now, request, prefix, delay, observation, budget))
        if n in self.errors:
            self._pending.append((now + self.fail_after_s, request, self.errors[n]))
        elif self.down(now):
            self._pending.append((now + self.fail_after_s, request, ServerUnavailable("scripted outage")))
        else:
            actions = scripted_chunk(n, self.chunk_length, self.action_dim)
            if prefix is not None and delay:
                actions[:delay] = prefix[:delay]
            self._pending.append((now + self.slow.get(n, self.latency_s), request, actions))

    def poll(self) -> list[InferenceResult]:
        now, out, keep = self.clock(), [], []
        for due, request, payload in self._pending:
            if due > now:
                keep.append((due, request, payload))
            elif isinstance(payload, PolicyError):
                out.append(InferenceResult(request, None, payload, due))
                self._busy_until = due + (self.backoff_s if payload.transient else 0.0)
            else:
                self.answers[request.request_id] = payload
                out.append(InferenceResult(request, ActionChunk(payload, request.request_id), None, due))
        self._pending = keep
        return out
