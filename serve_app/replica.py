"""The Serve deployment: a thin gRPC adapter around the serving engine (serve_app/engine.py).

    request bytes -> refuse_unreadable -> auth -> the model it names -> deadline_of -> Engine.submit -> chunk_response

It owns what only a replica has: the API key gate, the gRPC status of a call,
Serve's health probes and autoscaling stats, and @serve.batch, the trigger that
starts the engine's forward passes. Unary calls and every open stream feed the
same engine, so robots on different connections share forward passes.

Several models (args.checkpoints, docs/fleet.md): one Engine per loaded model,
so a batch never mixes models, all on the replica's one device thread and one
@serve.batch trigger (SharedTrigger), so passes of different models take turns
on the device. A call names its model with metadata `multiplexed_model_id`
(none: the default); serve_app/loaded_models.py keeps up to
max_models_per_replica of them. A stream keeps the model version it opened
with for its whole life: no chunk of one stream comes from another version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import ray
import torch
from grpc_health.v1 import health_pb2
from ray import serve

from policy_wire import robot_inference_pb2 as pb
from serve_app.auth import ApiKeyGate
from serve_app.checkpoint import CheckpointError, open_checkpoint
from serve_app.deadlines import deadline_of
from serve_app.device import assigned_device, memory_gb
from serve_app.engine import BatchSettings, Engine, EngineExecutors, PassReport, RunPass, SerialTrigger, SharedTrigger
from serve_app.errors import RequestError
from serve_app.fleet_metadata import requested_model, robot_of
from serve_app.images import ImageLimits
from serve_app.load import LoadMeter
from serve_app.loaded_models import LoadedModel, LoadedModels
from serve_app.metrics import GAUGE_REFRESH_S, ROBOT_LABEL_LIMIT, ReplicaMetrics, RobotMetrics
from serve_app.model_table import model_table
from serve_app.policies import load_policy, verify_checkpoint
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
    """The engines' reports -> Ray metrics and the autoscaler's load meter (one meter: one device)."""

    def __init__(self, robot_label_limit: int = ROBOT_LABEL_LIMIT):
        self.metrics = ReplicaMetrics()
        self.robots = RobotMetrics(robot_label_limit)
        self.load = LoadMeter()

    def for_model(self, name: str) -> ModelReports:
        return ModelReports(self, name)


class ModelReports:
    """One model's engine -> the replica's reports, labelled with the model."""

    def __init__(self, reports: ReplicaReports, model: str):
        self._reports, self._model = reports, model

    def forward_pass(self, report: PassReport) -> None:
        self._reports.metrics.forward_pass(report, self._model)
        self._reports.load.forward_pass(report.size, report.inference_ms / 1e3)

    def dropped(self, reason: str, count: int) -> None:
        self._reports.metrics.dropped(reason, count, self._model)


@serve.deployment(name="RobotPolicy", max_ongoing_requests=256)
class RobotPolicyReplica:
    def __init__(
        self,
        checkpoint: str | None = None,
        pretrained_path: str | None = None,
        api_key_env: str | None = "INFERENCE_API_KEY",
        api_key_file: str | None = None,
        device: str = "auto",
        decode_threads: int = 2,
        inline_decode_max_pixels: int = 2 * 640 * 480,
        torch_threads: int | None = None,
        max_image_pixels: int = ImageLimits.max_pixels,
        preprocessing: str | None = None,
        checkpoints: dict[str, str] | None = None,
        default_model: str | None = None,
        max_models_per_replica: int = 3,
        robot_label_limit: int = ROBOT_LABEL_LIMIT,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self._auth = ApiKeyGate.from_sources(api_key_env, api_key_file)
        self._table = model_table(checkpoint, checkpoints, default_model)
        default = self._table.default
        # --policy.pretrained_path (the launcher) names the default checkpoint's weights only.
        ckpt = open_checkpoint(self._table.directory(default), pretrained_path)
        self._gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        self._device = assigned_device(self._gpu_ids, device)
        self._policy_type = ckpt.policy_type
        in_serve = in_replica()  # False for the class built directly (unit tests)
        self._who = ReplicaIdentity(checkpoint_id=ckpt.checkpoint_id(), replica_id=replica_id())
        self._reports = ReplicaReports(robot_label_limit)
        self._settings = BatchSettings()
        self._preprocessing = preprocessing
        self._limits = ImageLimits(max_pixels=max_image_pixels)
        self._inline_decode_max_pixels = inline_decode_max_pixels
        self._executors = EngineExecutors.own(decode_threads)  # shared by every model's engine
        self._trigger = SharedTrigger(ServeBatchTrigger if in_serve else SerialTrigger, self._settings)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-load")  # reads checkpoints off the loop
        started = time.perf_counter()
        self._engine = self._new_engine(default, load_policy(ckpt, self._device, preprocessing))
        self._warmed_up = False
        announce(f"checkpoint loaded: {self._policy_type} {self._who.checkpoint_id} ({ckpt.weights_path}) on "
                 f"{self._device}, gpu ids {self._gpu_ids}, {torch.get_num_threads()} torch threads")
        warm_started = time.perf_counter()
        self._engine.warm_up()
        self._warmed_up = True
        where = ready_line() if in_serve else "ready (outside Serve)"
        announce(f"warm-up forward passes done in {(time.perf_counter() - warm_started) * 1e3:.0f} ms; {where}")
        load_ms = (time.perf_counter() - started) * 1e3
        self._models = LoadedModels(
            LoadedModel(default, self._policy_type, self._engine, self._who, self._table.directory(default), load_ms),
            capacity=max_models_per_replica,
            load=self._load_model,
            directory_of=self._table.directory,
            check=self._check_model,
            on_change=self._model_changed,
        )
        self._reports.robots.model_event(default, "loaded", load_ms)
        self._check_ms: dict[str, float] = {}  # each model's last strict check, added to its cold start
        self._gauges: asyncio.Task | None = None
        if len(self._table.checkpoints) > 1:
            # The strict check's first run in a process builds the policy on torch's meta device,
            # which costs ~1.7 s once: pay it here, not in the first robot's call for another model.
            self._verify(self._table.directory(default))
            announce(f"models {', '.join(self._table.names)} (default {default!r}); up to "
                     f"{max_models_per_replica} loaded at once, others on first use")

    # --- operator knobs -------------------------------------------------

    def reconfigure(self, user_config: dict) -> None:
        settings = BatchSettings.from_user_config(user_config or {})
        self._settings = settings
        for name in self._models.names:
            self._models.cached(name).engine.configure(settings)
        logger.info("batch settings now %s", settings)

    # --- models -------------------------------------------------------------

    def _new_engine(self, name: str, policy) -> Engine:
        return Engine(
            policy,
            settings=self._settings,
            trigger=self._trigger.for_engine,
            listener=self._reports.for_model(name),
            limits=self._limits,
            inline_decode_max_pixels=self._inline_decode_max_pixels,
            executors=self._executors,
        )

    async def _model_for(self, grpc_context) -> LoadedModel:
        """The model a call names (NOT_FOUND: no such name), loaded (FAILED_PRECONDITION: it cannot be)."""
        return await self._models.get(self._table.resolve(requested_model(grpc_context)))

    async def _check_model(self, name: str) -> None:
        """The deploy's strict check again (names and shapes from the header; no tensors read), at run time."""
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(self._loader, self._verify, self._table.directory(name))
        except CheckpointError as err:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"model {name!r} cannot be loaded: {err}") from None
        finally:
            self._check_ms[name] = (time.perf_counter() - started) * 1e3  # part of the cold start a robot waits

    def _verify(self, directory: str) -> None:
        verify_checkpoint(open_checkpoint(directory), self._preprocessing)

    async def _load_model(self, name: str) -> LoadedModel:
        """Cold start of a model other than the default: read and check its files, then warm it up.

        The files are read on a loader thread (the event loop keeps serving the loaded models), the
        warm-up runs on the device thread between other models' passes. Every failure is the
        checkpoint's, told to the robot as FAILED_PRECONDITION; the other models are untouched."""
        loop = asyncio.get_running_loop()
        directory = self._table.directory(name)
        started = time.perf_counter()
        try:
            ckpt, policy, checkpoint_id = await loop.run_in_executor(self._loader, self._read_model, directory)
            engine = self._new_engine(name, policy)
            await loop.run_in_executor(self._executors.device, engine.warm_up)
        except CheckpointError as err:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"model {name!r} cannot be loaded: {err}") from None
        except (MemoryError, torch.cuda.OutOfMemoryError) as err:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {name!r} does not fit on {self._device}: {err}") from None
        except Exception as err:  # noqa: BLE001 - a broken checkpoint must not look like a server fault
            logger.exception("loading model %r from %s failed", name, directory)
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {name!r} cannot be loaded from {directory}: {type(err).__name__}: {err}") from None
        check_ms = self._check_ms.pop(name, 0.0)
        load_ms = (time.perf_counter() - started) * 1e3 + check_ms
        who = ReplicaIdentity(checkpoint_id, self._who.replica_id)
        model = LoadedModel(name, ckpt.policy_type, engine, who, directory, load_ms)
        announce(f"model {name!r} loaded in {load_ms:.0f} ms (cold start, {check_ms:.0f} ms of it the strict check): "
                 f"{ckpt.policy_type} {checkpoint_id} "
                 f"({ckpt.weights_path}) on {self._device}")
        self._reports.robots.model_event(name, "loaded", load_ms)
        return model

    def _read_model(self, directory: str):
        ckpt = open_checkpoint(directory)
        policy = load_policy(ckpt, self._device, self._preprocessing)  # strict: names, shapes, readable tensors
        return ckpt, policy, ckpt.checkpoint_id()

    def _model_changed(self, models: LoadedModels, event: str, name: str) -> None:
        if event == "replaced":
            model = models.cached(name)
            announce(f"model {name!r}: new version {model.who.checkpoint_id} serves new calls and streams; "
                     "open streams finish on the version they opened with")
            if name == self._table.default:
                self._engine = model.engine
        elif event == "evicted":
            announce(f"model {name!r} evicted (least recently used; {models.capacity} models per replica); "
                     f"loaded now: {', '.join(models.names)}")
            self._reports.robots.model_event(name, "evicted")
        elif event == "failed":
            logger.warning("model %r failed to load: %s", name, models.last_failure(name).message)
            self._reports.robots.model_event(name, "failed")

    # --- RobotPolicyService ------------------------------------------------

    async def GetActionChunk(self, request: pb.ObservationRequest, grpc_context=None) -> pb.ActionChunkResponse:
        received_at = time.perf_counter()
        self._keep_gauges_fresh()
        robot = self._reports.robots.label(robot_of(grpc_context))
        try:
            self._auth.check(grpc_context)
            model = await self._named_model(grpc_context, robot)
            return await self._answer(request, received_at, _time_remaining(grpc_context), model, robot)
        except RequestError as err:
            _set_status(grpc_context, err)
            return pb.ActionChunkResponse(request_id=getattr(request, "request_id", ""))

    async def StreamActionChunks(self, request_stream, grpc_context=None):
        robot = self._reports.robots.label(robot_of(grpc_context))
        self._keep_gauges_fresh()
        try:
            self._auth.check(grpc_context)
            # The model version for the stream's life: a new version reaches this robot at its next
            # stream (robot_client renews streams every stream_max_age_s), never mid-stream.
            model = await self._named_model(grpc_context, robot)
        except RequestError as err:
            # A stream that yields nothing never carries its context back to
            # the proxy; a status set before raising does survive the raise.
            _set_status(grpc_context, err)
            raise
        async for request in request_stream:
            self._models.touch(model)  # a model with streams open is in use, even with no new calls
            try:
                # A stream's gRPC deadline covers its whole life, not one message.
                yield await self._answer(request, time.perf_counter(), None, model, robot)
            except RequestError as err:
                # Answer this message in-band and keep the stream (and the robot) going.
                yield error_response(getattr(request, "request_id", ""), err, model.who)

    async def HealthCheck(self, request: pb.HealthCheckRequest, grpc_context=None) -> pb.HealthCheckResponse:
        """The replica and one model: the one named by metadata multiplexed_model_id (loaded now if it
        is not: a robot's wait for readiness pays its model's cold start), else the default."""
        try:
            self._auth.check(grpc_context)
            refuse_unreadable(request)
            model = await self._named_model(grpc_context, self._reports.robots.label(robot_of(grpc_context)))
        except RequestError as err:
            _set_status(grpc_context, err)
            return pb.HealthCheckResponse()
        used, total = memory_gb(self._device)
        warm = self._warmed_up  # a model other than the default is warmed up before it is listed
        return pb.HealthCheckResponse(
            healthy=warm,
            status="SERVING" if warm else "WARMING_UP",
            model_name=model.policy_type,
            device=self._device,
            gpu_memory_used_gb=used,
            gpu_memory_total_gb=total,
            policy_type=model.policy_type,
            checkpoint_id=model.who.checkpoint_id,
            replica_id=model.who.replica_id,
            warmed_up=warm,
            gpu_ids=self._gpu_ids,
            **model.engine.spec.health_fields(),
        )

    # --- grpc.health.v1 (standard probes; no API key: they carry no metadata) ---

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None) -> health_pb2.HealthCheckResponse:
        """The replica (service '' or the RobotPolicyService), or one model: service = its name, or
        metadata multiplexed_model_id. A probe never loads a model: one that is not loaded is SERVING
        unless its last load failed."""
        service = request.service
        name = requested_model(grpc_context) if service in ("", SERVICE_NAME) else service
        if not name:
            status = health_pb2.HealthCheckResponse.SERVING if self._warmed_up else health_pb2.HealthCheckResponse.NOT_SERVING
            return health_pb2.HealthCheckResponse(status=status)
        if name not in self._table.checkpoints:
            _set_status(grpc_context, RequestError(
                grpc.StatusCode.NOT_FOUND, f"unknown service {name!r}: neither {SERVICE_NAME!r} nor a model of this "
                f"app ({', '.join(self._table.names)})"))
            return health_pb2.HealthCheckResponse()
        failed = self._models.cached(name) is None and self._models.last_failure(name) is not None
        serving = self._warmed_up and not failed
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

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
        self._keep_gauges_fresh()  # Serve calls this every health_check_period_s, idle or not
        await self._engine.check()

    def _keep_gauges_fresh(self) -> None:
        if self._gauges is None or self._gauges.done():
            self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())

    async def _refresh_gauges(self) -> None:
        while True:
            self._reports.robots.models_held(self._models.names)
            await asyncio.sleep(GAUGE_REFRESH_S)

    # --- the hot path ----------------------------------------------------

    async def _named_model(self, grpc_context, robot: str) -> LoadedModel:
        try:
            return await self._model_for(grpc_context)
        except RequestError as err:
            asked = requested_model(grpc_context)  # an unknown name is not a label: robots choose them
            self._reports.robots.rejected(err.code, asked if asked in self._table.checkpoints else "", robot)
            raise

    async def _answer(self, request: pb.ObservationRequest, received_at: float, time_remaining_s,
                      model: LoadedModel, robot: str) -> pb.ActionChunkResponse:
        """One observation -> its chunk from `model`; every failure comes out as a RequestError."""
        try:
            refuse_unreadable(request)
            deadline = deadline_of(received_at, request.time_to_starvation_ms, time_remaining_s)
            result = await model.engine.submit(request, deadline)
        except RequestError as err:
            self._reports.robots.rejected(err.code, model.name, robot)
            raise
        except Exception:
            # A fault of ours, not the robot's: the traceback goes to the log,
            # the robot gets a status it can act on (retry, or hold).
            logger.exception("inference failed for request %r", request.request_id)
            self._reports.robots.rejected(grpc.StatusCode.INTERNAL, model.name, robot)
            raise RequestError(
                grpc.StatusCode.INTERNAL, f"inference failed on replica {self._who.replica_id}; see the server log"
            ) from None
        self._reports.robots.answered(model.name, robot, (time.perf_counter() - received_at) * 1e3, result.queue_ms)
        return chunk_response(request.request_id, result, model.who)


def _time_remaining(grpc_context) -> float | None:
    """The call's gRPC deadline, where the context exposes it. Serve's RayServegRPCContext (Ray 2.60) does
    not: there a unary call whose deadline passes is cancelled, and the engine drops it before its pass."""
    remaining = getattr(grpc_context, "time_remaining", None)
    return remaining() if callable(remaining) else None


def _set_status(grpc_context, err: RequestError) -> None:
    if grpc_context is not None:
        grpc_context.set_code(err.code)
        grpc_context.set_details(err.message)
