"""Real observation payloads for tests: JPEG/PNG bytes made with Pillow, wire messages."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from policy_wire import robot_inference_pb2 as pb


def frame(h: int = 224, w: int = 224, seed: int = 0) -> np.ndarray:
    """A uint8 RGB frame with structure (gradient + a bright square), not just noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1).astype(np.uint8)
    cy, cx = rng.integers(0, h - h // 8), rng.integers(0, w - w // 8)
    img[cy : cy + h // 8, cx : cx + w // 8] = 255
    return img


def encode(img: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_camera(seed: int = 0, h: int = 224, w: int = 224) -> pb.CameraImage:
    return pb.CameraImage(image_data=encode(frame(h, w, seed)), encoding="jpeg")


def observation(
    num_cameras: int = 2, state_dim: int = 14, seed: int = 0, request_id: str = "", prompt: str = "pick up the cube"
) -> pb.ObservationRequest:
    rng = np.random.default_rng(seed)
    return pb.ObservationRequest(
        images=[jpeg_camera(seed + i) for i in range(num_cameras)],
        robot_state=pb.RobotState(state=rng.uniform(-1, 1, state_dim).astype(np.float32).tolist()),
        prompt=prompt,
        request_id=request_id,
    )


def chunk_array(response: pb.ActionChunkResponse) -> np.ndarray:
    return np.array([row.values for row in response.action_chunk], dtype=np.float32)


class CallContext:
    """What a replica method reads of a gRPC call: its metadata (as keywords), and where its status goes."""

    def __init__(self, **metadata):
        self.metadata, self.code, self.details = tuple(metadata.items()), None, None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details
