"""Start-up lines for the person watching `serve run`: what loaded, where robots connect."""

from __future__ import annotations

import logging
import os

from ray import serve

logger = logging.getLogger("ray.serve")


def announce(message: str) -> None:
    """Behind HAProxy, Serve sends a replica's log, print() and sys.stderr only to its (buffered) log
    file, so write to the process's real stderr as well, which Ray forwards to the driver's console."""
    logger.info(message, extra={"log_to_stderr": False})
    os.write(2, f"RobotPolicy replica {replica_id()}: {message}\n".encode())


def ready_line() -> str:
    """Where robots connect and how to see the dashboard.

    Named by the serve config's keys, not their values: Serve gives a replica no public way to read
    its gRPC options (the launcher logs its own port)."""
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        # Behind HAProxy the gRPC port binds http_options.host (Ray 2.60 has no gRPC host option).
        where, ingress = "http_options.host", "HAProxy ingress (throughput-optimised)"
    else:
        where, ingress = "every interface", "Serve's standard gRPC proxy"
    return (f"ready: robots connect to the serve config's grpc_options.port on {where} through {ingress}; "
            "Ray dashboard on the head node's port 8265 (it asks for a token: `ray get-auth-token` prints it)")


def in_replica() -> bool:
    return _replica_context() is not None


def replica_id() -> str:
    context = _replica_context()
    return context.replica_id.unique_id if context is not None else "local"


def _replica_context():
    try:
        return serve.get_replica_context()
    except Exception:  # noqa: BLE001 - constructed outside Serve (unit tests, benchmarks)
        return None
