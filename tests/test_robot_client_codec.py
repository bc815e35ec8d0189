"""Image encoding, the advertised spec, error messages, backoff, and the package's import hygiene."""

from __future__ import annotations

import io
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from policy_wire import robot_inference_pb2 as pb
from robot_client.backoff import Backoff
from robot_client.errors import (
    AuthenticationFailed,
    IncompatibleServer,
    ObservationRejected,
    ServerUnavailable,
    TlsFailed,
    policy_error,
)
from robot_client.image_codec import EncodedFrame, as_rgb_uint8, decode_frame, encode_camera, encode_jpeg
from robot_client.policy_client import tls_credentials
from robot_client.server_spec import ServerSpec
from tests.payloads import encode, frame


def decoded_size(camera: pb.CameraImage) -> tuple[int, int]:
    return Image.open(io.BytesIO(camera.image_data)).size  # (w, h)


def test_frames_are_shrunk_to_fit_the_advertised_resolution_before_jpeg():
    camera = encode_camera(frame(480, 640), target_hw=(96, 96), quality=80)
    assert camera.encoding == "jpeg"
    assert decoded_size(camera) == (96, 72)  # fitted, aspect kept: the server letterboxes the rest
    full = encode_camera(frame(480, 640), target_hw=None, quality=80)
    assert decoded_size(full) == (640, 480)
    assert len(camera.image_data) * 5 < len(full.image_data)  # the point: bandwidth


def test_small_frames_are_not_enlarged_and_quality_is_configurable():
    small = frame(60, 80)
    assert decoded_size(encode_camera(small, target_hw=(96, 96))) == (80, 60)
    low = encode_camera(frame(96, 96), target_hw=(96, 96), quality=20)
    high = encode_camera(frame(96, 96), target_hw=(96, 96), quality=95)
    assert len(low.image_data) < len(high.image_data)


def test_jpeg_and_png_frames_pass_through_byte_for_byte():
    jpeg = encode(frame(480, 640), "JPEG", quality=70)
    png = encode(frame(40, 40), "PNG")
    for data, label in ((jpeg, "jpeg"), (png, "png")):
        for given in (data, EncodedFrame(data, label)):
            camera = encode_camera(given, target_hw=(96, 96))
            assert camera.image_data == data and camera.encoding == label  # not resized, not re-encoded


