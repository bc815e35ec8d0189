"""Wire observation -> validated numpy, on real JPEG/PNG bytes. No Ray."""

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from policy_wire import robot_inference_pb2 as pb
from serve_app.errors import RequestError
from serve_app.frames import Letterbox
from serve_app.images import ImageLimits, decode_image
from serve_app.observation import InputSpec, ObservationBatch
from serve_app.parse import parse_observation
from tests.payloads import encode, frame, observation

SPEC = InputSpec(
    num_cameras=2, min_cameras=2, image_height=96, image_width=96, state_dim=32, action_dim=8,
    chunk_length=16, max_delay=16, max_prompt_bytes=64,
)
FRAMES = Letterbox((SPEC.image_height, SPEC.image_width))


def rejected(fn, *args, **kw) -> str:
    with pytest.raises(RequestError) as info:
        fn(*args, **kw)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.message


def test_jpeg_decodes_close_to_the_source_and_labels_do_not_matter():
    img = frame(120, 160)
    for label in ("jpeg", "JPG", "png", "Jpeg"):
        out = decode_image(encode(img, "JPEG", quality=95), label)
        assert out.shape == (120, 160, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - img).mean() < 4
    png = decode_image(encode(img, "PNG"), "jpeg")
    assert np.array_equal(png, img)


def test_raw_float_square_and_raw_uint8_any_shape():
    img = frame(32, 32)
    as_float = img.astype(np.float32) / 255.0
    decoded = decode_image(as_float.tobytes(), "raw")
    assert decoded.dtype == np.float32 and np.array_equal(decoded, as_float)  # float frames stay float
    assert np.array_equal(Letterbox((32, 32))(decoded), img)  # the letterbox rounds them to uint8
    wide = frame(20, 50)
    assert np.array_equal(decode_image(wide.tobytes(), "RAW", width=50, height=20), wide)


def test_state_is_float32_and_zero_padded():
    req = observation(state_dim=14)
    obs = parse_observation(req, SPEC, FRAMES)
    assert obs.state.dtype == np.float32 and obs.state.shape == (32,)
    np.testing.assert_array_equal(obs.state[:14], np.asarray(req.robot_state.state, np.float32))
    assert not obs.state[14:].any()
    assert obs.images.shape == (2, 96, 96, 3) and obs.camera_mask.all()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r.ClearField("images"), "at least 2"),
        (lambda r: r.images.append(r.images[0]), "only 2 cameras"),
        (lambda r: setattr(r.images[0], "encoding", "bmp"), "unknown encoding"),
        (lambda r: setattr(r.images[1], "image_data", b"\xff\xd8\xff\xe0garbage"), "camera 1"),
        (lambda r: setattr(r.images[0], "image_data", r.images[0].image_data[:300]), "camera 0"),
        (lambda r: setattr(r.images[0], "encoding", "raw"), "raw"),
        (lambda r: r.robot_state.ClearField("state"), "robot_state: empty"),
        (lambda r: r.robot_state.state.extend([0.0] * 40), "refusing to truncate"),
        (lambda r: r.robot_state.state.__setitem__(3, float("nan")), "value 3"),
        (lambda r: r.robot_state.state.__setitem__(0, float("inf")), "finite"),
        (lambda r: setattr(r, "prompt", "x" * 65), "prompt"),
    ],
)
def test_bad_observations_are_refused_with_a_message(mutate, expected):
    req = observation()
    mutate(req)
    assert expected in rejected(parse_observation, req, SPEC, FRAMES)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(np.zeros((6000, 6000, 3), np.uint8), "PNG")  # tiny file, 36 MP
    assert len(bomb) < 200_000
    msg = rejected(decode_image, bomb, "png", limits=ImageLimits(max_pixels=24_000_000))
    assert "6000x6000" in msg


