"""Serve application builder: `import_path: serve_app.app:build_app` in serve_config.yaml.

The checkpoint is opened and its weights checked against the policy here, in
the process that deploys, so a wrong path or a mismatched file fails the
deploy at once with the file and keys named, before any replica starts.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from ray.serve import Application

from serve_app.checkpoint import open_checkpoint
from serve_app.policies import verify_checkpoint
from serve_app.replica import RobotPolicyReplica

REPO_ROOT = Path(__file__).resolve().parent.parent
REPLICA_ARGS = frozenset(inspect.signature(RobotPolicyReplica.func_or_class.__init__).parameters) - {"self"}


def resolve_checkpoint(path: str) -> str:
    """Absolute path; a relative one is tried against the cwd, then the repo root."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = next((c for c in (Path.cwd() / p, REPO_ROOT / p) if c.exists()), Path.cwd() / p)
    return str(p.resolve())


def build_app(args: dict[str, Any]) -> Application:
    """The entry point Serve calls with the `args` of serve_config.yaml."""
    args = dict(args)
    unknown = set(args) - REPLICA_ARGS
    if unknown:
        raise ValueError(f"serve_app: unknown args {sorted(unknown)}; known: {sorted(REPLICA_ARGS)}")
    if "checkpoint" not in args:
        raise ValueError("serve_app: args.checkpoint is required (a checkpoint directory or its train_config.json)")
    args["checkpoint"] = resolve_checkpoint(args["checkpoint"])
    verify_checkpoint(open_checkpoint(args["checkpoint"], args.get("pretrained_path")))
    return RobotPolicyReplica.bind(**args)
