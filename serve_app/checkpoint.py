"""Checkpoint directories: OpenTau's `train_config.json` + `model.safetensors`, loaded strictly.

A checkpoint that is incomplete or does not match its policy stops the app
from starting with an error that names the file and the first offending keys.
There is no fallback to random weights anywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from serve_app.checkpoint_id import checkpoint_id

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
        """First 16 hex digits of the SHA-256 of model.safetensors, hashed once per file version
        (serve_app/checkpoint_id.py says why a cached id is safe)."""
        return checkpoint_id(self.weights_path)


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


# Mapped file pages a load may hold at once: the mapping is dropped (and its pages leave the process's
# resident set) every STREAM_WINDOW bytes, so host memory is the target tensors plus this, never the file too.
STREAM_WINDOW = 32 << 20
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def load_weights_strict(
    module,
    weights_path: Path,
    policy_type: str,
    device="cpu",
    dtypes: Callable[[str], Any] | None = None,
) -> None:
    """Stream model.safetensors into `module`, refusing any missing, extra or misshapen tensor.

    Names and shapes are checked from the header before anything is allocated.
    `module` may be on meta: each parameter and buffer is then allocated once,
    on `device` and in `dtypes(name)` (floating tensors; None keeps the
    module's dtype), and filled from the file a slice at a time. Tied tensors
    stay tied. Host memory: the tensors themselves when `device` is the CPU,
    plus STREAM_WINDOW of the file.
    """
    import torch
    from safetensors import SafetensorError

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_weights_match(expected, read_weight_shapes(weights_path), weights_path, policy_type)
    targets = _materialise(module, torch.device(device), dtypes, persistent=expected.keys())
    try:
        for window in _windows(weights_path):
            with _open_weights(weights_path) as f, torch.no_grad():
                for name, rows in window:
                    if rows is None:  # a 0-d tensor
                        targets[name].copy_(f.get_tensor(name))
                    else:
                        targets[name][rows].copy_(f.get_slice(name)[rows])
    except SafetensorError as exc:  # a truncated or corrupt file, found while reading it
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from None


def _materialise(module, device, dtypes, persistent) -> dict[str, Any]:
    """Give every parameter and buffer of `module` its storage on `device`: {state-dict name: tensor}."""
    import torch
    from torch import nn

    made: dict[int, torch.Tensor] = {}  # id(old) -> new, so that a tensor two names share stays shared
    targets = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, old in named:
        new = made.get(id(old))
        if new is None:
            dtype = old.dtype
            if dtypes is not None and old.is_floating_point():
                dtype = dtypes(name) or old.dtype
            if name not in persistent:
                new = old.to(device)  # a buffer the file does not hold (on meta: an error, as it should be)
            elif old.device == device and old.dtype == dtype:
                new = old  # already in place (a module built on the CPU): filled where it is
            else:
                new = torch.empty(old.shape, dtype=dtype, device=device)
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=old.requires_grad)
            made[id(old)] = new
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, new)
        targets[name] = new
    return targets


def _windows(weights_path: Path) -> list[list[tuple[str, Any]]]:
    """(name, row slice) pieces in groups of at most STREAM_WINDOW bytes (a piece is at least one row)."""
    windows, current, size = [], [], 0
    with _open_weights(weights_path) as f:
        for name in f.keys():
            part = f.get_slice(name)
            shape = part.get_shape()
            row_bytes = _ITEM_BYTES.get(part.get_dtype(), 1) * math.prod(shape[1:])
            step = max(1, STREAM_WINDOW // max(row_bytes, 1))
            for start in range(0, shape[0], step) if shape else (None,):
                rows = None if start is None else slice(start, min(start + step, shape[0]))
                current.append((name, rows))
                size += row_bytes * (rows.stop - rows.start) if rows else row_bytes
                if size >= STREAM_WINDOW:
                    windows.append(current)
                    current, size = [], 0
    return windows + [current] if current else windows


def _open_weights(weights_path: Path):
    from safetensors import safe_open

    return safe_open(str(weights_path), framework="pt")


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)
