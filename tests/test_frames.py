"""Frame transforms (serve_app/frames.py): the geometry each one promises.

That ResizeWithPad and OpenTauServerStretch give OpenTau's own pixels is
checked against OpenTau 0.14.0's output in tests/test_pi05_golden.py.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from serve_app.frames import Letterbox, OpenTauServerStretch, ResizeWithPad, unit_pixels


def smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def test_resize_with_pad_keeps_aspect_and_pads_left_and_top_only():
    out = ResizeWithPad((224, 224))(np.full((480, 640, 3), 255, np.uint8))
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    # 640x480 -> 224x168: 56 black rows on top, none at the bottom, none on the sides
    assert (out[:56] == 0).all() and (out[56:] == 1).all()
    portrait = ResizeWithPad((224, 224))(np.full((640, 480, 3), 255, np.uint8))
    assert (portrait[:, :56] == 0).all() and (portrait[:, 56:] == 1).all()


def test_resize_with_pad_truncates_sizes_and_uses_plain_bilinear():
    frame = smooth(720, 1280)
    out = ResizeWithPad((224, 224))(frame)
    nh = int(720 / (1280 / 224))  # 126 content rows
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
    plain = F.interpolate(x, size=(nh, 224), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(out[224 - nh :], plain)
    antialiased = F.interpolate(x, size=(nh, 224), mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()
    assert np.abs(out[224 - nh :] - antialiased).max() > 1e-2  # not the letterbox's filter
    odd = ResizeWithPad((224, 224))(smooth(100, 301))
    assert (odd[: 224 - int(100 / (301 / 224))] == 0).all()  # int(74.41) = 74 content rows


def test_a_frame_at_the_model_size_passes_untouched():
    frame = smooth(224, 224)
    np.testing.assert_array_equal(ResizeWithPad((224, 224))(frame), frame.astype(np.float32) / 255.0)
    floats = np.random.default_rng(0).random((224, 224, 3), dtype=np.float32)
    np.testing.assert_array_equal(ResizeWithPad((224, 224))(floats), floats)  # raw float frames unrounded
    np.testing.assert_array_equal(OpenTauServerStretch((224, 224))(floats), floats)


def test_opentau_server_stretch_is_pil_bicubic_to_the_full_size():
    frame = smooth(480, 640)
    out = OpenTauServerStretch((224, 224))(frame)
    expected = np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255.0
    np.testing.assert_array_equal(out, expected)


def test_letterbox_is_centred_and_uint8():
    out = Letterbox((96, 96))(np.full((50, 100, 3), 200, np.uint8))
    assert out.dtype == np.uint8 and (out[:20] == 0).all() and (out[-20:] == 0).all()
    assert (out[30:66, 5:90] == 200).all()


def test_unit_pixels_takes_either_dtype():
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.equal(unit_pixels(u8), torch.tensor([0.0, 0.2, 1.0]))
    assert torch.equal(unit_pixels(torch.tensor([0.25])), torch.tensor([0.25]))
