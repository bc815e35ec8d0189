"""Policy registry: `policy.type` in train_config.json -> implementation.

The serving code sees only the `Policy` protocol: a batch of validated
observations in, a batch of action chunks in the robot's units out. A policy
type is a sub-package exposing

    expected_weights(checkpoint) -> {name: shape}   # cheap: no tensors built
    PREPROCESSING: names of its frame transforms, the first the default
    load(checkpoint, device, preprocessing) -> Policy  # strict load + move to device

Types are imported lazily so a small policy never pays for a large one's imports.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np
import torch

from serve_app.checkpoint import Checkpoint, CheckpointError, check_weights_match, read_weight_shapes
from policy_wire.input_spec import InputSpec
from serve_app.frames import FrameTransform
from serve_app.observation import ObservationBatch

POLICY_TYPES = {
    "visuomotor_chunk": "serve_app.policies.visuomotor_chunk",
    "pi05": "serve_app.policies.pi05",
}


class Policy(Protocol):
    spec: InputSpec
    frames: FrameTransform  # decoded camera frame -> the model's camera input, as the policy was trained
    device: torch.device  # where it computes (the health probe pings it)

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        """(B, chunk_length, action_dim) float32 actions in the robot's units (prefix rows: serve_app.rtc)."""
        ...


def policy_module(checkpoint: Checkpoint):
    name = checkpoint.policy_type
    if name not in POLICY_TYPES:
        known = ", ".join(sorted(POLICY_TYPES))
        raise CheckpointError(f"{checkpoint.config_path}: unknown policy.type {name!r}; known types: {known}")
    return importlib.import_module(POLICY_TYPES[name])


def verify_checkpoint(checkpoint: Checkpoint, preprocessing: str | None = None) -> None:
    """Strict name/shape check from the safetensors header alone (seconds, no GPU), and a known preprocessing."""
    module = policy_module(checkpoint)
    preprocessing_of(module, checkpoint, preprocessing)
    expected = module.expected_weights(checkpoint)
    found = read_weight_shapes(checkpoint.weights_path)
    check_weights_match(expected, found, checkpoint.weights_path, checkpoint.policy_type)


def load_policy(checkpoint: Checkpoint, device: str, preprocessing: str | None = None) -> Policy:
    """`preprocessing`: one of the policy type's PREPROCESSING names; None: its default (how it trains)."""
    module = policy_module(checkpoint)
    return module.load(checkpoint, device, preprocessing_of(module, checkpoint, preprocessing))


def preprocessing_of(module, checkpoint: Checkpoint, preprocessing: str | None) -> str:
    names = tuple(module.PREPROCESSING)
    if preprocessing is None:
        return names[0]
    if preprocessing not in names:
        raise CheckpointError(
            f"preprocessing {preprocessing!r} is not one of policy {checkpoint.policy_type!r}'s: {', '.join(names)}"
        )
    return preprocessing
