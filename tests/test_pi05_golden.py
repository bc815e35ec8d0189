"""pi05 reproduces OpenTau 0.14.0's own action chunks (tests/fixtures/pi05_golden, made by scripts/pi05_golden.py).

Every case takes the whole request path: ObservationRequest bytes -> parse_observation (decode,
then the policy's frame transform) -> ObservationBatch.stack -> predict with the case's noise ->
pin_prefix. The chunk must be OpenTau's to 1e-5 in fp32, every row, for both of pi05's frame
transforms, one case at a time and all cases in one batch. Narrower checks say where a
difference comes from: the wire bytes, the decoded pixels, the transformed frames.

The fixtures are committed; without them (or without sentencepiece) this test fails, it never
skips. Regenerate them with `python scripts/pi05_golden.py` where OpenTau's environment exists.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from policy_wire import robot_inference_pb2 as pb
from serve_app.checkpoint import open_checkpoint
from serve_app.images import decode_image
from serve_app.observation import ObservationBatch
from serve_app.parse import parse_observation
from serve_app.policies import load_policy
from serve_app.policies.pi05.policy import to_bf16_keeping_vision_embeddings
from serve_app.rtc import pin_prefix

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "pi05_golden"
TRANSFORMS = ("training", "opentau_server")
FP32_TOL = 1e-5
FRAME_TOL = 1e-6
BF16_REL_TOL = 2e-2  # max abs diff / max |chunk|; OpenTau's own bf16 is ~4e-3 from its fp32
MAX_FIXTURE_BYTES = 3_000_000


def _golden_module():
    spec = importlib.util.spec_from_file_location("pi05_golden", REPO_ROOT / "scripts" / "pi05_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


golden = _golden_module()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny network gains nothing from intra-op threads; on a busy shared CPU they cost 30x (spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fixture() -> dict:
    needed = ["cases.json", "golden.npz", "checkpoint/train_config.json", "checkpoint/model.safetensors"]
    missing = [name for name in needed if not (FIXTURES / name).is_file()]
    if missing:
        pytest.fail(f"golden fixtures missing in {FIXTURES}: {missing}; run scripts/pi05_golden.py (needs OpenTau)")
    manifest = golden.load_cases(FIXTURES)
    with np.load(FIXTURES / "golden.npz") as arrays:
        manifest["arrays"] = {k: arrays[k] for k in arrays.files}
    return manifest


@pytest.fixture(scope="module")
def policies(fixture) -> dict:
    checkpoint = open_checkpoint(FIXTURES / "checkpoint")
    return {t: load_policy(checkpoint, "cpu", preprocessing=t) for t in TRANSFORMS}


def _cases(fixture, transform):
    return [(i, c) for i, c in enumerate(fixture["cases"]) if transform in c["transforms"]]


def _from_the_wire(case) -> pb.ObservationRequest:
    return pb.ObservationRequest.FromString(golden.wire_request(case, FIXTURES).SerializeToString())


def _run(policy, fixture, indexed_cases):
    """Our chunks for the cases, in one predict: (B, chunk, action_dim), and the batch."""
    batch = ObservationBatch.stack(
        [parse_observation(_from_the_wire(case), policy.spec, policy.frames) for _, case in indexed_cases]
    )
    noise = fixture["arrays"]["noise"][[i for i, _ in indexed_cases]]
    return pin_prefix(policy.predict(batch, noise=noise), batch)


def _sent_prefix(case, action_dim) -> np.ndarray:
    rows = np.zeros((case["delay"], action_dim), np.float32)
    if case["prefix"] is not None and case["delay"]:
        sent = np.asarray(case["prefix"][: case["delay"]], np.float32)
        rows[:, : sent.shape[1]] = sent
    return rows


def _differences(ours, theirs, indexed_cases) -> tuple[float, list[str]]:
    """Max abs diff over all cases, and one line per case over FP32_TOL or with an RTC row not as sent."""
    worst, problems = 0.0, []
    for (i, case), mine, ref in zip(indexed_cases, ours, theirs):
        diff = np.abs(mine - ref)
        worst = max(worst, float(diff.max()))
        d = case["delay"]
        if not np.array_equal(mine[:d], _sent_prefix(case, mine.shape[1])):
            problems.append(f"{case['id']}: the first {d} rows (delay) are not the prefix as sent")
        if diff.max() > FP32_TOL:
            rows = np.flatnonzero(diff.max(1) > FP32_TOL).tolist()
            forms = [f"{c['frame']}/{c['form']}" for c in case["cameras"]]
            problems.append(
                f"{case['id']} ({', '.join(forms)}; delay {d}): max diff {diff.max():.3e}, rows over {FP32_TOL:g}: {rows}"
            )
    return worst, problems


# --- the fixture itself ---------------------------------------------------------------------------


def test_fixtures_were_made_by_opentau_0_14_0_and_stay_small(fixture):
    assert fixture["versions"]["opentau"] == "0.14.0"
    assert {"torch", "pillow", "transformers"} <= fixture["versions"].keys()
    size = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert size < MAX_FIXTURE_BYTES, f"{FIXTURES} is {size} bytes"
    assert {t for c in fixture["cases"] for t in c["transforms"]} == set(TRANSFORMS)
    delays = {c["delay"] for c in fixture["cases"] if c["prefix"] is not None}
    assert delays == set(range(fixture["max_delay"] + 1)), delays
    assert any(len(c["cameras"]) < 2 for c in fixture["cases"]), "no case with a missing camera"


def test_requests_are_the_bytes_opentau_was_given(fixture):
    for case in fixture["cases"]:
        request = golden.wire_request(case, FIXTURES)
        for camera, image in zip(case["cameras"], request.images):
            assert hashlib.sha256(image.image_data).hexdigest() == camera["sha256"], (case["id"], camera["frame"])
        assert hashlib.sha256(request.SerializeToString()).hexdigest() == case["request_sha256"], case["id"]


# --- where a difference would come from: decoding, then the transform -------------------------------


def test_jpeg_and_png_decode_to_the_pixels_opentau_decodes(fixture):
    """Our decoder (libjpeg-turbo via simplejpeg, Pillow for PNG) gives Pillow's pixels in OpenTau's env."""
    wrong = []
    for case in fixture["cases"]:
        for camera, image in zip(case["cameras"], _from_the_wire(case).images):
            if camera["form"] in ("jpeg", "png"):
                pixels = decode_image(image.image_data, image.encoding)
                if hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest() != camera["pil_decoded_sha256"]:
                    wrong.append(f"{case['id']}: {camera['file']}")
    assert not wrong, f"decoded pixels differ from Pillow's in OpenTau's environment: {wrong}"


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_frames_transform_gives_opentaus_model_input(fixture, policies, transform):
    frames = policies[transform].frames
    assert (frames.name, frames.target_hw) == (transform, tuple(fixture["resolution"]))
    kept = [k for k in fixture["kept_frames"] if k["transform"] == transform]
    assert kept
    for k in kept:
        case = next(c for c in fixture["cases"] if c["id"] == k["case"])
        image = _from_the_wire(case).images[k["camera"]]
        ours = frames(decode_image(image.image_data, image.encoding, width=image.width, height=image.height))
        theirs = fixture["arrays"][f"frame_{transform}_{k['case']}_{k['camera']}"]
        theirs = theirs.astype(np.float32) / 255.0 if theirs.dtype == np.uint8 else theirs
        assert ours.shape == theirs.shape and ours.dtype == np.float32, (k, ours.shape, ours.dtype)
        diff = float(np.abs(ours - theirs).max())
        assert diff <= FRAME_TOL, f"{transform} {k['case']} camera {k['camera']}: max diff {diff:.3e}"


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_frames_at_the_models_size_pass_untouched(fixture, policies, transform):
    frames, hw = policies[transform].frames, tuple(fixture["resolution"])
    for case in fixture["cases"]:
        for camera, image in zip(case["cameras"], _from_the_wire(case).images):
            decoded = decode_image(image.image_data, image.encoding, width=image.width, height=image.height)
            if decoded.shape[:2] == hw and transform in case["transforms"]:
                sent = decoded.astype(np.float32) / 255.0 if decoded.dtype == np.uint8 else decoded
                assert np.array_equal(frames(decoded), sent), (transform, case["id"], camera["file"])


# --- the whole request path -----------------------------------------------------------------------


def _opentau_chunks(fixture, transform: str, cases) -> np.ndarray:
    """OpenTau's chunks; for a camera not sent, those of a black frame the model attends to, as OpenTau's
    training data and its server give it (its prepare_images would drop the camera's tokens instead)."""
    index = [i for i, _ in cases]
    chunks = fixture["arrays"][f"chunks_{transform}"][index].copy()
    attended = fixture["arrays"][f"chunks_{transform}_black_attended"][index]
    known = ~np.isnan(attended).all(axis=(1, 2))
    chunks[known] = attended[known]
    return chunks


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_each_case_matches_opentau(fixture, policies, transform):
    cases = _cases(fixture, transform)
    theirs = _opentau_chunks(fixture, transform, cases)
    ours = np.concatenate([_run(policies[transform], fixture, [case]) for case in cases])
    worst, problems = _differences(ours, theirs, cases)
    assert not problems, f"{transform}: ours vs OpenTau 0.14.0 (max diff {worst:.3e}):\n" + "\n".join(problems)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_all_cases_in_one_batch_match_opentau(fixture, policies, transform):
    cases = _cases(fixture, transform)
    theirs = _opentau_chunks(fixture, transform, cases)
    worst, problems = _differences(_run(policies[transform], fixture, cases), theirs, cases)
    assert not problems, f"{transform}, batch of {len(cases)} (max diff {worst:.3e}):\n" + "\n".join(problems)


def test_bf16_network_stays_close_to_opentaus_bf16(fixture):
    """The network in bf16 (SigLIP's embeddings fp32), as both serve on a GPU: a relative bound, not parity."""
    policy = load_policy(open_checkpoint(FIXTURES / "checkpoint"), "cpu", preprocessing="training")
    to_bf16_keeping_vision_embeddings(policy.model)
    cases = [c for c in _cases(fixture, "training") if len(c[1]["cameras"]) == 2]  # bf16 chunks: all cameras sent
    theirs = fixture["arrays"]["chunks_training_bf16"][[i for i, _ in cases]]
    ours = _run(policy, fixture, cases)
    relative = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert relative <= BF16_REL_TOL, f"bf16: max diff / max |chunk| = {relative:.3e}"