def test_raw_size_mismatch_and_half_given_shape():
    assert "needs 300 bytes" in rejected(decode_image, b"\x00" * 299, "raw", width=10, height=10)
    assert "width and height" in rejected(decode_image, b"\x00" * 300, "raw", width=10, height=0)
    assert "not square" in rejected(decode_image, np.zeros(2 * 3 * 3, np.float32).tobytes(), "raw")


def test_prefix_and_delay():
    req = observation()
    req.prefix_action.extend(pb.ActionVector(values=[i] * 8) for i in range(4))
    req.delay = 3
    obs = parse_observation(req, SPEC, FRAMES)
    assert obs.delay == 3 and obs.prefix.shape == (16, 8)
    np.testing.assert_array_equal(obs.prefix[:4, 0], [0, 1, 2, 3])

    req.delay = 5  # more than the 4 prefix rows
    assert "delay" in rejected(parse_observation, req, SPEC, FRAMES)
    req.delay = -1
    assert "delay" in rejected(parse_observation, req, SPEC, FRAMES)

    ragged = observation()
    ragged.prefix_action.extend([pb.ActionVector(values=[0] * 8), pb.ActionVector(values=[0] * 7)])
    assert "row 1" in rejected(parse_observation, ragged, SPEC, FRAMES)
    wide = observation()
    wide.prefix_action.append(pb.ActionVector(values=[0] * 9))
    assert "action dim is 8" in rejected(parse_observation, wide, SPEC, FRAMES)


def test_delay_without_prefix_is_ignored():
    req = observation()
    req.delay = 99
    assert parse_observation(req, SPEC, FRAMES).delay == 0


def test_batch_stacks_along_a_leading_axis():
    batch = ObservationBatch.stack([parse_observation(observation(seed=s), SPEC, FRAMES) for s in range(3)])
    assert len(batch) == 3
    assert batch.images.shape == (3, 2, 96, 96, 3) and batch.state.shape == (3, 32) and batch.prefix.shape == (3, 16, 8)


def test_png_with_alpha_and_grayscale_are_rgb():
    rgba = Image.fromarray(np.dstack([frame(40, 40), np.full((40, 40), 255, np.uint8)]), "RGBA")
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert decode_image(buf.getvalue(), "png").shape == (40, 40, 3)
    gray = encode(frame(40, 40)[..., 0], "JPEG")
    assert decode_image(gray, "jpeg").shape == (40, 40, 3)


def test_decode_cost_reads_pixel_counts_from_headers_only():
    from serve_app.images import UNKNOWN_COST, decode_cost_pixels

    img = frame(120, 160)
    jpeg, png = encode(img, "JPEG"), encode(img, "PNG")
    assert decode_cost_pixels(jpeg, "jpeg") == decode_cost_pixels(png, "png") == 120 * 160
    assert decode_cost_pixels(img.tobytes(), "raw", width=160, height=120) == 120 * 160
    assert decode_cost_pixels(np.zeros((8, 8, 3), np.float32).tobytes(), "raw") == 64
    # Anything that cannot be sized cheaply counts as expensive (it goes to the decode pool,
    # where decode_image refuses it with a precise message).
    assert decode_cost_pixels(b"\xff\xd8 not really a jpeg", "jpeg") == UNKNOWN_COST
    assert decode_cost_pixels(b"GIF89a....", "jpeg") == UNKNOWN_COST
    assert decode_cost_pixels(jpeg, "webp") == UNKNOWN_COST


def test_raw_float_outside_unit_range_is_refused_not_whitened():
    # OpenTau's own client sends raw frames as 0..255 floats: clipping them would give a white image.
    img = frame(16, 16).astype(np.float32)
    message = rejected(decode_image, img.tobytes(), "raw")
    assert "must be in [0, 1]" in message and "divide 0..255 values by 255" in message
    nearly = np.full((16, 16, 3), 1.0000005, np.float32)  # rounding noise is clipped
    assert decode_image(nearly.tobytes(), "raw").max() == 1.0
