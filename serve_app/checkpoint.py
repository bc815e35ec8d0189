"""Checkpoint directories: OpenTau's `train_config.json` + `model.safetensors`, loaded strictly.

A checkpoint that is incomplete or does not match its policy stops the app
from starting with an error that names the file and the first offending keys.
There is no fallback to random weights anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

CONFIG_NAME = "train_config.json"
WEIGHTS_NAME = "model.safetensors"
SHOW_KEYS = 5


class CheckpointError(RuntimeError):
    """The checkpoint cannot be served; the message says which file and why."""


@dataclass(frozen=True)
class Checkpoint:
    config_path: Path
    weights_path: Path
    train_config: dict[str, Any]

    @property
    def directory(self) -> Path:
        return self.weights_path.parent

    @property
    def policy_config(self) -> dict[str, Any]:
        return self.train_config["policy"]

    @property
    def policy_type(self) -> str:
        return self.policy_config["type"]

    @property
    def server_config(self) -> dict[str, Any]:
        return self.train_config.get("server") or {}

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """A top-level train_config value that must be present and of `kind`."""
        if key not in self.train_config:
            raise CheckpointError(f"{self.config_path}: missing required key {key!r}")
        value = self.train_config[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{self.config_path}: {key!r} is {value!r}, expected {_kind_name(kind)}")
        return value

    def checkpoint_id(self) -> str:
        """First 16 hex digits of the SHA-256 of model.safetensors."""
        digest = hashlib.sha256()
        with self.weights_path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()[:16]


def open_checkpoint(path: str | Path, pretrained_path: str | Path | None = None) -> Checkpoint:
    """Locate and read a checkpoint: a directory, or the path of its train_config.json.

    The weights are, in order: those named by `pretrained_path` here (the
    launcher's --policy.pretrained_path); the model.safetensors beside
    train_config.json; the directory in the config's `policy.pretrained_path`.
    The file beside the config wins over the config's field because a
    training run records there the weights it *started* from, and serving
    those by accident would be a silent wrong model.
    """
    path = Path(path).expanduser()
    config_path = path / CONFIG_NAME if path.is_dir() else path
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: no such file; a checkpoint needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        train_config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not readable JSON ({exc})") from None
    if not isinstance(train_config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    policy = train_config.get("policy")
    if not isinstance(policy, dict) or not isinstance(policy.get("type"), str):
        raise CheckpointError(f"{config_path}: missing 'policy.type' (e.g. \"pi05\")")
    weights_path = _locate_weights(config_path, pretrained_path, policy.get("pretrained_path"))
    return Checkpoint(config_path=config_path, weights_path=weights_path, train_config=train_config)


def _locate_weights(config_path: Path, override, from_config) -> Path:
    if override:  # named on the command line: the operator means it
        return _weights_in(config_path, override, "--policy.pretrained_path")
    beside = config_path.parent / WEIGHTS_NAME
    if beside.is_file():
        return beside
    if from_config:
        return _weights_in(config_path, from_config, "policy.pretrained_path")
    raise CheckpointError(f"{beside}: no such file, and policy.pretrained_path is not set; refusing to serve random weights")


def _weights_in(config_path: Path, directory, source: str) -> Path:
    named = Path(directory).expanduser()
    if not named.is_absolute():
        named = config_path.parent / named
    candidate = named if named.suffix == ".safetensors" else named / WEIGHTS_NAME
    if not candidate.is_file():
        raise CheckpointError(f"{candidate}: no such file (from {source}); refusing to serve random weights")
    return candidate


def read_weight_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the safetensors header, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None


def check_weights_match(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    weights_path: Path,
    policy_type: str,
) -> None:
    """Raise CheckpointError unless names and shapes match exactly."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weights (first: {', '.join(missing[:SHOW_KEYS])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights (first: {', '.join(unexpected[:SHOW_KEYS])})")
    if mismatched:
        shown = ", ".join(f"{k} {found[k]} != {tuple(expected[k])}" for k in mismatched[:SHOW_KEYS])
        problems.append(f"{len(mismatched)} shape mismatches (first: {shown})")
    if problems:
        raise CheckpointError(f"{weights_path}: does not match policy {policy_type!r}: " + "; ".join(problems))


def load_weights_strict(module, weights_path: Path, policy_type: str) -> None:
    """Load model.safetensors into `module`, refusing any missing, extra or misshapen tensor."""
    from safetensors.torch import load_file

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_weights_match(expected, read_weight_shapes(weights_path), weights_path, policy_type)
    module.load_state_dict(load_file(str(weights_path)), strict=True)


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
