"""Camera frame (numpy or already-compressed bytes) -> CameraImage on the wire.

Frames are shrunk to fit the resolution the server advertises before JPEG
encoding: the server resizes every frame to that size anyway (each policy its
own way, serve_app/frames.py), so sending more pixels only costs bandwidth and
encode time on the robot. The aspect ratio is kept (fit, not stretch): every
policy's resize depends on the frame's aspect alone, so the server places our
small frame where it would have placed the full one. The pixels are those of
one more resize and of JPEG; a robot whose frames must reach the model exactly
as in training sends them uncompressed at full size (CameraImage raw).

Frames that are already JPEG or PNG (a camera driver's compressed stream)
go through untouched: decoding and re-encoding would cost robot CPU and add a
second round of compression artefacts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from policy_wire import robot_inference_pb2 as pb

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT_JPEG_QUALITY = 90


@dataclass(frozen=True)
class EncodedFrame:
    """A frame that is already compressed; sent as is."""

    data: bytes
    encoding: str  # "jpeg" or "png"

    @classmethod
    def sniff(cls, data: bytes) -> EncodedFrame:
        """Label compressed bytes by their magic number; refuse anything else."""
        if data.startswith(JPEG_MAGIC):
            return cls(bytes(data), "jpeg")
        if data.startswith(PNG_MAGIC):
            return cls(bytes(data), "png")
        raise ValueError(f"camera bytes ({len(data)} bytes) are neither JPEG nor PNG; pass raw pixels as a numpy array")


def as_rgb_uint8(frame: np.ndarray) -> np.ndarray:
    """Any common camera layout -> uint8 HWC RGB (gray is replicated, alpha dropped)."""
    image = np.asarray(frame)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"camera frame has shape {image.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if np.issubdtype(image.dtype, np.floating):
        # Floats are OpenTau's convention: RGB in [0, 1].
        if not np.isfinite(image).all():
            raise ValueError("camera frame contains NaN or infinity")
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    raise ValueError(f"camera frame has dtype {image.dtype}; expected uint8, uint16 or float in [0, 1]")


def fit_within(frame: np.ndarray, target_hw: tuple[int, int] | None) -> np.ndarray:
    """Shrink (never enlarge) so the frame fits in target_hw, keeping its aspect ratio."""
    if not target_hw or not all(target_hw):
        return frame  # the server did not advertise a resolution (e.g. OpenTau's own server)
    th, tw = target_hw
    h, w = frame.shape[:2]
    scale = min(th / h, tw / w)
    if scale >= 1.0:
        return frame
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))


def encode_jpeg(frame: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "JPEG", quality=int(quality))
    return buffer.getvalue()


def encode_camera(
    frame, target_hw: tuple[int, int] | None = None, quality: int = DEFAULT_JPEG_QUALITY
) -> pb.CameraImage:
    """One camera frame -> CameraImage: compressed bytes pass through, pixels are fitted and JPEG-encoded."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        frame = EncodedFrame.sniff(bytes(frame))
    if isinstance(frame, EncodedFrame):
        return pb.CameraImage(image_data=frame.data, encoding=frame.encoding)
    pixels = fit_within(as_rgb_uint8(frame), target_hw)
    return pb.CameraImage(image_data=encode_jpeg(pixels, quality), encoding="jpeg")


def decode_frame(frame) -> np.ndarray:
    """The inverse, for recording: any frame -> uint8 HWC RGB pixels."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        frame = EncodedFrame.sniff(bytes(frame))
    if isinstance(frame, EncodedFrame):
        return np.asarray(Image.open(io.BytesIO(frame.data)).convert("RGB"))
    return as_rgb_uint8(frame)
