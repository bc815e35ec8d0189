"""Hostile input: property-based tests of the trust boundary, and what leaves the server.

- `decode_image` and `parse_observation` (serve_app/images.py, parse.py) on arbitrary
  bytes, labels, raw shapes, corrupted and dimension-patched JPEG/PNG headers, NaN and
  infinity, huge dimensions: every input gives a valid observation or a RequestError
  with INVALID_ARGUMENT and a message, never another exception, and memory stays bounded.
- The same through the real app: never INTERNAL, never a traceback in the details.
- Nothing reachable from the wire is unpickled (a static check of serve_app/ and robot_client/).
- The API key never appears in any Ray log.
"""

from __future__ import annotations

import ast
import io
import resource
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.errors import RequestError
from serve_app.images import ImageLimits, decode_image
from serve_app.frames import Letterbox
from serve_app.observation import InputSpec
from serve_app.parse import parse_observation
from tests.conftest import REPO_ROOT
from tests.payloads import encode, frame, observation

SPEC = InputSpec(
    num_cameras=2, min_cameras=1, image_height=24, image_width=32, state_dim=8, action_dim=4,
    chunk_length=6, max_delay=6, max_prompt_bytes=64,
)
LIMITS = ImageLimits(max_pixels=1_000_000)
# One example may allocate (Python-side, numpy included) at most this much: the largest legal
# frame is 1 MP (3 MB uint8; 12 MB as OpenTau's float32 raw), plus the letterboxed copies.
MEMORY_BOUND = 64 * 2**20
INT32 = st.integers(-(2**31), 2**31 - 1)
FUZZ = settings(
    max_examples=250, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


# --- inputs ---------------------------------------------------------------


def _png(img: np.ndarray | Image.Image, mode: str | None = None) -> bytes:
    image = img if isinstance(img, Image.Image) else Image.fromarray(img)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img: np.ndarray, mode: str | None = None, **kw) -> bytes:
    image = Image.fromarray(img)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kw)
    return buf.getvalue()


_SMALL = frame(12, 16, seed=1)
VALID_IMAGES = [
    encode(_SMALL, "JPEG"),
    _jpeg(_SMALL, progressive=True),
    _jpeg(_SMALL, "L"),
    _jpeg(_SMALL, "CMYK"),
    _png(_SMALL),
    _png(_SMALL, "L"),
    _png(_SMALL, "P"),
    _png(_SMALL, "RGBA"),
    _png(_SMALL, "1"),
    _png(Image.fromarray(_SMALL[..., 0].astype(np.uint16) * 200)),  # 16-bit greyscale
]


