"""What can go wrong talking to the policy server, as errors a robot operator can act on.

Every gRPC failure is mapped here to one of a few classes. `transient` says
whether waiting and reconnecting can fix it (the server restarting, a network
gap, an overloaded server's refusal) or whether retrying would only repeat the
same refusal (a wrong key, an observation the model cannot take). One is
neither: ObservationDropped, the server's answer that one observation came too
late to be of use, after which the robot simply sends its next one.
"""

from __future__ import annotations

import re

import grpc


class PolicyError(RuntimeError):
    transient = False

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class ServerUnavailable(PolicyError):
    """No answer in time: the server is down, restarting or unreachable. Reconnect and retry."""

    transient = True


class ServerOverloaded(ServerUnavailable):
    """The server refused the call for lack of capacity (RESOURCE_EXHAUSTED: Serve's
    max_queued_requests back-pressure, a quota). The connection itself is fine: back off and retry
    on it. Reconnecting, or re-reading the spec, would only add load to a server already full.
    A ServerUnavailable, so that callers waiting out an unreachable server wait this out too."""


class InvalidChunk(PolicyError):
    """The server answered with a chunk that must not reach the motors (wrong shape, NaN)."""

    transient = True


class AuthenticationFailed(PolicyError):
    """The server refused the API key. Retrying with the same key cannot help."""


class TlsFailed(AuthenticationFailed):
    """The TLS handshake failed: a certificate or CA problem. Retrying with the same files cannot help."""


class ObservationRejected(PolicyError):
    """The server refused this observation (wrong state size, corrupt image ...). The robot is misconfigured."""


class ObservationDropped(PolicyError):
    """The server dropped this observation unanswered: it could not answer it before the robot's time
    to starvation. The connection is fine and nothing is misconfigured: not retried, not fatal; the
    robot keeps executing the actions it has and sends its next observation when it next asks."""


class ObservationUnencodable(PolicyError):
    """The robot's observation cannot be put on the wire (a camera frame of a shape or type no
    encoder takes, a state that is not numbers). The robot is misconfigured: every retry would fail."""


class ClientFault(PolicyError):
    """An unexpected exception inside the client itself, not an answer from the server. Retried with
    backoff (it may be passing: a library hiccup, memory), while the robot holds."""

    transient = True


class IncompatibleServer(PolicyError):
    """The server's model cannot serve this robot (dimensions, cameras) or speaks another protocol."""


_TLS_FAILURE = re.compile(r"handshake fail|ssl_error|certificate|tsi_", re.IGNORECASE)
# gRPC's own RESOURCE_EXHAUSTED for a message over a size limit ("Received message larger than max
# (N vs. M)" from the server, "Sent message larger than max" from our channel): not overload, the
# same observation is refused every time.
_TOO_LARGE = re.compile(r"message larger than max", re.IGNORECASE)

# Codes after which the same call would fail the same way: never retried.
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT: ObservationRejected,
    grpc.StatusCode.OUT_OF_RANGE: ObservationRejected,
    grpc.StatusCode.FAILED_PRECONDITION: ObservationRejected,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationFailed,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationFailed,
    grpc.StatusCode.UNIMPLEMENTED: IncompatibleServer,
}


def status_code(number: int) -> grpc.StatusCode:
    """gRPC status number (as carried in-band by ActionChunkResponse.error_code) -> StatusCode."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def policy_error(
    code: grpc.StatusCode,
    details: str,
    address: str,
    *,
    timeout_s: float | None = None,
    has_key: bool = False,
    from_server: bool = False,
) -> PolicyError:
    """One failed call -> the PolicyError that says what to do about it.

    `from_server`: the server itself answered with `code` (in-band in a stream, or a unary call that
    ended before its own deadline). DEADLINE_EXCEEDED is then its verdict on the observation (dropped,
    too late to be of use), not the call running out of time.
    """
    details = (details or "").strip() or "no details"
    name = code.name
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and from_server:
        return ObservationDropped(f"observation dropped by the server: {details} ({name} from {address})", code)
    if code == grpc.StatusCode.UNAVAILABLE and _TLS_FAILURE.search(details):
        # A handshake refused is configuration (a certificate missing, expired or from
        # another CA; TLS to a plaintext port), not a network gap: retrying cannot help.
        return TlsFailed(
            f"TLS with the policy server at {address} failed ({details}); check the certificate files: "
            "--tls-ca (the CA that signed the server's certificate) and, if the server requires client "
            "certificates, --tls-cert/--tls-key (this robot's certificate and key)",
            code,
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailable(
            f"cannot reach the policy server at {address} ({name}: {details}); "
            "check --server_address and that `serve run serve_config.yaml` is running there",
            code,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        waited = f" within {timeout_s:.2f} s" if timeout_s else ""
        return ServerUnavailable(f"the policy server at {address} did not answer{waited} ({name})", code)
    if code == grpc.StatusCode.NOT_FOUND:
        # Ray Serve's proxy answers NOT_FOUND while no application is deployed
        # (stopped, or being redeployed): the server is up, the policy is not.
        return ServerUnavailable(
            f"the server at {address} is up but serves no policy right now ({name}: {details}); "
            "waiting for the application to be deployed",
            code,
        )
    if code == grpc.StatusCode.UNAUTHENTICATED and "client certificate" in details:
        # The TLS proxy (deploy/tls) refuses a missing or foreign client certificate under mTLS.
        return TlsFailed(
            f"policy server at {address} requires this robot's client certificate ({details}); "
            "pass --tls-cert/--tls-key signed by the robot CA",
            code,
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        hint = (
            "the API key given was refused; check --api-key / INFERENCE_API_KEY against the server's key"
            if has_key
            else "the server requires an API key; pass --api-key or set INFERENCE_API_KEY"
        )
        return AuthenticationFailed(f"policy server at {address}: {hint} ({name}: {details})", code)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return IncompatibleServer(
            f"the server at {address} does not implement RobotPolicyService ({name}: {details}); "
            "is --server_address pointing at the policy server?",
            code,
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE.search(details):
        return ObservationRejected(
            f"the observation is larger than the policy server at {address} accepts ({name}: {details}); "
            "send fewer or smaller camera frames, or raise the server's message limit",
            code,
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Serve's answer when its queue is full: "Request dropped due to backpressure".
        return ServerOverloaded(
            f"the policy server at {address} is overloaded and refused the call ({name}: {details}); "
            "backing off on the same connection",
            code,
        )
    if code in _FATAL:
        return _FATAL[code](f"the policy server rejected the observation: {details} ({name})", code)
    # INTERNAL, UNKNOWN, CANCELLED, ABORTED: a replica died; Serve replaces
    # replicas, so waiting can help.
    return ServerUnavailable(f"the policy server at {address} failed the call ({name}: {details})", code)


def from_rpc_error(err: grpc.RpcError, address: str, **kw) -> PolicyError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return policy_error(code or grpc.StatusCode.UNKNOWN, details or "", address, **kw)
