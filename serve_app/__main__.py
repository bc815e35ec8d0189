"""OpenTau-style launcher: the same command line an OpenTau user already types.

    python -m serve_app --config_path=<checkpoint dir or train_config.json> \
        [--server.port=50051] [--server.max_workers=4] [--policy.pretrained_path=DIR] \
        [--serve_config=serve_config.yaml] [--standard_proxy]

It reads the checkpoint's `server` section (port, max_workers), lets the
command line override it, takes every other knob from serve_config.yaml,
and starts the same Serve application as `serve run serve_config.yaml`.

A local cluster it starts uses Serve's throughput-optimised ingress (HAProxy in
front of the replicas' own gRPC servers), like the README's `serve run`
command: benchmarks/ measured it at 2-3x the chunks per second of the standard
proxy. `--standard_proxy` starts Serve's standard gRPC proxy instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import yaml

from serve_app.app import REPO_ROOT, resolve_checkpoint
from serve_app.checkpoint import open_checkpoint
from serve_app.ingress import choose_ingress

logger = logging.getLogger("serve_app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve_app", description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True, help="checkpoint directory or its train_config.json")
    parser.add_argument("--server.port", dest="port", type=int, default=None)
    parser.add_argument("--server.max_workers", dest="max_workers", type=int, default=None)
    parser.add_argument("--policy.pretrained_path", dest="pretrained_path", default=None)
    parser.add_argument("--serve_config", type=Path, default=REPO_ROOT / "serve_config.yaml")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--no_dashboard", action="store_true", help="start the local cluster without Ray's dashboard")
    parser.add_argument(
        "--standard_proxy", action="store_true",
        help="start the local cluster with Serve's standard gRPC proxy instead of its throughput-optimised "
             "HAProxy ingress (a cluster joined with --address keeps the ingress it was started with)",
    )
    return parser.parse_args(argv)


def launch_plan(args: argparse.Namespace) -> dict[str, Any]:
    """serve_config.yaml with the checkpoint, port and concurrency of this command line."""
    config = yaml.safe_load(args.serve_config.read_text())
    checkpoint_path = resolve_checkpoint(args.config_path)
    checkpoint = open_checkpoint(checkpoint_path, args.pretrained_path)
    server = checkpoint.server_config
    config["grpc_options"]["port"] = args.port or server.get("port") or config["grpc_options"]["port"]
    app = config["applications"][0]
    app["args"]["checkpoint"] = checkpoint_path
    if args.pretrained_path:
        app["args"]["pretrained_path"] = str(Path(args.pretrained_path).expanduser().resolve())
    deployment = app["deployments"][0]
    max_workers = args.max_workers or server.get("max_workers")
    if max_workers:
        # OpenTau's max_workers caps concurrent calls (one thread each). Here a
        # call is a coroutine, and capping below the batch size would cap
        # batching, so it only ever raises max_ongoing_requests.
        batch = deployment.get("user_config", {}).get("max_batch_size", 1)
        deployment["max_ongoing_requests"] = max(max_workers, batch, deployment.get("max_ongoing_requests", 0))
    return config


def run(config: dict[str, Any], address: str | None, dashboard: bool = True) -> None:
    """What `serve run` does with a config file: start Serve with its proxy options, apply the config."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    ray.init(address=address, include_dashboard=dashboard if address in (None, "local") else None)
    grpc = config["grpc_options"]
    serve.start(
        proxy_location=config.get("proxy_location", "EveryNode"),
        http_options=config.get("http_options"),
        grpc_options=gRPCOptions(port=grpc["port"], grpc_servicer_functions=grpc["grpc_servicer_functions"]),
    )
    _get_global_client().deploy_apps(ServeDeploySchema.parse_obj(config), _blocking=True)
    logger.info("serving on port %s; Ctrl-C to stop", grpc["port"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.address not in (None, "local"):
        logger.info("joining %s: the ingress is whatever that cluster was started with", args.address)
    else:
        choose_ingress(standard_proxy=args.standard_proxy)
    run(launch_plan(args), args.address, dashboard=not args.no_dashboard)


if __name__ == "__main__":
    main()
