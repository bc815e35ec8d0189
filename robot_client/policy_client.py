"""PolicyClient: a thin wrapper over the generated RobotPolicyService stub.

What it adds to the bare stub, and nothing more:
- OpenTau's channel options (100 MB messages, keepalive every 10 s);
- `x-api-key` metadata and a deadline on every call, and the model and robot
  this client is (`multiplexed_model_id`, `robot_id`: several policies behind
  one server, docs/fleet.md);
- gRPC failures mapped to errors that say what to do (robot_client.errors);
- reconnect after a transient failure, paced by a Backoff, and a connection
  `epoch` that counts the gaps so callers can tell pre-gap answers apart; an
  overloaded server's refusal (RESOURCE_EXHAUSTED) is backed off on the same
  connection instead: no reconnect, no new epoch, no HealthCheck;
- the server's input spec (HealthCheck) and image encoding at that resolution;
- unary or bidirectional-stream calls behind the same `infer` (stream by
  default, see DEFAULT_MODE); a stream is replaced by a fresh one between
  requests once it is `stream_max_age_s` old (see STREAM_MAX_AGE_S).

One call at a time: the control loop has a single inference worker.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from robot_client.backoff import Backoff
from robot_client.chunk_stream import ChunkStream
from robot_client.errors import (
    IncompatibleServer,
    InvalidChunk,
    PolicyError,
    ServerOverloaded,
    ServerUnavailable,
    from_rpc_error,
    policy_error,
    status_code,
)
from robot_client.image_codec import DEFAULT_JPEG_QUALITY, encode_camera
from robot_client.robot import Observation
from robot_client.server_spec import ServerSpec

logger = logging.getLogger("robot_client")

API_KEY_METADATA = "x-api-key"
API_KEY_ENV = "INFERENCE_API_KEY"  # what OpenTau's server reads; our client reads it too
MODEL_METADATA = "multiplexed_model_id"  # which of the server's models (Ray Serve's own key); none: its default
ROBOT_METADATA = "robot_id"  # who is asking: labels the server's per-robot metrics
MAX_MESSAGE_BYTES = 100 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # gRPC's own reconnect backoff grows to two minutes by default; a robot
    # waiting for its server to come back should notice within a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # A reconnect after a gap must be a new connection. gRPC otherwise keeps a process-wide pool of
    # connections, and the fresh channel picks up the old one, still "ready" to gRPC when the server
    # vanished without a reset (power, network): every call on it times out until keepalive gives
    # up on it, 15 s later.
    ("grpc.use_local_subchannel_pool", 1),
)
MODES = ("unary", "stream")
# Robots at their control rate measured better on one stream each than on a call per chunk behind
# our server (README "Performance", 16 robots paced at 30 Hz: p99 23.0 ms against 50.0 ms behind
# the HAProxy ingress, no deadline missed either way; behind Serve's standard proxy 94.4 ms and 7
# missed deadlines against 143.0 ms and 41).
DEFAULT_MODE = "stream"


def channel_options(address: str) -> tuple:
    """CHANNEL_OPTIONS for `address`. A target listing several servers, gRPC's
    `ipv4:10.0.0.2:50051,10.0.0.3:50051` (pick_first: the first that connects; the next
    on a reconnect when it is gone), gets its first server as `:authority`: by default gRPC sends
    the whole list, which Serve's HAProxy ingress refuses (RST_STREAM, PROTOCOL_ERROR)."""
    scheme, _, servers = address.partition(":")
    if scheme in ("ipv4", "ipv6") and "," in servers:
        return (*CHANNEL_OPTIONS, ("grpc.default_authority", servers.split(",")[0]))
    return CHANNEL_OPTIONS


@dataclass(frozen=True)
class ActionChunk:
    actions: np.ndarray  # (chunk_length, action_dim) float32, robot units
    request_id: str
    inference_ms: float = 0.0
    queue_ms: float = 0.0
    batch_size: int = 0
    checkpoint_id: str = ""
    replica_id: str = ""

    @classmethod
    def from_response(cls, response: pb.ActionChunkResponse) -> ActionChunk:
        rows = [list(row.values) for row in response.action_chunk]
        if not rows or not rows[0]:
            raise InvalidChunk(f"request {response.request_id}: the server returned an empty action chunk")
        width = len(rows[0])
        if any(len(row) != width for row in rows):
            raise InvalidChunk(f"request {response.request_id}: action chunk rows have different lengths")
        actions = np.asarray(rows, dtype=np.float32)
        if not np.isfinite(actions).all():
            raise InvalidChunk(f"request {response.request_id}: action chunk contains NaN or infinity; not executed")
        return cls(
            actions=actions,
            request_id=response.request_id,
            inference_ms=response.inference_time_ms,
            queue_ms=response.queue_time_ms,
            batch_size=response.batch_size,
            checkpoint_id=response.checkpoint_id,
            replica_id=response.replica_id,
        )


