"""ObservationRequest (wire) -> Observation (validated numpy), and the batch of them.

This is the only place where client input is trusted or refused. Everything
after it may assume shapes, dtypes and finiteness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy_wire.input_spec import InputSpec
from serve_app.errors import invalid
from serve_app.images import ImageLimits, decode_cost_pixels, decode_image, letterbox


@dataclass
class Observation:
    """One robot's validated observation, already at the model's resolution."""

    images: np.ndarray  # (num_cameras, H, W, 3) uint8, missing cameras black
    camera_mask: np.ndarray  # (num_cameras,) bool, False where padded
    state: np.ndarray  # (state_dim,) float32, zero-padded
    prompt: str
    prefix: np.ndarray  # (chunk_length, action_dim) float32, zero-padded
    delay: int  # rows of `prefix` the returned chunk must reproduce

    @classmethod
    def blank(cls, spec: InputSpec) -> "Observation":
        """Black frames, zero state, no prompt, no prefix: what health probes and warm-up compute."""
        return cls(
            images=np.zeros((spec.num_cameras, spec.image_height, spec.image_width, 3), np.uint8),
            camera_mask=np.ones(spec.num_cameras, bool),
            state=np.zeros(spec.state_dim, np.float32),
            prompt="",
            prefix=np.zeros((spec.chunk_length, spec.action_dim), np.float32),
            delay=0,
        )


@dataclass
class ObservationBatch:
    """Observations stacked along a leading batch axis; what a policy consumes."""

    images: np.ndarray  # (B, num_cameras, H, W, 3) uint8
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


def parse_observation(request, spec: InputSpec, limits: ImageLimits = ImageLimits()) -> Observation:
    """Validate and decode one ObservationRequest; raise RequestError on bad input."""
    prompt = _parse_prompt(request.prompt, spec)
    state = _parse_state(request.robot_state.state, spec)
    images, mask = _parse_images(request.images, spec, limits)
    prefix, delay = _parse_prefix(request.prefix_action, request.delay, spec)
    return Observation(images=images, camera_mask=mask, state=state, prompt=prompt, prefix=prefix, delay=delay)


def decode_cost(request) -> int:
    """Pixels the request's cameras would decode to (header reads only; see decode_cost_pixels)."""
    return sum(decode_cost_pixels(c.image_data, c.encoding, c.width, c.height) for c in request.images)


def _parse_prompt(prompt: str, spec: InputSpec) -> str:
    size = len(prompt.encode("utf-8"))
    if size > spec.max_prompt_bytes:
        raise invalid(f"prompt: {size} bytes is longer than the limit of {spec.max_prompt_bytes}")
    return prompt


def _parse_state(values, spec: InputSpec) -> np.ndarray:
    n = len(values)
    if n == 0:
        raise invalid(f"robot_state: empty; the model needs up to {spec.state_dim} values")
    if n > spec.state_dim:
        raise invalid(
            f"robot_state: {n} values but the model takes at most {spec.state_dim}; "
            "refusing to truncate"
        )
    state = np.zeros(spec.state_dim, dtype=np.float32)
    state[:n] = np.asarray(values, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(state[:n]))
    if bad.size:
        raise invalid(f"robot_state: value {int(bad[0])} is {state[bad[0]]}; every value must be finite")
    return state


def _parse_images(images, spec: InputSpec, limits: ImageLimits):
    n = len(images)
    target = (spec.image_height, spec.image_width)
    if spec.num_cameras and n < max(spec.min_cameras, 1):
        raise invalid(
            f"images: got {n} camera images, the model needs at least {max(spec.min_cameras, 1)} "
            f"(it has {spec.num_cameras} cameras)"
        )
    if n > spec.num_cameras:
        raise invalid(f"images: got {n} camera images, the model has only {spec.num_cameras} cameras")
    frames = np.zeros((spec.num_cameras, *target, 3), dtype=np.uint8)
    mask = np.zeros(spec.num_cameras, dtype=bool)
    for i, camera in enumerate(images):
        frame = decode_image(
            camera.image_data,
            camera.encoding,
            width=camera.width,
            height=camera.height,
            camera=i,
            target_hw=target,
            limits=limits,
        )
        frames[i] = letterbox(frame, target)
        mask[i] = True
    return frames, mask


def _parse_prefix(rows, delay: int, spec: InputSpec):
    prefix = np.zeros((spec.chunk_length, spec.action_dim), dtype=np.float32)
    if len(rows) == 0:
        return prefix, 0  # OpenTau semantics: without a prefix, delay is ignored
    if len(rows) > spec.chunk_length:
        raise invalid(
            f"prefix_action: {len(rows)} rows, longer than the chunk length {spec.chunk_length}"
        )
    width = len(rows[0].values)
    for i, row in enumerate(rows):
        if len(row.values) != width:
            raise invalid(
                f"prefix_action: row {i} has {len(row.values)} values, row 0 has {width}; rows must be equal"
            )
    if width == 0 or width > spec.action_dim:
        raise invalid(f"prefix_action: rows have {width} values; the model's action dim is {spec.action_dim}")
    values = np.asarray([row.values for row in rows], dtype=np.float32)
    if not np.isfinite(values).all():
        raise invalid("prefix_action: contains NaN or infinity")
    limit = min(len(rows), spec.max_delay)
    if not 0 <= delay <= limit:
        raise invalid(
            f"delay: {delay} is out of range; with {len(rows)} prefix rows and a policy maximum of "
            f"{spec.max_delay}, it must be in 0..{limit}"
        )
    prefix[: len(rows), :width] = values
    return prefix, int(delay)
