"""Policy registry: `policy.type` in train_config.json -> implementation.

The serving code sees only the `Policy` protocol: a batch of validated
observations in, a batch of action chunks in the robot's units out. A policy
type is a sub-package exposing

    expected_weights(checkpoint) -> {name: shape}   # cheap: no tensors built
    load(checkpoint, device) -> Policy              # strict load + move to device

Types are imported lazily so a small policy never pays for a large one's imports.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from serve_app.checkpoint import Checkpoint, CheckpointError, check_weights_match, read_weight_shapes
from policy_wire.input_spec import InputSpec
from serve_app.observation import ObservationBatch

POLICY_TYPES = {
    "visuomotor_chunk": "serve_app.policies.visuomotor_chunk",
    "pi05": "serve_app.policies.pi05",
}


class Policy(Protocol):
    spec: InputSpec

    def predict(self, batch: ObservationBatch) -> np.ndarray:
        """(B, chunk_length, action_dim) float32 actions in the robot's units (prefix rows: serve_app.rtc)."""
        ...


def policy_module(checkpoint: Checkpoint):
    name = checkpoint.policy_type
    if name not in POLICY_TYPES:
        known = ", ".join(sorted(POLICY_TYPES))
        raise CheckpointError(f"{checkpoint.config_path}: unknown policy.type {name!r}; known types: {known}")
    return importlib.import_module(POLICY_TYPES[name])


def verify_checkpoint(checkpoint: Checkpoint) -> None:
    """Strict name/shape check from the safetensors header alone (seconds, no GPU)."""
    module = policy_module(checkpoint)
    expected = module.expected_weights(checkpoint)
    found = read_weight_shapes(checkpoint.weights_path)
    check_weights_match(expected, found, checkpoint.weights_path, checkpoint.policy_type)


def load_policy(checkpoint: Checkpoint, device: str) -> Policy:
    return policy_module(checkpoint).load(checkpoint, device)