def _patch_dims(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the size a PNG's IHDR or a JPEG's SOF claims, leaving the pixels as they are."""
    if data.startswith(b"\x89PNG"):  # IHDR at 8: length, type, 13 data bytes, CRC (kept valid)
        ihdr = b"IHDR" + struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF) + data[24:29]
        return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", height & 0xFFFF, width & 0xFFFF) + data[at + 9 :]
    return data


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_IMAGES)))
    how = draw(st.sampled_from(["truncate", "flip", "dims", "splice", "none"]))
    if how == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif how == "dims":
        side = st.one_of(st.integers(0, 4), st.integers(1, 70_000), st.just(2**32 - 1))
        data = bytearray(_patch_dims(bytes(data), draw(side), draw(side)))
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    return bytes(data)


@st.composite
def raw_float_frames(draw) -> bytes:
    """OpenTau's layout: float32 HWC RGB, square, including NaN, infinity, out-of-range values."""
    side = draw(st.integers(1, 12))
    extra = draw(st.sampled_from([0, 0, 0, 1, 4, 12]))
    values = draw(st.lists(st.floats(width=32), min_size=side * side * 3, max_size=side * side * 3))
    return np.asarray(values, "<f4").tobytes() + b"\x00" * extra


ENCODINGS = st.one_of(
    st.sampled_from(["jpeg", "jpg", "JPEG", " png ", "png", "raw", "RAW", "webp", "bmp", "", "pickle"]),
    st.text(max_size=12),
)
IMAGE_BYTES = st.one_of(st.binary(max_size=600), mutated_images(), raw_float_frames(), st.sampled_from(VALID_IMAGES))
DIMS = st.one_of(st.just(0), st.integers(-4, 40), INT32)


@st.composite
def cameras(draw) -> pb.CameraImage:
    camera = pb.CameraImage(image_data=draw(IMAGE_BYTES), encoding=draw(ENCODINGS))
    if draw(st.booleans()):
        camera.width, camera.height = draw(DIMS), draw(DIMS)
        if draw(st.booleans()) and 0 < camera.width * camera.height <= 4096:
            camera.image_data = bytes(camera.width * camera.height * 3)  # a well-sized raw uint8 frame
            camera.encoding = "raw"
    return camera


FLOATS = st.floats(width=32)  # NaN, +-infinity, subnormals, float32 extremes


@st.composite
def valid_cameras(draw) -> pb.CameraImage:
    if draw(st.booleans()):
        return pb.CameraImage(image_data=draw(st.sampled_from(VALID_IMAGES)), encoding=draw(st.sampled_from(["jpeg", "png"])))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    return pb.CameraImage(image_data=draw(st.binary(min_size=w * h * 3, max_size=w * h * 3)), encoding="raw", width=w, height=h)


@st.composite
def requests(draw, spec: InputSpec = SPEC) -> pb.ObservationRequest:
    """Mostly well-formed observations with some fields hostile, so every check is reached."""
    hostile = st.booleans()
    if draw(hostile):
        images = draw(st.lists(cameras(), max_size=spec.num_cameras + 1))
    else:
        images = draw(st.lists(valid_cameras(), min_size=max(spec.min_cameras, 1), max_size=spec.num_cameras))
    if draw(hostile):
        state = draw(st.one_of(
            st.lists(FLOATS, max_size=spec.state_dim + 2),
            st.integers(spec.state_dim + 1, 100_000).map(lambda n: [0.0] * n),  # huge dimension
        ))
    else:
        state = draw(st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=spec.state_dim))
    request = pb.ObservationRequest(
        images=images,
        robot_state=pb.RobotState(state=state),
        prompt=draw(st.text(max_size=spec.max_prompt_bytes + 8) if draw(hostile) else st.text(max_size=16)),
        request_id=draw(st.text(max_size=16)),
    )
    if draw(hostile):
        rows = draw(st.lists(st.lists(FLOATS, max_size=spec.action_dim + 1), max_size=spec.chunk_length + 1))
    else:
        width = draw(st.integers(1, spec.action_dim))
        rows = draw(st.lists(st.lists(st.floats(-1, 1, width=32), min_size=width, max_size=width),
                             max_size=spec.chunk_length))
    request.prefix_action.extend(pb.ActionVector(values=row) for row in rows)
    request.delay = draw(INT32 if draw(hostile) else st.integers(0, min(len(rows), spec.max_delay)))
    return request


# --- the decoder and the validator ------------------------------------------


@pytest.fixture()
def memory():
    """Peak Python-side allocation (numpy arrays included) of one call."""
    tracemalloc.start()

    def peak_of(fn, *args, **kw):
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        try:
            return fn(*args, **kw)
        finally:
            peak = tracemalloc.get_traced_memory()[1] - before
            assert peak < MEMORY_BOUND, f"one input allocated {peak / 2**20:.0f} MiB"

    yield peak_of
    tracemalloc.stop()


def assert_refusal(err: RequestError) -> None:
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (err.code, err.message)
    assert err.message and "Traceback" not in err.message and len(err.message) < 1000


@FUZZ
@given(data=IMAGE_BYTES, encoding=ENCODINGS, width=DIMS, height=DIMS, camera=st.integers(0, 3))
def test_decode_image_gives_a_frame_or_invalid_argument(memory, data, encoding, width, height, camera):
    try:
        frame_ = memory(decode_image, data, encoding, width=width, height=height, camera=camera,
                        target_hw=(SPEC.image_height, SPEC.image_width), limits=LIMITS)
    except RequestError as err:
        assert_refusal(err)
        assert err.message.startswith(f"camera {camera}: ")
        return
    assert frame_.dtype == np.uint8 and frame_.ndim == 3 and frame_.shape[2] == 3
    assert 0 < frame_.shape[0] * frame_.shape[1] <= LIMITS.max_pixels


