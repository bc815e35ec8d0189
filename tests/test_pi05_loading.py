"""Streaming weights into their device and dtype (serve_app.checkpoint.load_weights_strict, pi05's load).

The tiny seeded pi05 of scripts/pi05_make_tiny_checkpoint.py, with the stream
window shrunk to a few hundred bytes so that tensors are read in row slices
across many openings of the file, as the full-size checkpoint's are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

pytest.importorskip("sentencepiece")

from serve_app import checkpoint as checkpoint_module
from serve_app.checkpoint import CheckpointError, load_weights_strict, open_checkpoint
from serve_app.observation import ObservationBatch
from serve_app.policies.pi05 import Pi05Config, Pi05Network, Pi05Policy, load
from serve_app.policies.pi05.policy import serving_dtype

VISION_EMBEDDINGS = ("embeddings.patch_embedding.", "embeddings.position_embedding.")


@pytest.fixture(autouse=True)
def small_window(monkeypatch):
    monkeypatch.setattr(checkpoint_module, "STREAM_WINDOW", 300)


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))


def _rewrite(ckpt: Path, edit) -> dict:
    state = load_file(str(ckpt / "model.safetensors"))
    state = edit(state) or state
    save_file(state, str(ckpt / "model.safetensors"))
    return state


def _batch_and_noise(policy, n: int = 2):
    spec, c = policy.spec, policy.config
    rng = np.random.default_rng(0)
    batch = ObservationBatch(
        images=rng.integers(0, 256, (n, spec.num_cameras, spec.image_height, spec.image_width, 3), dtype=np.uint8),
        camera_mask=np.ones((n, spec.num_cameras), bool),
        state=rng.uniform(-1, 1, (n, spec.state_dim)).astype(np.float32),
        prompts=[f"pick up cube {i}" for i in range(n)],
        prefix=np.zeros((n, spec.chunk_length, spec.action_dim), np.float32),
        delay=np.zeros(n, np.int64),
    )
    return batch, rng.normal(size=(n, c.chunk_size, c.max_action_dim)).astype(np.float32)


def _streamed(ckpt: Path, dtype: torch.dtype) -> Pi05Network:
    """What load() streams, before the policy wraps (and may restructure) the network."""
    with torch.device("meta"):
        net = Pi05Network(Pi05Config.from_checkpoint(open_checkpoint(ckpt)))
    load_weights_strict(net, ckpt / "model.safetensors", "pi05", "cpu", lambda name: serving_dtype(name, dtype))
    return net


def test_fp32_load_is_the_file_exactly_and_predicts_as_a_whole_file_load(tiny_dir):
    on_disk = load_file(str(tiny_dir / "model.safetensors"))
    loaded = _streamed(tiny_dir, torch.float32).state_dict()
    assert loaded.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], tensor), name

    policy = load(open_checkpoint(tiny_dir), "cpu")
    reference = Pi05Network(Pi05Config.from_checkpoint(open_checkpoint(tiny_dir)))
    reference.load_state_dict(on_disk, strict=True)
    batch, noise = _batch_and_noise(policy)
    expected = Pi05Policy(reference, policy.tokenizer, "cpu").predict(batch, noise=noise)
    np.testing.assert_array_equal(policy.predict(batch, noise=noise), expected)


def _expected_dtype(name: str) -> torch.dtype:
    fp32 = not name.startswith("model.") or any(k in name for k in VISION_EMBEDDINGS)
    return torch.float32 if fp32 else torch.bfloat16


def test_bf16_load_keeps_statistics_and_vision_embeddings_float32(tiny_dir):
    on_disk = load_file(str(tiny_dir / "model.safetensors"))
    streamed = _streamed(tiny_dir, torch.bfloat16).state_dict()
    for name, tensor in streamed.items():
        assert tensor.dtype == _expected_dtype(name) and tensor.device.type == "cpu", name
        assert torch.equal(tensor, on_disk[name].to(tensor.dtype)), name
    kept = [n for n in streamed if n.startswith("model.") and _expected_dtype(n) == torch.float32]
    assert len(kept) == 3  # patch embedding weight and bias, position embedding

    policy = load(open_checkpoint(tiny_dir), "cpu", dtype=torch.bfloat16)
    for name, tensor in policy.net.state_dict().items():  # also any tensor the policy derives after loading
        assert tensor.dtype == _expected_dtype(name), name
    assert policy.model.dtype == torch.bfloat16
    batch, noise = _batch_and_noise(policy)
    assert np.isfinite(policy.predict(batch, noise=noise)).all()


def test_bf16_on_disk_loads_into_fp32_upcast(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    state = _rewrite(ckpt, lambda s: {k: v if not k.startswith("model.") else v.bfloat16() for k, v in s.items()})
    for name, tensor in _streamed(ckpt, torch.float32).state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, state[name].float()), name


def test_infinite_statistic_is_refused(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    name = "normalize_inputs.buffer_state.std"
    _rewrite(ckpt, lambda s: s[name].__setitem__((0, 3), float("inf")))
    with pytest.raises(CheckpointError, match=f"normalisation statistic {name} is infinite"):
        load(open_checkpoint(ckpt), "cpu")


def test_truncated_weights_are_refused_by_file(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
        load(open_checkpoint(ckpt), "cpu")
    assert str(weights) in str(err.value)


def test_config_that_disagrees_is_refused_before_anything_is_allocated(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    config = json.loads((ckpt / "train_config.json").read_text())
    config["policy"]["paligemma_config"]["text_config"]["intermediate_size"] = 96
    (ckpt / "train_config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        net = Pi05Network(Pi05Config.from_checkpoint(open_checkpoint(ckpt)))
    with pytest.raises(CheckpointError, match="does not match policy 'pi05': .* shape mismatches"):
        load_weights_strict(net, ckpt / "model.safetensors", "pi05", "cpu", lambda name: torch.bfloat16)
    assert all(t.is_meta for t in net.state_dict().values())


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(()))  # 0-d: read whole, not in rows
        self.register_buffer("steps", torch.arange(4), persistent=False)


def test_tied_weights_stay_tied_and_a_cpu_module_is_filled_in_place(tmp_path):
    source = _Tied()
    nn.init.normal_(source.embed.weight)
    source.scale.fill_(2.5)
    path = tmp_path / "model.safetensors"
    save_file({k: v.clone() for k, v in source.state_dict().items()}, str(path))

    with torch.device("meta"):
        on_meta = _Tied()
    on_meta.steps = torch.arange(4)  # a non-persistent buffer is not in the file: it must be real already
    load_weights_strict(on_meta, path, "tied", "cpu", lambda name: torch.bfloat16)
    assert on_meta.head.weight is on_meta.embed.weight and on_meta.embed.weight.dtype == torch.bfloat16
    assert torch.equal(on_meta.embed.weight, source.embed.weight.bfloat16())
    assert on_meta.scale.item() == 2.5 and on_meta.scale.dtype == torch.bfloat16
    assert on_meta.steps.tolist() == [0, 1, 2, 3]

    on_cpu = _Tied()
    weight = on_cpu.embed.weight
    load_weights_strict(on_cpu, path, "tied")
    assert on_cpu.embed.weight is weight and on_cpu.head.weight is weight
    assert torch.equal(weight, source.embed.weight)
