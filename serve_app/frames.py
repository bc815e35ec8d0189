"""Decoded camera frame -> the camera input a policy was trained on. Each policy type owns its transform.

    decode_image (uint8 HWC, or float32 HWC in [0, 1] for OpenTau's raw layout)
      -> policy.frames(frame) -> (H, W, 3) at the model's size, in the transform's dtype

A checkpoint behaves as trained only if its frames are resized the way its
training data was, so the transform is part of the policy, not of the server:

- `Letterbox`: the native policies' own (centred, antialiased), uint8 out.
- `ResizeWithPad`: what OpenTau 0.14.0 trains pi05 with (its `resize_with_pad`):
  aspect kept, plain bilinear without antialias, padding on the left and top
  only, a frame already at the model's size untouched; float32 [0, 1] out.
- `OpenTauServerStretch`: what OpenTau's own gRPC server does instead (PIL's
  bicubic resize to the model's size, aspect not kept), for checkpoints that
  were validated through that server.

Only torch here; Pillow is imported by the stretch alone, so a policy can be
imported where Pillow is not installed.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


class FrameTransform(Protocol):
    name: str
    target_hw: tuple[int, int]
    dtype: type  # np.uint8, or np.float32 in [0, 1]
    dct_downscale: bool  # may the JPEG decoder shrink in the DCT (not bit-exact with a full decode)?

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """(h, w, 3) uint8, or float32 in [0, 1] -> (H, W, 3) of `dtype`."""
        ...


def as_unit_float(frame: np.ndarray) -> torch.Tensor:
    """(h, w, 3) -> (1, 3, h, w) float32 in [0, 1]; uint8 is divided by 255 (a division: bit-exact with OpenTau)."""
    if not frame.flags.writeable:  # decoded straight from request bytes; torch wants a writable array
        frame = frame.copy()
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0)
    x = x.float() / 255.0 if frame.dtype == np.uint8 else x.float()
    return x.contiguous()


def as_uint8(frame: np.ndarray) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    return (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class Letterbox:
    """Resize keeping the aspect ratio, centred on black padding; uint8 out (the native policies' training)."""

    name = "letterbox"
    dtype = np.uint8
    dct_downscale = True

    def __init__(self, target_hw: tuple[int, int]):
        self.target_hw = tuple(target_hw)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        # The filter is antialiased bilinear, Pillow's BILINEAR to within one grey level, through
        # torch's uint8 kernel: 66 us against Pillow's 110 us for 112x112 -> 96x96 on the 2-core
        # dev box; the resize was the replica's top per-frame cost.
        frame = as_uint8(frame)
        th, tw = self.target_hw
        h, w = frame.shape[:2]
        if (h, w) == (th, tw):
            return frame
        scale = min(th / h, tw / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if not frame.flags.writeable:  # frames viewed straight from request bytes; torch wants a writable one
            frame = frame.copy()
        chw = torch.from_numpy(frame).permute(2, 0, 1).unsqueeze(0)  # a view: NCHW over HWC memory
        resized = F.interpolate(chw, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        out = np.zeros((th, tw, 3), dtype=np.uint8)
        top, left = (th - nh) // 2, (tw - nw) // 2
        # torch's transposing copy back to HWC is 2x numpy's here.
        torch.from_numpy(out)[top : top + nh, left : left + nw].copy_(resized[0].permute(1, 2, 0))
        return out


class ResizeWithPad:
    """OpenTau 0.14.0's training resize for pi05, float32 [0, 1] out; black (0) padding on the left and top."""

    name = "training"
    dtype = np.float32
    dct_downscale = False  # OpenTau decodes full size: a DCT-scaled decode would be other pixels

    def __init__(self, target_hw: tuple[int, int]):
        self.target_hw = tuple(target_hw)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        th, tw = self.target_hw
        x = as_unit_float(frame)
        h, w = x.shape[2:]
        if (h, w) != (th, tw):
            ratio = max(w / tw, h / th)
            nh, nw = int(h / ratio), int(w / ratio)  # truncated, as OpenTau does
            resized = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
            x = F.pad(resized, (tw - nw, 0, th - nh, 0), value=0.0)
        return x[0].permute(1, 2, 0).numpy()


class OpenTauServerStretch:
    """OpenTau's gRPC server: PIL's bicubic resize straight to the model's size (aspect not kept), float32 out.

    Its raw float32 frames pass untouched when already at size; otherwise they go
    through uint8 by truncation first, as that server does.
    """

    name = "opentau_server"
    dtype = np.float32
    dct_downscale = False

    def __init__(self, target_hw: tuple[int, int]):
        self.target_hw = tuple(target_hw)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        from PIL import Image

        th, tw = self.target_hw
        if frame.dtype != np.uint8:
            if frame.shape[:2] == (th, tw):
                return np.ascontiguousarray(frame, dtype=np.float32)
            frame = (frame * 255).astype(np.uint8)
        resized = Image.fromarray(np.ascontiguousarray(frame)).resize((tw, th), Image.Resampling.BICUBIC)
        return np.asarray(resized, dtype=np.float32) / 255.0


def unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """A batch of frames as the transforms give them, uint8 or float32 [0, 1] -> float32 [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