@FUZZ
@given(request=requests())
def test_parse_observation_gives_a_valid_observation_or_invalid_argument(memory, request):
    try:
        obs = memory(parse_observation, request, SPEC, Letterbox((SPEC.image_height, SPEC.image_width)), LIMITS)
    except RequestError as err:
        assert_refusal(err)
        return
    assert obs.images.shape == (SPEC.num_cameras, SPEC.image_height, SPEC.image_width, 3)
    assert obs.images.dtype == np.uint8 and obs.camera_mask.sum() == len(request.images) >= 1
    assert obs.state.shape == (SPEC.state_dim,) and np.isfinite(obs.state).all()
    assert obs.prefix.shape == (SPEC.chunk_length, SPEC.action_dim) and np.isfinite(obs.prefix).all()
    assert 0 <= obs.delay <= min(len(request.prefix_action), SPEC.max_delay)
    assert len(obs.prompt.encode()) <= SPEC.max_prompt_bytes


@FUZZ
@given(side=st.integers(1, 65_500), other=st.integers(1, 65_500), encoding=st.sampled_from(["png", "jpeg"]))  # JPEG max side
def test_headers_claiming_huge_frames_are_refused_before_decoding(memory, side, other, encoding):
    assume(side * other > LIMITS.max_pixels)
    base = VALID_IMAGES[4] if encoding == "png" else VALID_IMAGES[0]
    with pytest.raises(RequestError) as info:
        memory(decode_image, _patch_dims(base, side, other), encoding, limits=LIMITS)
    assert_refusal(info.value)
    assert "over the limit" in info.value.message


def test_many_hostile_frames_do_not_grow_the_process():
    """Resident memory after 2,000 corrupt, truncated and bomb-headed frames stays where it was."""
    rng = np.random.default_rng(0)
    bomb = _patch_dims(VALID_IMAGES[4], 60_000, 60_000)

    def hostile(i):
        base = VALID_IMAGES[i % len(VALID_IMAGES)]
        cut = base[: rng.integers(1, len(base))]
        return [cut, bomb, rng.bytes(256), base[:20] + rng.bytes(len(base) - 20)][i % 4]

    for i in range(200):  # warm up allocator pools and decoder state
        try:
            decode_image(hostile(i), "jpeg", limits=LIMITS)
        except RequestError:
            pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for i in range(2000):
        try:
            decode_image(hostile(i), "png", limits=LIMITS)
        except RequestError:
            pass
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64, f"peak resident memory grew by {grown_mib:.0f} MiB"


# --- nothing on the wire is unpickled ------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}


