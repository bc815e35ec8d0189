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
