"""pi05: strict loading, the prompt, real-time chunking, batching, and serving through the real app.

Every test runs on a tiny seeded pi05 made by scripts/pi05_make_tiny_checkpoint.py
(milliseconds per forward pass on a CPU). Parity with OpenTau itself is
tests/test_pi05_golden.py (OpenTau 0.14.0's own chunks, committed as fixtures by scripts/pi05_golden.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")

from payloads import chunk_array, encode, observation

from policy_wire import robot_inference_pb2 as pb
from policy_wire import robot_inference_pb2_grpc as pb_grpc
from serve_app.checkpoint import CheckpointError, open_checkpoint
from serve_app.errors import RequestError
from serve_app.observation import ObservationBatch
from serve_app.parse import parse_observation
from serve_app.policies import load_policy, verify_checkpoint
from serve_app.policies.pi05.tokenizer import discretize_state, pi05_prompts


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return load_policy(open_checkpoint(tiny_dir), "cpu")


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out)
    return out


def _batch(spec, n: int, seed: int = 0, delay=None, prompts=None) -> ObservationBatch:
    rng = np.random.default_rng(seed)
    return ObservationBatch(
        images=rng.integers(0, 256, (n, spec.num_cameras, spec.image_height, spec.image_width, 3), dtype=np.uint8),
        camera_mask=np.ones((n, spec.num_cameras), bool),
        state=rng.uniform(-1, 1, (n, spec.state_dim)).astype(np.float32),
        prompts=prompts or [f"pick up cube {i}" for i in range(n)],
        prefix=rng.normal(size=(n, spec.chunk_length, spec.action_dim)).astype(np.float32),
        delay=np.asarray(delay if delay is not None else [0] * n, dtype=np.int64),
    )


def _noise(policy, n: int, seed: int = 1) -> np.ndarray:
    c = policy.config
    return np.random.default_rng(seed).normal(size=(n, c.chunk_size, c.max_action_dim)).astype(np.float32)


# --- strict loading ------------------------------------------------------------


def test_tiny_checkpoint_verifies_and_advertises_its_spec(tiny_dir, policy):
    verify_checkpoint(open_checkpoint(tiny_dir))
    spec = policy.spec
    assert (spec.num_cameras, spec.image_height, spec.state_dim, spec.action_dim) == (2, 32, 8, 6)
    assert (spec.chunk_length, spec.max_delay) == (4, 2)


def _rewrite_weights(ckpt: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    edit(state)
    save_file(state, str(ckpt / "model.safetensors"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("model.action_in_proj.weight"), "1 missing weights (first: model.action_in_proj.weight)"),
        (
            lambda s: s.__setitem__("model.extra.weight", torch.zeros(2)),
            "1 unexpected weights (first: model.extra.weight)",
        ),
        (
            lambda s: s.__setitem__("model.action_out_proj.bias", torch.zeros(7)),
            "model.action_out_proj.bias (7,) != (8,)",
        ),
    ],
    ids=["missing", "unexpected", "misshapen"],
)
def test_mismatched_weights_are_refused_by_name(tiny_dir, tmp_path, edit, message):
    ckpt = _copy(tiny_dir, tmp_path)
    _rewrite_weights(ckpt, edit)
    for attempt in (
        lambda: verify_checkpoint(open_checkpoint(ckpt)),
        lambda: load_policy(open_checkpoint(ckpt), "cpu"),
    ):
        with pytest.raises(CheckpointError, match="does not match policy 'pi05'") as err:
            attempt()
        assert message in str(err.value)


def test_missing_tokenizer_says_where_to_put_it(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("PI05_TOKENIZER", raising=False)
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "tokenizer.model").unlink()
    verify_checkpoint(open_checkpoint(ckpt))  # weights alone are fine
    with pytest.raises(CheckpointError, match="tokenizer not found") as err:
        load_policy(open_checkpoint(ckpt), "cpu")
    assert str(ckpt / "tokenizer.model") in str(err.value)
    assert "never downloaded" in str(err.value)


def test_tokenizer_path_in_config_is_used(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    elsewhere = tmp_path / "tokenizers" / "paligemma"
    elsewhere.mkdir(parents=True)
    (ckpt / "tokenizer.model").rename(elsewhere / "tokenizer.model")
    config = json.loads((ckpt / "train_config.json").read_text())
    config["policy"]["tokenizer_path"] = str(elsewhere)
    (ckpt / "train_config.json").write_text(json.dumps(config))
    assert load_policy(open_checkpoint(ckpt), "cpu").tokenizer.path == elsewhere / "tokenizer.model"


def test_full_size_expected_weights_are_cheap_and_complete(tiny_dir, tmp_path):
    """Without size overrides the config is OpenTau's pi05: ~3.6B tensors' shapes, built on meta."""
    from serve_app.policies.pi05 import expected_weights

    ckpt = _copy(tiny_dir, tmp_path)
    config = json.loads((ckpt / "train_config.json").read_text())
    for key in ("paligemma_config", "gemma_expert_config", "discrete_action_vocab_size"):
        config["policy"].pop(key)
    config.update(resolution=[224, 224], max_state_dim=32, max_action_dim=32)
    config["policy"].update(
        proj_width=1024,
        input_features={"state": {"type": "STATE", "shape": [32]}},
        output_features={"actions": {"type": "ACTION", "shape": [32]}},
    )
    (ckpt / "train_config.json").write_text(json.dumps(config))
    shapes = expected_weights(open_checkpoint(ckpt))
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert 3.3e9 < total < 3.7e9
    assert shapes["model.paligemma_with_expert.paligemma.lm_head.weight"] == (257152, 2048)
    assert shapes["model.paligemma_with_expert.gemma_expert.model.layers.17.input_layernorm.dense.weight"] == (
        3072,
        1024,
    )


# --- the prompt -----------------------------------------------------------------


def test_discrete_state_prompt_format():
    state = torch.tensor([[-1.0, 0.0, 0.999, 1.0, 2.5, -0.0039]])
    bins = discretize_state(state)
    assert bins == ["0 128 255 255 255 127"]
    assert pi05_prompts(["pick up the cube"], bins) == ["Task: pick up the cube, State: 0 128 255 255 255 127;\n"]
    assert pi05_prompts(["wave"], None) == ["Task: wave, "]


def test_prompt_tokens_start_with_bos_and_are_right_padded(policy):
    tok = policy.tokenizer
    ids, mask = tok(["Task: a, State: 1 2;\n", ""])
    assert ids.shape == (2, policy.config.prompt_max_length)
    assert ids[0, 0] == tok.bos_id == 2
    n = int(mask[0].sum())
    assert ids[0, 1:n].tolist() == tok.encode("Task: a, State: 1 2;\n")
    assert not mask[0, n:].any() and (ids[0, n:] == 0).all()
    assert mask[1].tolist()[:2] == [True, False]  # empty prompt: <bos> only


# --- real-time chunking, batching -------------------------------------------


def test_rtc_prefix_rows_are_returned_exactly(policy):
    """The engine pins them for every policy (serve_app/rtc.py); pi05 also samples the rest towards them."""
    import asyncio

    from serve_app.engine import Engine

    request = observation(num_cameras=2, state_dim=8)
    prefix = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
    request.prefix_action.extend(pb.ActionVector(values=row) for row in prefix.tolist())
    request.delay = 2
    actions = asyncio.run(Engine(policy).submit(request, None)).actions
    assert actions.shape == (4, 6) and actions.dtype == np.float32
    np.testing.assert_array_equal(actions[:2], prefix[:2])
    assert not np.allclose(actions[2:], prefix[2:])


def test_delay_beyond_policy_maximum_is_invalid_argument(policy):
    request = observation(num_cameras=2, state_dim=8)
    request.prefix_action.extend([pb.ActionVector(values=[0.1] * 6) for _ in range(4)])
    request.delay = 3  # max_delay is 2
    with pytest.raises(RequestError) as err:
        parse_observation(request, policy.spec, policy.frames)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    request.delay = 2
    assert parse_observation(request, policy.spec, policy.frames).delay == 2


def test_batched_predict_equals_per_sample_predict(policy):
    prompts = ["pick up the cube", "open the drawer and push the button", ""]
    batch = _batch(policy.spec, 3, seed=4, delay=[2, 0, 1], prompts=prompts)
    batch.camera_mask[1, 1] = False  # a robot with one camera missing
    noise = _noise(policy, 3, seed=5)
    together = policy.predict(batch, noise=noise)
    for i in range(3):
        one = ObservationBatch(
            images=batch.images[i : i + 1],
            camera_mask=batch.camera_mask[i : i + 1],
            state=batch.state[i : i + 1],
            prompts=[prompts[i]],
            prefix=batch.prefix[i : i + 1],
            delay=batch.delay[i : i + 1],
        )
        np.testing.assert_allclose(policy.predict(one, noise=noise[i : i + 1])[0], together[i], rtol=0, atol=1e-5)


def test_a_missing_camera_is_a_black_frame_the_model_sees_as_in_opentau_training(policy):
    batch = _batch(policy.spec, 1)
    noise = _noise(policy, 1)
    full = policy.predict(batch, noise=noise)
    batch.images[0, 1] = 0  # what parse_observation leaves for a camera not sent
    black_sent = policy.predict(batch, noise=noise)
    batch.camera_mask[0, 1] = False
    missing = policy.predict(batch, noise=noise)
    np.testing.assert_array_equal(missing, black_sent)  # attended, not masked (golden: test_pi05_golden.py)
    assert not np.allclose(missing, full)


def test_frames_are_resized_as_opentau_trains_by_default_and_stretched_on_request(tiny_dir, policy):
    request = observation(num_cameras=1, state_dim=8)
    request.images[0].CopyFrom(pb.CameraImage(image_data=encode(np.full((48, 64, 3), 255, np.uint8), "PNG"),
                                              encoding="png"))
    assert policy.frames.name == "training"  # the default: as OpenTau 0.14.0 trains pi05
    trained = parse_observation(request, policy.spec, policy.frames)
    assert trained.images.dtype == np.float32 and trained.images.shape == (2, 32, 32, 3)
    assert (trained.images[0, :8] == 0).all() and (trained.images[0, 8:] == 1).all()  # 24 rows, padded on top
    assert not trained.camera_mask[1] and not trained.images[1].any()  # the camera not sent: black, masked
    stretch = load_policy(open_checkpoint(tiny_dir), "cpu", preprocessing="opentau_server")
    assert stretch.frames.name == "opentau_server"
    stretched = parse_observation(request, stretch.spec, stretch.frames)
    np.testing.assert_allclose(stretched.images[0], 1.0, atol=1e-6)  # OpenTau's server: stretched, no padding
    noise = _noise(policy, 1)
    chunks = [p.predict(ObservationBatch.stack([o]), noise=noise) for p, o in ((policy, trained), (stretch, stretched))]
    assert not np.allclose(*chunks)  # the choice reaches the model


# --- through the real app ---------------------------------------------------------


@pytest.mark.serve
def test_tiny_pi05_served_through_the_app(serve_harness, tiny_dir):
    address = serve_harness.deploy(args={"checkpoint": str(tiny_dir)})
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RobotPolicyServiceStub(channel)
        health = stub.HealthCheck(pb.HealthCheckRequest(), timeout=30)
        assert health.healthy and health.model_name == "pi05"
        request = observation(num_cameras=2, state_dim=8, request_id="r1")
        request.prefix_action.extend([pb.ActionVector(values=[0.25] * 6), pb.ActionVector(values=[-0.5] * 6)])
        request.delay = 2
        response = stub.GetActionChunk(request, timeout=60)
        chunk = chunk_array(response)
        assert response.request_id == "r1"
        assert chunk.shape == (4, 6) and np.isfinite(chunk).all()
        np.testing.assert_array_equal(chunk[:2], [[0.25] * 6, [-0.5] * 6])
        request.delay = 3
        with pytest.raises(grpc.RpcError) as err:
            stub.GetActionChunk(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
