"""Camera bytes -> an RGB frame as sent (uint8, or float32 in [0, 1] for OpenTau's raw layout).

The policy's own transform (serve_app/frames.py) then brings it to the model's size.

Decoding is bounded before any pixel is allocated: the header's size is
checked against `max_pixels`, so a decompression bomb costs a few hundred
bytes of parsing, not gigabytes of memory. Only JPEG and PNG decoders are
reachable from the wire: JPEG through simplejpeg (libjpeg-turbo), PNG through Pillow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from serve_app.errors import invalid

COMPRESSED_ENCODINGS = frozenset({"jpeg", "jpg", "png"})
RAW_ENCODING = "raw"
JPEG_SOI = b"\xff\xd8"
ACCEPTED_ENCODINGS = "jpeg, jpg, png, raw"
RAW_FLOAT_SLACK = 1e-3  # float32 [0, 1] frames slightly outside from rounding are clipped, not refused
# Pillow's own bomb guard would only warn below twice its limit; ours is the one that acts.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one decoded camera frame (24 MP covers a 6K sensor)."""

    max_pixels: int = 24_000_000


def decode_image(
    data: bytes,
    encoding: str,
    *,
    width: int = 0,
    height: int = 0,
    camera: int = 0,
    target_hw: tuple[int, int] | None = None,
    limits: ImageLimits = ImageLimits(),
) -> np.ndarray:
    """Decode one camera frame to HWC RGB: uint8, or float32 in [0, 1] for raw frames without width/height.

    `target_hw` is a hint: JPEG decoding may downscale by a power of two in the
    DCT (much cheaper than decoding full size) while staying at least that big.
    """
    label = encoding.strip().lower()
    where = f"camera {camera}"
    if not data:
        raise invalid(f"{where}: image_data is empty")
    if label in COMPRESSED_ENCODINGS:
        return _decode_compressed(data, label, where, target_hw, limits)
    if label == RAW_ENCODING:
        if width or height:
            return _decode_raw_uint8(data, width, height, where, limits)
        return _decode_raw_float(data, where, limits)
    raise invalid(f"{where}: unknown encoding {encoding!r}; use one of {ACCEPTED_ENCODINGS}")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNKNOWN_COST = 1 << 62  # bytes we cannot size cheaply: treat as the most expensive kind


def decode_cost_pixels(data: bytes, encoding: str, width: int = 0, height: int = 0) -> int:
    """Pixels a decode of this frame would produce, read from the header only (a few microseconds).

    Lets the replica decode typical robot frames without a thread hop while
    sending large or unusual ones (and anything malformed, which decode_image
    then refuses with a precise message) to its decode pool.
    """
    label = encoding.strip().lower()
    if label == RAW_ENCODING:
        return width * height if width and height else len(data) // 12
    if label not in COMPRESSED_ENCODINGS:
        return UNKNOWN_COST
    if data[:2] == JPEG_SOI:
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return UNKNOWN_COST
        return h * w
    if data[:8] == PNG_SIGNATURE and len(data) >= 24:  # IHDR: big-endian width, height at bytes 16..24
        return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
    return UNKNOWN_COST


def _decode_compressed(data, label, where, target_hw, limits) -> np.ndarray:
    if data[:2] == JPEG_SOI:
        return _decode_jpeg(data, label, where, target_hw, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=["JPEG", "PNG"])
    except Exception:
        raise invalid(
            f"{where}: {len(data)} bytes labelled {label!r} are not a JPEG or PNG image"
        ) from None
    w, h = image.size
    if w <= 0 or h <= 0 or w * h > limits.max_pixels:
        raise invalid(
            f"{where}: image is {w}x{h} pixels, over the limit of {limits.max_pixels} pixels"
        )
    try:
        rgb = image.convert("RGB")
    except Exception as exc:
        raise invalid(
            f"{where}: corrupt or truncated {image.format} image ({len(data)} bytes): {exc}"
        ) from None
    return np.asarray(rgb, dtype=np.uint8)


def _decode_jpeg(data, label, where, target_hw, limits) -> np.ndarray:
    """libjpeg-turbo through simplejpeg: about 2x Pillow on robot-sized frames, and it
    downscales in the DCT when the frame is at least twice the model's resolution."""
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        raise invalid(f"{where}: {len(data)} bytes labelled {label!r} are not a JPEG or PNG image") from None
    if w <= 0 or h <= 0 or w * h > limits.max_pixels:
        raise invalid(f"{where}: image is {w}x{h} pixels, over the limit of {limits.max_pixels} pixels")
    min_h, min_w = target_hw if target_hw is not None else (0, 0)
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h, min_width=min_w, strict=True)
    except ValueError as exc:
        raise invalid(f"{where}: corrupt or truncated JPEG image ({len(data)} bytes): {exc}") from None


def _decode_raw_uint8(data, width, height, where, limits) -> np.ndarray:
    if width <= 0 or height <= 0:
        raise invalid(f"{where}: raw uint8 frames need both width and height > 0, got {width}x{height}")
    if width * height > limits.max_pixels:
        raise invalid(f"{where}: raw frame {width}x{height} is over the limit of {limits.max_pixels} pixels")
    expected = width * height * 3
    if len(data) != expected:
        raise invalid(
            f"{where}: raw uint8 {width}x{height}x3 frame needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)


def _decode_raw_float(data, where, limits) -> np.ndarray:
    # OpenTau's layout: float32 HWC RGB in [0, 1], square, side = sqrt(n / 3).
    if len(data) % 12:
        raise invalid(
            f"{where}: raw float32 RGB frame must be a multiple of 12 bytes, got {len(data)}; "
            "for uint8 frames set width and height"
        )
    pixels = len(data) // 12
    side = int(round(pixels**0.5))
    if side * side != pixels:
        raise invalid(
            f"{where}: raw float32 frame of {pixels} pixels is not square; "
            "send uint8 frames with width and height for other shapes"
        )
    if pixels > limits.max_pixels:
        raise invalid(f"{where}: raw frame {side}x{side} is over the limit of {limits.max_pixels} pixels")
    values = np.frombuffer(data, dtype="<f4").reshape(side, side, 3)
    if not np.isfinite(values).all():
        raise invalid(f"{where}: raw float32 frame contains NaN or infinity")
    low, high = float(values.min()), float(values.max())
    if low < -RAW_FLOAT_SLACK or high > 1.0 + RAW_FLOAT_SLACK:
        # OpenTau's own client sends 0..255 floats in raw mode; clipping would make them white, silently.
        raise invalid(
            f"{where}: raw float32 frame values span {low:g}..{high:g}; they must be in [0, 1] "
            "(divide 0..255 values by 255, or send uint8 frames with width and height)"
        )
    # Kept float: a policy trained on float frames sees them unrounded (serve_app/frames.py).
    return np.clip(values, 0.0, 1.0)
