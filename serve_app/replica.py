"""The Serve deployment: gRPC ingress and policy replica in one actor (no extra hop).

Data flows one way:
    request bytes -> parse_observation (on the event loop for robot-sized
    frames, else the decode pool) -> @serve.batch queue
    -> CoalescingInference: ObservationBatch.stack + policy.predict (inference thread)
    -> chunk_response

Unary calls and every open stream feed the same `@serve.batch` queue, so
robots on different connections share forward passes; batches that wait for
the device are merged into one pass (inference.py). Stacking and the forward
pass always run on the inference thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import ray
import torch
from grpc_health.v1 import health_pb2
from ray import serve

from policy_wire import robot_inference_pb2 as pb
from serve_app.auth import ApiKeyGate
from serve_app.checkpoint import open_checkpoint
from serve_app.device import assigned_device, memory_gb
from serve_app.errors import RequestError
from serve_app.images import ImageLimits
from serve_app.inference import CoalescingInference, Queued
from serve_app.load import LoadMeter
from serve_app.metrics import ReplicaMetrics
from serve_app.observation import Observation, ObservationBatch, decode_cost, parse_observation
from serve_app.policies import load_policy
from serve_app.responses import ChunkResult, ReplicaIdentity, chunk_response, error_response
from serve_app.wire_service import SERVICE_NAME, refuse_unreadable

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class BatchSettings:
    """The live-tunable part of the deployment (`user_config` in serve_config.yaml)."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.0

    @classmethod
    def from_user_config(cls, config: dict) -> "BatchSettings":
        unknown = set(config) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"user_config: unknown keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        settings = cls(**config)
        if settings.max_batch_size < 1 or settings.batch_wait_timeout_s < 0:
            raise ValueError(f"user_config: need max_batch_size >= 1 and batch_wait_timeout_s >= 0, got {settings}")
        return settings