# Behind Serve's HAProxy ingress every change to the replica set (a replica
# replaced, autoscaling, a redeploy) reloads HAProxy; the old HAProxy process
# keeps the streams it carries and cuts them all when Serve's hard-stop-after
# (120 s) fires. A stream opened after the reload, even on the same channel,
# goes to the new process. Renewing streams well inside that window means a
# reload never cuts one mid-run (benchmarks/chaos_soak.py measured the cuts).
STREAM_MAX_AGE_S = 60.0


class PolicyClient:
    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        mode: str = DEFAULT_MODE,
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
        backoff: Backoff | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        stream_max_age_s: float = STREAM_MAX_AGE_S,
        model: str | None = None,
        robot_id: str | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self._credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        self.address = address
        self.timeout_s = timeout_s
        self.mode = mode
        self.stream_max_age_s = stream_max_age_s
        self.jpeg_quality = jpeg_quality
        self.backoff = backoff or Backoff()
        self._api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        self.model, self.robot_id = model or None, robot_id or None
        # Sent on every call, HealthCheck and streams included: the server answers each with the
        # named model, so the spec read at HealthCheck is the one the chunks come from.
        self._metadata = tuple(
            (key, value)
            for key, value in ((API_KEY_METADATA, self._api_key), (MODEL_METADATA, self.model),
                               (ROBOT_METADATA, self.robot_id))
            if value
        )
        self._lock = threading.RLock()
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.RobotPolicyServiceStub | None = None
        self._stream: ChunkStream | None = None
        self._broken = False
        self._retry_at = 0.0
        self._session = uuid.uuid4().hex[:8]
        self._seq = itertools.count(1)
        self.spec = ServerSpec()
        # Bumped at every connection gap. A caller tags each request with the
        # epoch it was sent in; an answer from an older epoch predates a gap.
        self.epoch = 0

    # --- connection ------------------------------------------------------

    def _connect(self) -> pb_grpc.RobotPolicyServiceStub:
        with self._lock:
            if self._stub is None:
                options = channel_options(self.address)
                if self._credentials is not None:
                    self._channel = grpc.secure_channel(self.address, self._credentials, options=options)
                else:
                    self._channel = grpc.insecure_channel(self.address, options=options)
                self._stub = pb_grpc.RobotPolicyServiceStub(self._channel)
            return self._stub

    def _disconnect(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def close(self) -> None:
        self._disconnect()

    def _gap(self, error: PolicyError) -> PolicyError:
        """A transient failure: schedule the next attempt, and forget the connection and count the gap
        unless the server only said it is full (then the connection, the epoch and the answers in
        flight on it are all still good: reconnecting would only add load)."""
        if error.transient:
            if not isinstance(error, ServerOverloaded):
                self._disconnect()
                self._broken = True
                self.epoch += 1
            self._retry_at = time.monotonic() + self.backoff.failure()
        return error

    def retry_delay(self) -> float:
        """Seconds to wait before the next attempt is worth making (0 after a success)."""
        return max(0.0, self._retry_at - time.monotonic())

    # --- health and input spec ------------------------------------------

    def health(self, timeout_s: float | None = None) -> ServerSpec:
        """One HealthCheck; returns the advertised spec (raises PolicyError on failure)."""
        timeout = timeout_s or self.timeout_s
        try:
            reply = self._connect().HealthCheck(pb.HealthCheckRequest(), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise self._gap(self._error(err, timeout)) from None
        spec = ServerSpec.from_health(reply)
        if self.spec.advertised and spec.advertised and not self.spec.same_model(spec):
            raise IncompatibleServer(
                f"the server at {self.address} now serves a model with action dim {spec.action_dim}, chunk "
                f"length {spec.chunk_length}, max delay {spec.max_delay} (was {self.spec.action_dim}, "
                f"{self.spec.chunk_length}, {self.spec.max_delay}); restart the robot client"
            )
        if self.spec.checkpoint_id and spec.checkpoint_id and spec.checkpoint_id != self.spec.checkpoint_id:
            logger.warning("server checkpoint changed: %s -> %s", self.spec.checkpoint_id, spec.checkpoint_id)
        self.spec = spec
        return spec

    def wait_ready(self, timeout_s: float) -> ServerSpec:
        """Poll HealthCheck (with backoff) until the server is healthy and warm; raise after timeout_s."""
        deadline = time.monotonic() + timeout_s
        last: object = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            try:
                spec = self.health(timeout_s=max(0.05, min(self.timeout_s, remaining)))
                if spec.ready:
                    self._recovered()
                    return spec
                last = f"server says {spec.status or 'not healthy'}"
            except PolicyError as err:
                if not err.transient:
                    raise
                last = err
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(f"policy server at {self.address} not ready after {timeout_s:.1f} s: {last}")
            time.sleep(min(self.retry_delay() or self.backoff.failure(), remaining))

    def _recovered(self) -> None:
        if self._broken:
            logger.info("reconnected to %s (epoch %d): %s", self.address, self.epoch, self.spec.describe())
        self._broken = False
        self.backoff.reset()

    # --- requests ----------------------------------------------------------

    def next_request_id(self) -> str:
        return f"{self._session}-{self.epoch}-{next(self._seq)}"

    def build_request(
        self,
        observation: Observation,
        prompt: str,
        *,
        prefix: np.ndarray | None = None,
        delay: int = 0,
        request_id: str | None = None,
        time_to_starvation_ms: float = 0.0,
    ) -> pb.ObservationRequest:
        """Observation (robot units, frames) -> ObservationRequest, frames fitted to the advertised resolution.

        `time_to_starvation_ms`: how long from now an answer is still of use to the robot; the server
        drops the observation (DEADLINE_EXCEEDED) if it cannot answer within it. 0: not sent, as
        OpenTau's clients do; only the call's own deadline applies.
        """
        if time_to_starvation_ms < 0:
            raise ValueError(f"time to starvation must be >= 0 ms (0: not given), got {time_to_starvation_ms}")
        request = pb.ObservationRequest(
            images=[encode_camera(f, self.spec.image_hw, self.jpeg_quality) for f in observation.images],
            robot_state=pb.RobotState(state=np.asarray(observation.state, np.float32).ravel().tolist()),
            prompt=prompt,
            timestamp_ns=time.time_ns(),
            request_id=request_id or self.next_request_id(),
            time_to_starvation_ms=time_to_starvation_ms,
        )
        if prefix is not None and len(prefix):
            request.prefix_action.extend(pb.ActionVector(values=row) for row in np.asarray(prefix, np.float32).tolist())
            request.delay = int(delay)
        return request

    def infer(self, request: pb.ObservationRequest, timeout_s: float | None = None) -> ActionChunk:
        """One attempt: send the observation, return its chunk. Transient failures bump `epoch`."""
        timeout = timeout_s or self.timeout_s
        if self._broken:
            # Reconnecting: re-read the spec first, a redeployed server may serve another model.
            self.health(timeout_s=timeout)
            self._recovered()
        started = time.monotonic()
        try:
            if self.mode == "stream":
                response = self._exchange_on_stream(request, timeout)
            else:
                response = self._connect().GetActionChunk(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as err:
            verdict = self._answered_early(err, started, timeout)
            raise self._gap(self._error(err, timeout, from_server=verdict)) from None
        if response.error_code:
            # In-band error (streams): this message was refused, the stream goes on. A refusal for
            # lack of capacity paces the next attempt all the same.
            error = policy_error(
                status_code(response.error_code),
                response.error_message,
                self.address,
                has_key=bool(self._api_key),
                from_server=True,
            )
            if isinstance(error, ServerOverloaded):
                self._gap(error)
            raise error
        try:
            chunk = ActionChunk.from_response(response)
        except InvalidChunk as err:
            raise self._gap(err) from None
        # Refusals back off only while they come one after another.
        self.backoff.reset()
        self._retry_at = 0.0
        return chunk

    def get_action_chunk(
        self, observation: Observation, prompt: str, *, prefix=None, delay: int = 0, attempts: int = 1
    ) -> ActionChunk:
        """Convenience for scripts: build, send, and retry transient failures up to `attempts` times."""
        for attempt in range(1, attempts + 1):
            try:
                return self.infer(self.build_request(observation, prompt, prefix=prefix, delay=delay))
            except PolicyError as err:
                if not err.transient or attempt == attempts:
                    raise
                logger.warning("attempt %d/%d failed: %s", attempt, attempts, err)
                time.sleep(self.retry_delay())
        raise AssertionError("unreachable")

    def _exchange_on_stream(self, request: pb.ObservationRequest, timeout: float) -> pb.ActionChunkResponse:
        with self._lock:
            if self._stream is not None and self._stream.age_s() > self.stream_max_age_s:
                self._stream.finish()  # between requests: nothing is waiting on it
                self._stream = None
            if self._stream is None:
                self._stream = ChunkStream(self._connect(), self._metadata)
            stream = self._stream
        try:
            return stream.exchange(request, timeout)
        except grpc.RpcError:
            with self._lock:
                if self._stream is stream:
                    self._stream = None  # a failed stream is dead; the next call opens a new one
            raise

    def _answered_early(self, err: grpc.RpcError, started: float, timeout: float) -> bool:
        """Whether a failed unary call's status is the server's answer rather than our deadline running
        out: it came before the deadline, and not in gRPC's words for its own deadline. A stream's
        status ends the whole stream and is never one observation's verdict (those come in-band)."""
        details = err.details() if hasattr(err, "details") else ""
        return (
            self.mode == "unary"
            and time.monotonic() - started < timeout
            and (details or "").strip().lower() != "deadline exceeded"
        )

    def _error(self, err, timeout: float, from_server: bool = False) -> PolicyError:
        return from_rpc_error(
            err, self.address, timeout_s=timeout, has_key=bool(self._api_key), from_server=from_server
        )


def tls_credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS to a server behind a TLS terminator (Serve's proxy has none): CA, plus this robot's cert for mTLS."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("TLS: give both --tls-cert and --tls-key (this robot's certificate and its key), or neither")

    def read(path: str | None, what: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).expanduser().read_bytes()
        except OSError as err:
            raise ValueError(f"TLS: cannot read the {what} {path}: {err.strerror}") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "CA certificate (--tls-ca)"),
        private_key=read(key, "private key (--tls-key)"),
        certificate_chain=read(cert, "certificate (--tls-cert)"),
    )
