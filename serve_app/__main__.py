"""OpenTau-style launcher: the same command line an OpenTau user already types.

    python -m serve_app --config_path=<checkpoint dir or train_config.json> \
        [--server.port=50051] [--server.max_workers=4] [--policy.pretrained_path=DIR] \
        [--server.max_receive_message_length_mb=100] [--serve_config=serve_config.yaml] [--standard_proxy]

It reads the checkpoint's `server` section (port, max_workers,
max_receive_message_length_mb), lets the command line override it, takes
every other knob from serve_config.yaml, and starts the same Serve
application, behind the same ingress, as `serve run serve_config.yaml`
(HAProxy in front of the replicas' own gRPC servers, from the file's
controller_options). `--standard_proxy` starts Serve's standard gRPC proxy
instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from serve_app.app import REPO_ROOT, application, resolve_checkpoint
from serve_app.checkpoint import open_checkpoint
from serve_app.ingress import MB, load_config, max_message_bytes, start_options, with_ingress, with_max_message_mb

logger = logging.getLogger("serve_app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve_app", description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", required=True, help="checkpoint directory or its train_config.json")
    parser.add_argument("--server.port", dest="port", type=int, default=None)
    parser.add_argument("--server.max_workers", dest="max_workers", type=int, default=None)
    parser.add_argument("--server.max_receive_message_length_mb", dest="max_receive_mb", type=float, default=None,
                        help="largest request a robot may send (OpenTau's default: 100); larger ones get RESOURCE_EXHAUSTED")
    parser.add_argument("--server.max_send_message_length_mb", dest="max_send_mb", type=float, default=None,
                        help="accepted for OpenTau compatibility; Serve has one limit for both directions")
    parser.add_argument("--policy.pretrained_path", dest="pretrained_path", default=None)
    parser.add_argument(
        "--preprocessing", default=None,
        help="camera frame transform (serve_config.yaml args.preprocessing): 'training' (the default: as the "
             "policy was trained), or for pi05 'opentau_server' (OpenTau's server's stretch)",
    )
    parser.add_argument("--serve_config", type=Path, default=REPO_ROOT / "serve_config.yaml")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--no_dashboard", action="store_true", help="start the local cluster without Ray's dashboard")
    parser.add_argument(
        "--standard_proxy", action="store_true",
        help="Serve's standard gRPC proxy instead of its throughput-optimised HAProxy ingress (takes effect "
             "where Serve starts; a cluster already running Serve keeps the ingress it has)",
    )
    return parser.parse_args(argv)


def launch_plan(args: argparse.Namespace) -> dict[str, Any]:
    """serve_config.yaml with the checkpoint, port and concurrency of this command line."""
    config = with_ingress(load_config(args.serve_config), standard_proxy=args.standard_proxy)
    checkpoint_path = resolve_checkpoint(args.config_path)
    checkpoint = open_checkpoint(checkpoint_path, args.pretrained_path)
    server = checkpoint.server_config
    config["grpc_options"]["port"] = args.port or server.get("port") or config["grpc_options"]["port"]
    app = config["applications"][0]
    app["args"]["checkpoint"] = checkpoint_path
    if args.preprocessing:
        app["args"]["preprocessing"] = args.preprocessing
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
    receive_mb = args.max_receive_mb or server.get("max_receive_message_length_mb")
    if receive_mb:
        config = with_max_message_mb(config, receive_mb)
    send_mb = args.max_send_mb or server.get("max_send_message_length_mb")
    limit = max_message_bytes(config)
    if send_mb and limit and send_mb * MB != limit:
        logger.warning("max_send_message_length_mb=%s: Serve has one message limit for both directions; "
                       "using %.0f MB (the receive limit) for both", send_mb, limit / MB)
    return config


def run(config: dict[str, Any], address: str | None, dashboard: bool = True) -> None:
    """What `serve run` does with a config file: start Serve with its proxy options, run its application."""
    import ray
    from ray import serve

    ray.init(address=address, include_dashboard=dashboard if address in (None, "local") else None)
    serve.start(**start_options(config))
    for app in config["applications"]:  # serve.run waits until RUNNING; a failed deploy raises with Serve's message
        serve.run(application(app), name=app["name"], route_prefix=app.get("route_prefix", "/"))
    logger.info("serving on port %s; Ctrl-C to stop", config["grpc_options"]["port"])
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
    run(launch_plan(args), args.address, dashboard=not args.no_dashboard)


if __name__ == "__main__":
    main()
