"""Simulated robots: the payload a real robot sends, and the loops that send it.

Each robot is a coroutine on one grpc.aio channel. Payloads are encoded once
up front so the load generator spends its CPU on gRPC, not on JPEG encoding.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc

DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]  # an in-band drop: the server could not answer in time

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 100 * 1024 * 1024),
    ("grpc.max_receive_message_length", 100 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
]


def camera_jpeg(seed: int, size: int = 224, quality: int = 85) -> bytes:
    """A 224x224 camera frame with scene-like structure, JPEG-encoded."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([(x + seed * 7) % 256, (y * 2) % 256, np.full_like(x, 80)], -1).astype(np.uint8)
    for _ in range(6):
        cy, cx, r = rng.integers(0, size, 3)
        img[max(cy - r // 4, 0) : cy + r // 4, max(cx - r // 4, 0) : cx + r // 4] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def robot_payload(robot: int, state_dim: int = 14, cameras: int = 2) -> pb.ObservationRequest:
    rng = np.random.default_rng(robot)
    return pb.ObservationRequest(
        images=[pb.CameraImage(image_data=camera_jpeg(robot * 10 + c), encoding="jpeg") for c in range(cameras)],
        robot_state=pb.RobotState(state=rng.uniform(-1, 1, state_dim).astype(np.float32).tolist()),
        prompt="pick up the red cube and place it in the bin",
    )


@dataclass
class RobotLog:
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    replicas: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)
    missed_deadlines: int = 0
    deadlines: int = 0
    skipped_ticks: int = 0  # paced: ticks passed while the robot still waited for its chunk
    dropped: int = 0  # in-band DEADLINE_EXCEEDED: the server dropped the observation as too late
    queue_times_ms: list[float] = field(default_factory=list)

    def ok(self, latency_ms: float, response: pb.ActionChunkResponse) -> None:
        if response.error_code == DEADLINE_EXCEEDED:
            self.dropped += 1
            return
        if response.error_code:
            self.error(f"in-band {response.error_code}")
            return
        self.latencies_ms.append(latency_ms)
        self.batch_sizes.append(response.batch_size)
        self.queue_times_ms.append(response.queue_time_ms)
        self.replicas.add(response.replica_id)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


@dataclass(frozen=True)
class Scenario:
    robots: int
    mode: str  # "unary" | "stream"
    loop: str  # "closed" | "paced"
    seconds: float
    control_hz: float = 30.0
    ticks_per_chunk: int = 10  # paced: a chunk is needed every this many control ticks
    timeout_s: float = 5.0
    deadline_ms: float = 0.0  # sent as time_to_starvation_ms; 0: none
    phases: int = 10  # paced: robots start at this many evenly spaced points of the period

    @property
    def name(self) -> str:
        return f"{self.loop}-{self.mode}-{self.robots}"

    @property
    def period_s(self) -> float:
        return self.ticks_per_chunk / self.control_hz


async def _robot(address: str, robot: int, scenario: Scenario, t_end: float, log: RobotLog, metadata) -> None:
    request = robot_payload(robot)
    request.time_to_starvation_ms = scenario.deadline_ms
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        call = stub.StreamActionChunks(metadata=metadata) if scenario.mode == "stream" else None
        phase = (robot % scenario.phases) / scenario.phases
        next_send = time.perf_counter() + phase * scenario.period_s if scenario.loop == "paced" else 0.0
        try:
            while time.perf_counter() < t_end:
                if scenario.loop == "paced":
                    await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
                    log.deadlines += 1
                start = time.perf_counter()
                try:
                    if call is not None:
                        await call.write(request)
                        response = await asyncio.wait_for(call.read(), scenario.timeout_s)
                        if response is grpc.aio.EOF:  # the server closed the stream: next write says why
                            raise asyncio.InvalidStateError("stream closed")
                    else:
                        response = await stub.GetActionChunk(request, timeout=scenario.timeout_s, metadata=metadata)
                    latency = time.perf_counter() - start
                    log.ok(latency * 1e3, response)
                except (grpc.aio.AioRpcError, asyncio.TimeoutError, asyncio.InvalidStateError) as exc:
                    latency = time.perf_counter() - start
                    if isinstance(exc, grpc.aio.AioRpcError):
                        log.error(exc.code().name)
                    elif isinstance(exc, asyncio.InvalidStateError):  # the server ended the stream before this write
                        log.error(f"stream ended: {(await call.code()).name}")
                    else:
                        log.error("TIMEOUT")
                    if call is not None:
                        call.cancel()
                        call = stub.StreamActionChunks(metadata=metadata)
                if scenario.loop == "paced":
                    if latency > scenario.period_s:
                        log.missed_deadlines += 1
                    next_send += scenario.period_s
                    while next_send < time.perf_counter():  # a late chunk makes the next request late too
                        next_send += scenario.period_s
                        log.deadlines += 1
                        log.missed_deadlines += 1
                        log.skipped_ticks += 1
        finally:
            if call is not None:
                await call.done_writing()
                call.cancel()


async def play(address: str, scenario: Scenario, metadata=()) -> tuple[list[RobotLog], float]:
    """Run the scenario; return one log per robot and the measured wall time.

    `metadata`: sent by every robot, or a function of the robot's index (its own robot_id and model)."""
    logs = [RobotLog() for _ in range(scenario.robots)]
    metadata_of = metadata if callable(metadata) else (lambda robot: metadata)
    start = time.perf_counter()
    t_end = start + scenario.seconds
    await asyncio.gather(*(_robot(address, i, scenario, t_end, logs[i], metadata_of(i))
                           for i in range(scenario.robots)))
    return logs, time.perf_counter() - start


def summarize(logs: list[RobotLog], wall_s: float) -> dict:
    latencies = np.array([x for log in logs for x in log.latencies_ms])
    batches = np.array([x for log in logs for x in log.batch_sizes])
    errors: dict[str, int] = {}
    for log in logs:
        for k, v in log.errors.items():
            errors[k] = errors.get(k, 0) + v
    pct = (lambda q: round(float(np.percentile(latencies, q)), 3)) if latencies.size else (lambda q: None)
    deadlines = sum(log.deadlines for log in logs)
    return {
        "requests": int(latencies.size),
        "throughput_per_s": round(latencies.size / wall_s, 2),
        "latency_ms": {"p50": pct(50), "p99": pct(99), "p99.9": pct(99.9), "mean": round(float(latencies.mean()), 3) if latencies.size else None},
        "batch_size": {"mean": round(float(batches.mean()), 2), "max": int(batches.max())} if batches.size else None,
        "errors": errors,
        "replicas_answering": len(set().union(*(log.replicas for log in logs))),
        "deadlines": deadlines,
        "missed_deadlines": sum(log.missed_deadlines for log in logs),
        "skipped_ticks": sum(log.skipped_ticks for log in logs),
        "dropped": sum(log.dropped for log in logs),
    }
