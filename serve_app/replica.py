"""The Serve deployment: a thin gRPC adapter around the serving engine (serve_app/engine.py).

    request bytes -> refuse_unreadable -> auth -> deadline_of -> Engine.submit -> chunk_response

It owns what only a replica has: the API key gate, the gRPC status of a call,
Serve's health probes and autoscaling stats, and @serve.batch, the trigger that
starts the engine's forward passes. Unary calls and every open stream feed the
same engine, so robots on different connections share forward passes.
"""

from __future__ import annotations

import logging
import time

import grpc
import ray
import torch
from grpc_health.v1 import health_pb2
from ray import serve

from policy_wire import robot_inference_pb2 as pb
from serve_app.auth import ApiKeyGate
from serve_app.checkpoint import open_checkpoint
from serve_app.deadlines import deadline_of
from serve_app.device import assigned_device, memory_gb
from serve_app.engine import BatchSettings, Engine, PassReport, RunPass, SerialTrigger
from serve_app.errors import RequestError
from serve_app.images import ImageLimits
from serve_app.load import LoadMeter
from serve_app.metrics import ReplicaMetrics
from serve_app.policies import load_policy
from serve_app.responses import ReplicaIdentity, chunk_response, error_response
from serve_app.startup_log import announce, in_replica, ready_line, replica_id
from serve_app.wire_service import SERVICE_NAME, refuse_unreadable

logger = logging.getLogger("ray.serve")


class ServeBatchTrigger:
    """@serve.batch starts the engine's passes, one at a time (max_concurrent_batches=1)."""

    def __init__(self, run_pass: RunPass, settings: BatchSettings):
        self._batched = serve.batch(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=settings.batch_wait_timeout_s,
            max_concurrent_batches=1,
        )(run_pass)

    def __call__(self, ticket):
        return self._batched(ticket)

    def configure(self, settings: BatchSettings) -> None:
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)


class ReplicaReports:
    """The engine's reports -> Ray metrics and the autoscaler's load meter."""

    def __init__(self):
        self.metrics = ReplicaMetrics()
        self.load = LoadMeter()

    def forward_pass(self, report: PassReport) -> None:
        self.metrics.forward_pass(report)
        self.load.forward_pass(report.size, report.inference_ms / 1e3)

    def dropped(self, reason: str, count: int) -> None:
        self.metrics.dropped(reason, count)


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
        preprocessing: str | None = None,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._auth = ApiKeyGate.from_sources(api_key_env, api_key_file)
        ckpt = open_checkpoint(checkpoint, pretrained_path)
        self._gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        self._device = assigned_device(self._gpu_ids, device)
        self._policy_type = ckpt.policy_type
        in_serve = in_replica()  # False for the class built directly (unit tests)
        self._who = ReplicaIdentity(checkpoint_id=ckpt.checkpoint_id(), replica_id=replica_id())
        self._reports = ReplicaReports()
        self._engine = Engine(
            load_policy(ckpt, self._device, preprocessing),
            trigger=ServeBatchTrigger if in_serve else SerialTrigger,
            listener=self._reports,
            limits=ImageLimits(max_pixels=max_image_pixels),
            decode_threads=decode_threads,
            inline_decode_max_pixels=inline_decode_max_pixels,
        )
        self._warmed_up = False
        announce(f"checkpoint loaded: {self._policy_type} {self._who.checkpoint_id} ({ckpt.weights_path}) on "
                 f"{self._device}, gpu ids {self._gpu_ids}, {torch.get_num_threads()} torch threads")
        started = time.perf_counter()
        self._engine.warm_up()
        self._warmed_up = True
        where = ready_line() if in_serve else "ready (outside Serve)"
        announce(f"warm-up forward passes done in {(time.perf_counter() - started) * 1e3:.0f} ms; {where}")

    # --- operator knobs -------------------------------------------------

    def reconfigure(self, user_config: dict) -> None:
        settings = BatchSettings.from_user_config(user_config or {})
        self._engine.configure(settings)
        logger.info("batch settings now %s", settings)

    # --- RobotPolicyService ------------------------------------------------

    async def GetActionChunk(self, request: pb.ObservationRequest, grpc_context=None) -> pb.ActionChunkResponse:
        received_at = time.perf_counter()
        try:
            self._auth.check(grpc_context)
            return await self._answer(request, received_at, _time_remaining(grpc_context))
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
                # A stream's gRPC deadline covers its whole life, not one message.
                yield await self._answer(request, time.perf_counter(), None)
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
        return pb.HealthCheckResponse(
            healthy=self._warmed_up,
            status="SERVING" if self._warmed_up else "WARMING_UP",
            model_name=self._policy_type,
            device=self._device,
            gpu_memory_used_gb=used,
            gpu_memory_total_gb=total,
            policy_type=self._policy_type,
            checkpoint_id=self._who.checkpoint_id,
            replica_id=self._who.replica_id,
            warmed_up=self._warmed_up,
            gpu_ids=self._gpu_ids,
            **self._engine.spec.health_fields(),
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
        return self._reports.load.sample()

    # --- HTTP: Serve's HTTP port is open beside the gRPC one; say where robots go instead of a 500 ---

    async def __call__(self, request):
        from starlette.responses import PlainTextResponse

        return PlainTextResponse(
            "This app serves robot_inference.RobotPolicyService over gRPC (the gRPC port in serve_config.yaml, "
            "50051 by default), not HTTP.\n", status_code=404,
        )

    # --- Ray's health probe: a real forward pass on the replica's device ---

    async def check_health(self) -> None:
        await self._engine.check()

    # --- the hot path ----------------------------------------------------

    async def _answer(self, request: pb.ObservationRequest, received_at: float, time_remaining_s) -> pb.ActionChunkResponse:
        """One observation -> its chunk; every failure comes out as a RequestError."""
        try:
            refuse_unreadable(request)
            deadline = deadline_of(received_at, request.time_to_starvation_ms, time_remaining_s)
            result = await self._engine.submit(request, deadline)
        except RequestError as err:
            self._reports.metrics.rejected(err.code)
            raise
        except Exception:
            # A fault of ours, not the robot's: the traceback goes to the log,
            # the robot gets a status it can act on (retry, or hold).
            logger.exception("inference failed for request %r", request.request_id)
            self._reports.metrics.rejected(grpc.StatusCode.INTERNAL)
            raise RequestError(
                grpc.StatusCode.INTERNAL, f"inference failed on replica {self._who.replica_id}; see the server log"
            ) from None
        return chunk_response(request.request_id, result, self._who)


def _time_remaining(grpc_context) -> float | None:
    """The call's gRPC deadline, where the context exposes it. Serve's RayServegRPCContext (Ray 2.60) does
    not: there a unary call whose deadline passes is cancelled, and the engine drops it before its pass."""
    remaining = getattr(grpc_context, "time_remaining", None)
    return remaining() if callable(remaining) else None


def _set_status(grpc_context, err: RequestError) -> None:
    if grpc_context is not None:
        grpc_context.set_code(err.code)
        grpc_context.set_details(err.message)
