"""Observation (one robot's validated input, numpy) and the batch of them: what a policy consumes.

Built by serve_app/parse.py, the one place where client input is trusted or
refused; everything after it may assume shapes, dtypes and finiteness.
Importing this needs numpy only, so a policy can be used without the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy_wire.input_spec import InputSpec


@dataclass
class Observation:
    """One robot's validated observation, already at the model's resolution."""

    images: np.ndarray  # (num_cameras, H, W, 3) in the policy's frame dtype (serve_app/frames.py), missing cameras 0
    camera_mask: np.ndarray  # (num_cameras,) bool, False where padded
    state: np.ndarray  # (state_dim,) float32, zero-padded
    prompt: str
    prefix: np.ndarray  # (chunk_length, action_dim) float32, zero-padded
    delay: int  # rows of `prefix` the returned chunk must reproduce

    @classmethod
    def blank(cls, spec: InputSpec, frame_dtype=np.uint8) -> "Observation":
        """Black frames, zero state, no prompt, no prefix: what warm-up computes."""
        return cls(
            images=np.zeros((spec.num_cameras, spec.image_height, spec.image_width, 3), frame_dtype),
            camera_mask=np.ones(spec.num_cameras, bool),
            state=np.zeros(spec.state_dim, np.float32),
            prompt="",
            prefix=np.zeros((spec.chunk_length, spec.action_dim), np.float32),
            delay=0,
        )


@dataclass
class ObservationBatch:
    """Observations stacked along a leading batch axis; what a policy consumes."""

    images: np.ndarray  # (B, num_cameras, H, W, 3) uint8, or float32 in [0, 1]
    camera_mask: np.ndarray  # (B, num_cameras) bool
    state: np.ndarray  # (B, state_dim) float32
    prompts: list[str]
    prefix: np.ndarray  # (B, chunk_length, action_dim) float32
    delay: np.ndarray  # (B,) int64

    @classmethod
    def stack(cls, observations: list[Observation]) -> "ObservationBatch":
        return cls(
            images=np.stack([o.images for o in observations]),
            camera_mask=np.stack([o.camera_mask for o in observations]),
            state=np.stack([o.state for o in observations]),
            prompts=[o.prompt for o in observations],
            prefix=np.stack([o.prefix for o in observations]),
            delay=np.array([o.delay for o in observations], dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.prompts)
