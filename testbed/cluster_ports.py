"""Ports (and the loopback address) for a Ray Serve cluster that shares its machine with other clusters.

Tests, benchmarks (three servers side by side) and a notebook's own cluster run
beside each other on one machine. In the throughput-optimised (HAProxy) mode
Serve gives every cluster the same ports unless moved, and two of them are
shared *silently* through SO_REUSEPORT, so the kernel hands one cluster's
connections to another cluster's processes:

- each replica's direct-ingress gRPC server (40000 and up): Ray 2.60 passes
  grpcio `("grpc.so_reuseport", "0")`, a string, which grpcio ignores, so
  replicas of two clusters both listen on 40000 (`ss -ltnp` shows it);
- the fallback Serve proxy (gRPC 9500, HTTP 8500), bound with SO_REUSEPORT on
  purpose.

CI saw it: half of a benchmark server's calls were refused UNAUTHENTICATED by
the test cluster's app. HAProxy's stats and Prometheus ports clash loudly
instead (the second cluster fails to start).

`private_ports_env()` gives a cluster a block of ports of its own for all of
these. Blocks are claimed with a lock file held by the process that starts the
cluster, so two processes (pytest and the benchmark it runs) never share one;
the claim ends when that process does. Set the variables before the cluster
starts (it inherits them). In production, run one Serve cluster per machine.

The same environment keeps such a cluster on loopback: unless told otherwise
Ray's processes bind and advertise the machine's network address (tests,
benchmarks and notebooks keep every byte, Ray's own traffic included, on
127.0.0.1).
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import sys
import tempfile
from pathlib import Path

# Below Linux's ephemeral range (32768-60999), where an outgoing connection can take
# a port between our check and the cluster's bind, and above Ray's worker ports
# (10002-19999). Serve's own defaults (30000-31000, 40000-41000, 8404, 8500, 9101,
# 9500) stay outside it, for a `serve run` cluster on the same machine.
BLOCKS_START, BLOCK_SIZE, BLOCKS = 20000, 400, 25
SINGLE_PORTS = (  # the first ports of a block
    "RAY_SERVE_HAPROXY_STATS_PORT",  # 8404
    "RAY_SERVE_HAPROXY_METRICS_PORT",  # 9101
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",  # 9500
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",  # 8500
)
# Replica ports: 150 each, enough for every replica a test cluster starts within
# Serve's 150 s quarantine of a freed port.
GRPC_REPLICA_PORTS, HTTP_REPLICA_PORTS = (100, 250), (250, 400)
# Ray's node address is then 127.0.0.1 (ray/_private/services.py get_node_ip_address), in every
# process that imports Ray after it is set: `serve run`, the launcher, a benchmark, a kernel.
# Ray reads it once, at import; and ray.init(_node_ip_address="127.0.0.1") does not help: Ray
# swaps a loopback address for the machine's own (services.resolve_ip_for_localhost).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
FREE_PORTS = (30000 + 1000, 32768)  # single listeners (a cluster's gRPC/HTTP port); above Serve's HTTP replica range

_LOCK_DIR = Path(tempfile.gettempdir()) / "robot-policy-port-blocks"
_claims: list = []  # open lock files: a block stays ours while this process lives
_handed_out: set[int] = set()  # free_port never gives one process the same port twice


def private_ports_env() -> dict[str, str]:
    """Environment that moves every port Serve would share onto a block claimed for one cluster."""
    base = _claim_block()
    env = {name: str(base + i) for i, name in enumerate(SINGLE_PORTS)}
    for protocol, (low, high) in (("GRPC", GRPC_REPLICA_PORTS), ("HTTP", HTTP_REPLICA_PORTS)):
        env[f"RAY_SERVE_DIRECT_INGRESS_MIN_{protocol}_PORT"] = str(base + low)
        env[f"RAY_SERVE_DIRECT_INGRESS_MAX_{protocol}_PORT"] = str(base + high)
    env["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"  # the fallback proxy: a clash left fails at bind
    return {**env, **LOOPBACK_ENV}


def keep_ray_on_loopback() -> None:
    """Make a Ray cluster this process starts bind and advertise 127.0.0.1 (and its children too).

    Must run before this process imports Ray: it fails loudly, rather than let the cluster
    quietly take the machine's network address, if Ray was imported first."""
    read_without_it = "ray" in sys.modules and any(os.environ.get(k) != v for k, v in LOOPBACK_ENV.items())
    os.environ.update(LOOPBACK_ENV)
    if read_without_it:  # Ray read the variable at import, before it was set
        raise RuntimeError("keep_ray_on_loopback() ran after this process imported Ray: a cluster started "
                           "here would bind this machine's network address; call it before importing ray")


def free_port() -> int:
    """A port for a listener a test, benchmark or notebook starts (free on every interface)."""
    rng = random.SystemRandom()
    while True:
        port = rng.randrange(*FREE_PORTS)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port


def _claim_block() -> int:
    _LOCK_DIR.mkdir(exist_ok=True)
    for index in random.SystemRandom().sample(range(BLOCKS), BLOCKS):
        base = BLOCKS_START + index * BLOCK_SIZE
        try:
            lock = open(_LOCK_DIR / f"{base}.lock", "a")  # noqa: SIM115 - held open: it is the claim
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        if all(_bindable(base + i) for i in range(BLOCK_SIZE)):  # nothing else squats on it
            _claims.append(lock)
            return base
        lock.close()
    raise RuntimeError(f"no free block of {BLOCK_SIZE} ports in {BLOCKS_START}-{BLOCKS_START + BLOCKS * BLOCK_SIZE}")


def _bindable(port: int) -> bool:
    """Whether `port` can be bound on every interface, IPv4 and IPv6 (where the machine has IPv6)."""
    try:
        s = socket.socket(socket.AF_INET6)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:
        s = socket.socket(socket.AF_INET)
    with s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True