@serve.deployment(name="RobotPolicy", max_ongoing_requests=256)
class RobotPolicyReplica:
    def __init__(
        self,
        checkpoint: str,
        pretrained_path: str | None = None,
        api_key_env: str | None = "INFERENCE_API_KEY",
        api_key_file: str | None = None,
        device: str = "auto",
        decode_threads: int = 2,
        inline_decode_max_pixels: int = 2 * 640 * 480,
        torch_threads: int | None = None,
        max_image_pixels: int = ImageLimits.max_pixels,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._auth = ApiKeyGate.from_sources(api_key_env, api_key_file)
        ckpt = open_checkpoint(checkpoint, pretrained_path)
        self._gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        self._device = assigned_device(self._gpu_ids, device)
        self._policy = load_policy(ckpt, self._device)
        self._spec = self._policy.spec
        self._policy_type = ckpt.policy_type
        self._limits = ImageLimits(max_pixels=max_image_pixels)
        self._who = ReplicaIdentity(checkpoint_id=ckpt.checkpoint_id(), replica_id=_replica_id())
        # Observations up to inline_decode_max_pixels decode on the event loop:
        # for robot-sized frames (two 224x224 JPEGs: ~0.3 ms) the hop to a pool
        # thread and back cost more than the decode, and 16 robots got 25% more
        # chunks/s without it. Larger frames go to the pool so that one robot's
        # 4K camera cannot stall every other robot on this replica.
        self._inline_decode_max_pixels = inline_decode_max_pixels
        self._decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        # One inference thread: forward passes never overlap on the device.
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._metrics = ReplicaMetrics()
        self._load = LoadMeter()
        self._inference = CoalescingInference(
            self._forward, self._infer_pool, BatchSettings.max_batch_size, on_pass=self._on_pass
        )
        self._warmed_up = False
        announce(f"checkpoint loaded: {self._policy_type} {self._who.checkpoint_id} ({ckpt.weights_path}) on "
                 f"{self._device}, gpu ids {self._gpu_ids}, {torch.get_num_threads()} torch threads")
        started = time.perf_counter()
        self._probe()
        self._warmed_up = True
        announce(f"warm-up forward pass done in {(time.perf_counter() - started) * 1e3:.0f} ms; {ready_line()}")

    # --- operator knobs -------------------------------------------------

    def reconfigure(self, user_config: dict) -> None:
        settings = BatchSettings.from_user_config(user_config or {})
        self._run_batch.set_max_batch_size(settings.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._inference.max_batch_size = settings.max_batch_size
        logger.info("batch settings now %s", settings)

    # --- RobotPolicyService ------------------------------------------------

    async def GetActionChunk(self, request: pb.ObservationRequest, grpc_context=None) -> pb.ActionChunkResponse:
        try:
            self._auth.check(grpc_context)
            return await self._answer(request)
        except RequestError as err:
            _set_status(grpc_context, err)
            return pb.ActionChunkResponse(request_id=getattr(request, "request_id", ""))

    async def StreamActionChunks(self, request_stream, grpc_context=None):
        try:
            self._auth.check(grpc_context)
        except RequestError as err:
            # A stream that yields nothing never carries its context back to
            # the proxy; a status set before raising does survive the raise.
            _set_status(grpc_context, err)
            raise
        async for request in request_stream:
            try:
                yield await self._answer(request)
            except RequestError as err:
                # Answer this message in-band and keep the stream (and the robot) going.
                yield error_response(getattr(request, "request_id", ""), err, self._who)

    async def HealthCheck(self, request: pb.HealthCheckRequest, grpc_context=None) -> pb.HealthCheckResponse:
        try:
            self._auth.check(grpc_context)
            refuse_unreadable(request)
        except RequestError as err:
            _set_status(grpc_context, err)
            return pb.HealthCheckResponse()
        used, total = memory_gb(self._device)
        spec = self._spec
        return pb.HealthCheckResponse(
            healthy=self._warmed_up,
            status="SERVING" if self._warmed_up else "WARMING_UP",
            model_name=self._policy_type,
            device=self._device,
            gpu_memory_used_gb=used,
            gpu_memory_total_gb=total,
            num_cameras=spec.num_cameras,
            min_cameras=spec.min_cameras,
            image_height=spec.image_height,
            image_width=spec.image_width,
            state_dim=spec.state_dim,
            action_dim=spec.action_dim,
            chunk_length=spec.chunk_length,
            max_delay=spec.max_delay,
            max_prompt_bytes=spec.max_prompt_bytes,
            policy_type=self._policy_type,
            checkpoint_id=self._who.checkpoint_id,
            replica_id=self._who.replica_id,
            warmed_up=self._warmed_up,
            gpu_ids=self._gpu_ids,
        )

    # --- grpc.health.v1 (standard probes; no API key: they carry no metadata) ---

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            _set_status(grpc_context, RequestError(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        status = health_pb2.HealthCheckResponse.SERVING if self._warmed_up else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    # --- Serve's autoscaler: the work robots send, not the streams they hold (serve_app.autoscaling) ---

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return self._load.sample()

    # --- HTTP: Serve's HTTP port is open beside the gRPC one; say where robots go instead of a 500 ---

    async def __call__(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(
            "This app serves robot_inference.RobotPolicyService over gRPC (the gRPC port in serve_config.yaml, "
            "50051 by default), not HTTP.\n", status_code=404,
        )

    # --- Ray's health probe: a real forward pass on the replica's device ---

    async def check_health(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._infer_pool, self._probe)

    # --- the hot path ----------------------------------------------------

    async def _answer(self, request: pb.ObservationRequest) -> pb.ActionChunkResponse:
        """One observation -> its chunk; every failure comes out as a RequestError."""
        loop = asyncio.get_running_loop()
        try:
            refuse_unreadable(request)
            if len(request.images) <= self._spec.num_cameras and decode_cost(request) <= self._inline_decode_max_pixels:
                observation = parse_observation(request, self._spec, self._limits)
            else:
                observation = await loop.run_in_executor(
                    self._decode_pool, parse_observation, request, self._spec, self._limits
                )
            result = await self._run_batch(Queued(observation, time.perf_counter()))
        except RequestError as err:
            self._metrics.rejected(err.code)
            raise
        except Exception:
            # A fault of ours, not the robot's: the traceback goes to the log,
            # the robot gets a status it can act on (retry, or hold).
            logger.exception("inference failed for request %r", request.request_id)
            self._metrics.rejected(grpc.StatusCode.INTERNAL)
            raise RequestError(
                grpc.StatusCode.INTERNAL, f"inference failed on replica {self._who.replica_id}; see the server log"
            ) from None
        return chunk_response(request.request_id, result, self._who)

    # max_concurrent_batches: Serve hands batches over as they form; the
    # inference stage merges those waiting for the device (see inference.py).
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0, max_concurrent_batches=16)
    async def _run_batch(self, queued: list[Queued]) -> list[ChunkResult]:
        return await self._inference.submit(queued)

    def _on_pass(self, batch_size: int, inference_ms: float, longest_queue_ms: float) -> None:
        self._metrics.forward_pass(batch_size, inference_ms, longest_queue_ms)
        self._load.forward_pass(batch_size, inference_ms / 1e3)

    def _forward(self, observations: list[Observation]) -> np.ndarray:
        return self._policy.predict(ObservationBatch.stack(observations))

    def _probe(self) -> None:
        """A forward pass on a blank observation; raises if the replica cannot compute."""
        spec = self._spec
        blank = Observation(
            images=np.zeros((spec.num_cameras, spec.image_height, spec.image_width, 3), np.uint8),
            camera_mask=np.ones(spec.num_cameras, bool),
            state=np.zeros(spec.state_dim, np.float32),
            prompt="",
            prefix=np.zeros((spec.chunk_length, spec.action_dim), np.float32),
            delay=0,
        )
        actions = self._policy.predict(ObservationBatch.stack([blank]))
        if actions.shape != (1, spec.chunk_length, spec.action_dim) or not np.isfinite(actions).all():
            raise RuntimeError(f"health probe: policy returned {actions.shape} with non-finite values")


def announce(message: str) -> None:
    """A start-up line for the person watching `serve run`. Behind HAProxy, Serve sends a replica's
    log, print() and sys.stderr only to its (buffered) log file, so write to the process's real
    stderr as well, which Ray forwards to the driver's console."""
    logger.info(message, extra={"log_to_stderr": False})
    os.write(2, f"RobotPolicy replica {_replica_id()}: {message}\n".encode())


def ready_line() -> str:
    """Where robots connect and how to see the dashboard, for the start-up log a person reads."""
    haproxy = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    ingress = "HAProxy ingress (throughput-optimised)" if haproxy else "Serve's standard gRPC proxy"
    try:
        controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        grpc_port = ray.get(controller.get_grpc_config.remote(), timeout=10).port
        # Behind HAProxy the gRPC port binds http_options.host; the standard proxy binds every interface.
        host = ray.get(controller.get_http_config.remote(), timeout=10).host if haproxy else "0.0.0.0"
        where = f"robots connect to {host}:{grpc_port}"
    except Exception:  # noqa: BLE001 - constructed outside Serve (unit tests, benchmarks)
        where = "outside Serve"
    return (f"ready: {where} through {ingress}; Ray dashboard on the head node's port 8265 "
            "(it asks for a token: `ray get-auth-token` prints it)")


def _set_status(grpc_context, err: RequestError) -> None:
    if grpc_context is not None:
        grpc_context.set_code(err.code)
        grpc_context.set_details(err.message)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # constructed outside Serve (unit tests, benchmarks)
        return "local"