def _unsafe_uses(path: Path, root: Path = REPO_ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name in ("eval", "exec") or name.endswith(("pickle.loads", "pickle.load", "yaml.unsafe_load")):
                found.append(name)
            elif name.endswith("torch.load") and kwargs.get("weights_only") != "True":
                found.append("torch.load without weights_only=True")
            elif name.endswith(("np.load", "numpy.load")) and kwargs.get("allow_pickle", "False") != "False":
                found.append("np.load with allow_pickle")
            elif name.endswith("yaml.load") and "SafeLoader" not in kwargs.get("Loader", ""):
                found.append("yaml.load without SafeLoader")
    return [f"{path.relative_to(root)}:{use}" for use in found]


def test_nothing_on_the_wire_is_ever_unpickled():
    """Wire bytes reach only protobuf (in Serve's proxy), simplejpeg, Pillow and numpy.frombuffer."""
    sources = [p for d in ("serve_app", "robot_client", "policy_wire") for p in sorted((REPO_ROOT / d).rglob("*.py"))]
    assert len(sources) > 20
    assert [use for p in sources for use in _unsafe_uses(p)] == []


def test_the_static_check_would_catch_pickle(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport numpy as np\nx = pickle.loads(b'')\ny = np.load('f', allow_pickle=True)\n")
    assert _unsafe_uses(bad, tmp_path) == ["bad.py:import pickle", "bad.py:pickle.loads", "bad.py:np.load with allow_pickle"]


# --- the real app: statuses, details, logs -----------------------------------------

LIVE_SPEC = InputSpec(
    num_cameras=2, min_cameras=2, image_height=96, image_width=96, state_dim=32, action_dim=8,
    chunk_length=16, max_delay=16,
)
API_KEY = "fuzz-secret-key-3c9a71e2"
WITH_KEY = (("x-api-key", API_KEY),)


@pytest.fixture(scope="module")
def keyed_app(serve_harness, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(API_KEY + "\n")
    return serve_harness.deploy({"api_key_file": str(key_file)}, metadata=WITH_KEY)


@pytest.fixture(scope="module")
def keyed_stub(keyed_app):
    with grpc.insecure_channel(keyed_app) as channel:
        yield pb_grpc.RobotPolicyServiceStub(channel)


@pytest.mark.serve
@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=requests(LIVE_SPEC))
def test_fuzzed_requests_to_the_real_app_never_give_internal_or_a_traceback(keyed_stub, request):
    try:
        response = keyed_stub.GetActionChunk(request, metadata=WITH_KEY, timeout=30)
        assert len(response.action_chunk) == 16
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert "Traceback" not in (err.details() or "") and 'File "' not in (err.details() or "")


@pytest.mark.serve
def test_fuzzed_messages_in_a_stream_are_answered_in_band_and_the_stream_survives(keyed_stub):
    examples = []

    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=requests(LIVE_SPEC))
    def collect(request):
        examples.append(request)

    collect()
    batch = examples + [observation(request_id="still-alive")]
    answers = list(keyed_stub.StreamActionChunks(iter(batch), metadata=WITH_KEY, timeout=60))
    assert len(answers) == len(batch)
    assert {a.error_code for a in answers} <= {0, grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    assert not any("Traceback" in a.error_message for a in answers)
    assert answers[-1].request_id == "still-alive" and len(answers[-1].action_chunk) == 16


@pytest.mark.serve
def test_bytes_that_are_not_a_protobuf_get_invalid_argument(keyed_app, keyed_stub):
    """A body that does not parse is refused with INVALID_ARGUMENT and a plain message
    (serve_app/wire_service.py; Serve alone answers UNKNOWN), and the server stays up."""
    rng = np.random.default_rng(7)
    with grpc.insecure_channel(keyed_app) as channel:
        raw = channel.unary_unary("/robot_inference.RobotPolicyService/GetActionChunk")  # bytes in, bytes out
        for size in (1, 7, 64, 4096):
            with pytest.raises(grpc.RpcError) as info:
                raw(b"\xff" + rng.bytes(size), metadata=WITH_KEY, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            details = info.value.details()
            assert details.startswith(f"request is not a valid robot_inference.ObservationRequest ({size + 1} bytes)")
            assert "Traceback" not in details
            # The API key still comes first.
            with pytest.raises(grpc.RpcError) as info:
                raw(b"\xff" + rng.bytes(size), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert keyed_stub.HealthCheck(pb.HealthCheckRequest(), metadata=WITH_KEY, timeout=10).healthy


@pytest.mark.serve
def test_the_api_key_never_appears_in_a_log(serve_harness, keyed_app, keyed_stub):
    # Authenticated and refused calls of every kind, and a bad observation that gets logged.
    keyed_stub.HealthCheck(pb.HealthCheckRequest(), metadata=WITH_KEY, timeout=10)
    keyed_stub.GetActionChunk(observation(), metadata=WITH_KEY, timeout=10)
    list(keyed_stub.StreamActionChunks(iter([observation()] * 2), metadata=WITH_KEY, timeout=10))
    wrong = "fuzz-wrong-key-0b6f"
    for metadata in ((), (("x-api-key", wrong),), (("x-api-key", API_KEY[:-1]),)):
        with pytest.raises(grpc.RpcError):
            keyed_stub.GetActionChunk(observation(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError):
            list(keyed_stub.StreamActionChunks(iter([observation()]), metadata=metadata, timeout=10))
    bad = observation()
    bad.robot_state.state[0] = float("nan")
    with pytest.raises(grpc.RpcError):
        keyed_stub.GetActionChunk(bad, metadata=WITH_KEY, timeout=10)
    time.sleep(1.0)  # let the replica's and the proxy's log handlers write

    logs_dir = serve_harness.logs_dir
    files = [p for p in Path(logs_dir).rglob("*") if p.is_file()]
    contents = {p: p.read_bytes() for p in files}
    # We are looking at the right place: the replica's log says auth is on, naming the file only.
    assert any(b"API key auth on (key from file" in c for c in contents.values()), logs_dir
    for secret in (API_KEY, API_KEY[:-1], wrong):
        leaks = [str(p) for p, c in contents.items() if secret.encode() in c]
        assert not leaks, f"{secret!r} found in {leaks}"
