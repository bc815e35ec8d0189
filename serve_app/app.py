"""Serve application builder: `import_path: serve_app.app:build_app` in serve_config.yaml.

Every checkpoint (args.checkpoint and each of args.checkpoints) is opened and
its weights checked against the policy here, in the process that deploys, so a
wrong path or a mismatched file fails the deploy at once with the model, the
file and the keys named, before any replica starts.

`application(app)` is the same application for `serve.run` (the launcher,
benchmarks): one entry of serve_config.yaml's `applications`, with the options
of its `deployments` entry applied as Serve applies them to a deployed file.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ray.serve import Application, Deployment
from ray.serve.schema import DeploymentSchema

from serve_app.checkpoint import CheckpointError, open_checkpoint
from serve_app.model_table import model_table
from serve_app.policies import verify_checkpoint
from serve_app.replica import RobotPolicyReplica

REPO_ROOT = Path(__file__).resolve().parent.parent
REPLICA_ARGS = frozenset(inspect.signature(RobotPolicyReplica.func_or_class.__init__).parameters) - {"self"}
IMPORT_PATH = "serve_app.app:build_app"
APPLICATION_KEYS = frozenset({"name", "route_prefix", "import_path", "args", "deployments"})
# What a `deployments` entry of a Serve config may set that Deployment.options takes too (all but
# rolling_update_percentage, which Ray 2.60 no longer applies).
DEPLOYMENT_OPTIONS = (frozenset(DeploymentSchema.model_fields)
                      & frozenset(inspect.signature(Deployment.options).parameters) - {"name"})


def resolve_checkpoint(path: str) -> str:
    """Absolute path; a relative one is tried against the cwd, then the repo root."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = next((c for c in (Path.cwd() / p, REPO_ROOT / p) if c.exists()), Path.cwd() / p)
    return str(p.resolve())


def build_app(args: dict[str, Any]) -> Application:
    """The entry point Serve calls with the `args` of serve_config.yaml."""
    return RobotPolicyReplica.bind(**replica_args(args))


def application(app: dict[str, Any]) -> Application:
    """One entry of serve_config.yaml's `applications`, ready for
    `serve.run(application(app), name=app["name"], route_prefix=app.get("route_prefix", "/"))`."""
    unknown = set(app) - APPLICATION_KEYS
    if unknown:
        raise ValueError(f"serve_app: application keys {sorted(unknown)} are not supported; "
                         f"known: {sorted(APPLICATION_KEYS)}")
    if app.get("import_path", IMPORT_PATH) != IMPORT_PATH:
        raise ValueError(f"serve_app: import_path {app['import_path']!r}; this application is {IMPORT_PATH!r}")
    deployments = app.get("deployments") or [{"name": RobotPolicyReplica.name}]
    names = [d.get("name") for d in deployments]
    if names != [RobotPolicyReplica.name]:
        raise ValueError(f"serve_app: deployments {names}; the application has one, {RobotPolicyReplica.name!r}")
    options = {k: v for k, v in deployments[0].items() if k != "name"}
    unknown = set(options) - DEPLOYMENT_OPTIONS
    if unknown:
        raise ValueError(f"serve_app: deployment options {sorted(unknown)} are not supported; "
                         f"known: {sorted(DEPLOYMENT_OPTIONS)}")
    return RobotPolicyReplica.options(**options).bind(**replica_args(app.get("args") or {}))


def replica_args(args: dict[str, Any]) -> dict[str, Any]:
    """The replica's constructor arguments from `args`, every checkpoint resolved and verified."""
    args = dict(args)
    unknown = set(args) - REPLICA_ARGS
    if unknown:
        raise ValueError(f"serve_app: unknown args {sorted(unknown)}; known: {sorted(REPLICA_ARGS)}")
    table = model_table(args.get("checkpoint"), args.get("checkpoints"), args.get("default_model"), resolve_checkpoint)
    if args.get("checkpoint"):
        args["checkpoint"] = table.directory(table.default)
    if args.get("checkpoints"):
        args["checkpoints"] = {name: table.directory(name) for name in args["checkpoints"]}
    capacity = args.get("max_models_per_replica", 3)
    if len(table.checkpoints) > 1 and (not isinstance(capacity, int) or capacity < 2):
        raise ValueError(f"serve_app: args.max_models_per_replica is {capacity!r}; with several checkpoints a replica "
                         "must hold at least 2 (the default, always loaded, and one more)")
    for name in table.names:
        pretrained = args.get("pretrained_path") if name == table.default else None
        try:
            verify_checkpoint(open_checkpoint(table.directory(name), pretrained), args.get("preprocessing"))
        except CheckpointError as err:
            if len(table.checkpoints) == 1:
                raise
            raise CheckpointError(f"model {name!r}: {err}") from None
    return args
