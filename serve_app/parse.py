"""ObservationRequest (wire) -> Observation (validated numpy): the only place client input is trusted or refused.

Camera frames are decoded here (serve_app/images.py) and brought to the model's
size by the policy's own transform (serve_app/frames.py), which it is handed.
"""

from __future__ import annotations

import numpy as np

from policy_wire.input_spec import InputSpec
from serve_app.errors import invalid
from serve_app.frames import FrameTransform
from serve_app.images import ImageLimits, decode_cost_pixels, decode_image
from serve_app.observation import Observation


def parse_observation(
    request, spec: InputSpec, frames: FrameTransform, limits: ImageLimits = ImageLimits()
) -> Observation:
    """Validate and decode one ObservationRequest; raise RequestError on bad input."""
    prompt = _parse_prompt(request.prompt, spec)
    state = _parse_state(request.robot_state.state, spec)
    images, mask = _parse_images(request.images, spec, frames, limits)
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


def _parse_images(images, spec: InputSpec, frames: FrameTransform, limits: ImageLimits):
    n = len(images)
    target = (spec.image_height, spec.image_width)
    if spec.num_cameras and n < max(spec.min_cameras, 1):
        raise invalid(
            f"images: got {n} camera images, the model needs at least {max(spec.min_cameras, 1)} "
            f"(it has {spec.num_cameras} cameras)"
        )
    if n > spec.num_cameras:
        raise invalid(f"images: got {n} camera images, the model has only {spec.num_cameras} cameras")
    out = np.zeros((spec.num_cameras, *target, 3), dtype=frames.dtype)
    mask = np.zeros(spec.num_cameras, dtype=bool)
    for i, camera in enumerate(images):
        frame = decode_image(
            camera.image_data,
            camera.encoding,
            width=camera.width,
            height=camera.height,
            camera=i,
            target_hw=target if frames.dct_downscale else None,
            limits=limits,
        )
        out[i] = frames(frame)
        mask[i] = True
    return out, mask


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
