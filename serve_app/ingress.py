"""How Serve starts for this app: serve_config.yaml's proxy, HTTP, gRPC and controller options.

Which gRPC ingress a cluster gets (HAProxy or Serve's standard proxy) and how
big a gRPC message may be are variables Serve reads at import in each of its
processes. serve_config.yaml gives them to Serve's controller
(`controller_options.runtime_env.env_vars`), and every process the controller
starts (HAProxy, proxies, replicas) inherits them, so plain
`serve run serve_config.yaml` gets them with no variable set by hand.

Everything that starts Serve from Python (the launcher, the test session,
notebooks, benchmarks) calls `serve.start(**start_options(config))` with the
same file, so there is one owner for each of these knobs: serve_config.yaml.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"
INGRESS_ENV = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY")
MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"  # bytes, both directions, on every Serve gRPC server
MB = 1024 * 1024


def load_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def controller_env(config: dict[str, Any]) -> dict[str, str]:
    """The controller's env_vars, created in `config` if absent (mutable view)."""
    options = config["controller_options"] = config.get("controller_options") or {}
    runtime_env = options["runtime_env"] = options.get("runtime_env") or {}
    env_vars = runtime_env["env_vars"] = runtime_env.get("env_vars") or {}
    return env_vars


def with_ingress(config: dict[str, Any], standard_proxy: bool) -> dict[str, Any]:
    """A copy of `config` with Serve's standard gRPC proxy (True) or the HAProxy ingress (False)."""
    config = copy.deepcopy(config)
    controller_env(config).update({name: "0" if standard_proxy else "1" for name in INGRESS_ENV})
    return config


def with_max_message_mb(config: dict[str, Any], megabytes: float) -> dict[str, Any]:
    config = copy.deepcopy(config)
    controller_env(config)[MAX_MESSAGE_ENV] = str(int(megabytes * MB))
    return config


def max_message_bytes(config: dict[str, Any]) -> int | None:
    value = controller_env(copy.deepcopy(config)).get(MAX_MESSAGE_ENV)  # a copy: reading adds nothing to `config`
    return int(value) if value is not None else None


def start_options(config: dict[str, Any], grpc_port: int | None = None, http_port: int | None = None,
                  http_host: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `serve.start`, as `serve run` derives them from the file (ports overridable)."""
    from ray.serve.config import gRPCOptions

    grpc = dict(config["grpc_options"])
    if grpc_port is not None:
        grpc["port"] = grpc_port
    http = dict(config.get("http_options") or {})
    if http_port is not None:
        http["port"] = http_port
    if http_host is not None:
        http["host"] = http_host
    return {
        "proxy_location": config.get("proxy_location", "EveryNode"),
        "http_options": http,
        "grpc_options": gRPCOptions(**grpc),
        "controller_options": config.get("controller_options"),
    }
