"""Which gRPC ingress a Ray cluster started from this process gets.

Serve reads these variables in its own processes when they import it, so they
must be in the environment the cluster starts with: `serve run`, `ray start`,
or a `ray.init()` that starts a local cluster. serve_config.yaml cannot carry
them. Import-light on purpose: set them before anything starts Ray.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# Serve's throughput-optimised ingress: HAProxy in front of each replica's own
# gRPC server (no Serve proxy actor in the request path). benchmarks/ measured
# it at 2-3x the chunks per second of Serve's standard gRPC proxy.
THROUGHPUT_MODE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def choose_ingress(standard_proxy: bool = False, environ: MutableMapping[str, str] = os.environ) -> None:
    """Set (default) or clear the throughput-optimised ingress for a cluster started after this call."""
    if standard_proxy:
        for name in THROUGHPUT_MODE_ENV:
            environ.pop(name, None)
    else:
        environ.update(THROUGHPUT_MODE_ENV)


# Ports Serve binds on every machine that runs a cluster in throughput mode, the
# same numbers for every cluster unless moved (Serve's defaults, Ray 2.60):
# HAProxy's stats page and Prometheus endpoint, and the fallback Serve proxy
# HAProxy routes to when it sees no healthy replica.
SHARED_PORT_ENV = (
    "RAY_SERVE_HAPROXY_STATS_PORT",  # 8404
    "RAY_SERVE_HAPROXY_METRICS_PORT",  # 9101
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",  # 9500
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",  # 8500
)


def private_ports_env() -> dict[str, str]:
    """Free ports for a cluster that shares its machine with other clusters (tests, benchmarks).

    Two clusters on one machine collide on SHARED_PORT_ENV's ports. HAProxy's
    clash is loud (the second cluster fails to start). The fallback proxy's is
    silent and dangerous: Serve binds it with SO_REUSEPORT, so the kernel hands
    a connection for one cluster's fallback to any cluster's, and a robot whose
    replicas were briefly marked down gets another app's answer (CI saw a
    benchmark stream refused UNAUTHENTICATED by the test cluster's app).
    Turning SO_REUSEPORT off as well makes any clash left over fail at bind.
    """
    import socket

    sockets = [socket.socket() for _ in SHARED_PORT_ENV]
    try:
        for s in sockets:  # held open together so the ports differ
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
    env = {name: str(port) for name, port in zip(SHARED_PORT_ENV, ports)}
    env["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"
    return env