def test_unknown_bytes_and_odd_arrays_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="neither JPEG nor PNG"):
        encode_camera(b"GIF89a....")
    with pytest.raises(ValueError, match="shape"):
        encode_camera(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        encode_camera(np.full((4, 4, 3), np.nan, np.float32))


def test_camera_layouts_become_rgb_uint8():
    assert as_rgb_uint8(np.full((2, 2), 7, np.uint8)).shape == (2, 2, 3)
    assert as_rgb_uint8(np.zeros((2, 2, 4), np.uint8)).shape == (2, 2, 3)
    np.testing.assert_array_equal(as_rgb_uint8(np.full((1, 1, 3), 1.0, np.float32)), [[[255, 255, 255]]])
    np.testing.assert_array_equal(as_rgb_uint8(np.full((1, 1, 3), 65535, np.uint16)), [[[255, 255, 255]]])
    img = frame(32, 32)
    assert np.abs(decode_frame(EncodedFrame(encode_jpeg(img, 95), "jpeg")).astype(int) - img).mean() < 3


def test_spec_is_read_from_health_extension_fields():
    health = pb.HealthCheckResponse(
        healthy=True,
        status="SERVING",
        model_name="visuomotor_chunk",
        num_cameras=2,
        min_cameras=2,
        image_height=96,
        image_width=128,
        state_dim=32,
        action_dim=8,
        chunk_length=16,
        max_delay=16,
        max_prompt_bytes=2048,
        checkpoint_id="abc",
        replica_id="r1",
        warmed_up=True,
    )
    spec = ServerSpec.from_health(health)
    assert spec.image_hw == (96, 128) and (spec.state_dim, spec.action_dim, spec.chunk_length) == (32, 8, 16)
    assert spec.ready and spec.advertised and spec.max_delay == 16
    opentau = ServerSpec.from_health(pb.HealthCheckResponse(healthy=True, model_name="pi05"))
    assert opentau.ready and not opentau.advertised and opentau.image_hw is None
    opentau.check_robot(num_cameras=5, state_dim=100, prompt="x")  # nothing to check against


def test_spec_refuses_a_robot_the_model_cannot_serve_naming_each_problem():
    spec = ServerSpec(
        healthy=True,
        warmed_up=True,
        model_name="m",
        num_cameras=2,
        min_cameras=2,
        state_dim=32,
        action_dim=8,
        chunk_length=16,
        max_prompt_bytes=10,
    )
    with pytest.raises(IncompatibleServer) as info:
        spec.check_robot(num_cameras=3, state_dim=40, prompt="a very long prompt", joints=9)
    message = str(info.value)
    for needle in ("3 cameras", "at most 32", "9 joints", "18 bytes"):
        assert needle in message
    with pytest.raises(IncompatibleServer, match="at least 2"):
        spec.check_robot(num_cameras=1, state_dim=32, prompt="")


@pytest.mark.parametrize(
    "code, cls, needle",
    [
        (grpc.StatusCode.UNAVAILABLE, ServerUnavailable, "cannot reach the policy server at 10.0.0.9:50051"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, ServerUnavailable, "did not answer within 2.00 s"),
        (grpc.StatusCode.NOT_FOUND, ServerUnavailable, "serves no policy right now"),
        (grpc.StatusCode.UNAUTHENTICATED, AuthenticationFailed, "requires an API key"),
        (grpc.StatusCode.INVALID_ARGUMENT, ObservationRejected, "rejected the observation: camera 1: corrupt"),
        (grpc.StatusCode.UNIMPLEMENTED, IncompatibleServer, "does not implement RobotPolicyService"),
        (grpc.StatusCode.INTERNAL, ServerUnavailable, "failed the call"),
    ],
)
def test_grpc_failures_become_errors_that_say_what_to_do(code, cls, needle):
    err = policy_error(code, "camera 1: corrupt JPEG (12 bytes)", "10.0.0.9:50051", timeout_s=2.0)
    assert type(err) is cls and needle in str(err) and err.code == code
    assert err.transient == (cls is ServerUnavailable)


def test_a_refused_tls_handshake_is_a_configuration_error_not_a_gap():
    details = (
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:8443: Ssl handshake failed "
        "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:10000460:SSL routines:OPENSSL_internal:TLSV1_ALERT_CERTIFICATE_REQUIRED"
    )
    err = policy_error(grpc.StatusCode.UNAVAILABLE, details, "127.0.0.1:8443")
    assert isinstance(err, TlsFailed) and not err.transient and "--tls-cert/--tls-key" in str(err)
    plain = policy_error(grpc.StatusCode.UNAVAILABLE, "Connection refused", "127.0.0.1:8443")
    assert type(plain) is ServerUnavailable


def test_tls_files_are_checked_before_connecting(tmp_path):
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        tls_credentials(None, str(tmp_path / "robot.pem"), None)
    with pytest.raises(ValueError, match=r"cannot read the CA certificate \(--tls-ca\) .*missing.pem"):
        tls_credentials(str(tmp_path / "missing.pem"), None, None)
    assert tls_credentials(None, None, None) is None


def test_backoff_grows_to_its_cap_with_jitter_and_resets():
    b = Backoff(initial_s=0.05, max_s=0.4, jitter=0.0)
    assert [round(b.failure(), 3) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    b.reset()
    assert b.failure() == pytest.approx(0.05)
    jittery = Backoff(initial_s=1.0, jitter=0.2, max_s=1.0, rng=iter([0.0, 1.0]).__next__)
    assert (jittery.failure(), jittery.failure()) == (pytest.approx(0.8), pytest.approx(1.2))


def test_robot_client_never_imports_torch_ray_or_rclpy():
    code = (
        "import sys, robot_client, robot_client.__main__, robot_client.replay_robot, robot_client.ros2_node;"
        "bad = [m for m in ('torch', 'ray', 'rclpy') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
