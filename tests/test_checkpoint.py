"""Strict checkpoint loading on real files: every failure names the file and the keys."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve_app.app import build_app
from serve_app.checkpoint import CheckpointError, open_checkpoint
from serve_app.policies import load_policy, verify_checkpoint
from tests.conftest import DEMO_CHECKPOINT


@pytest.fixture()
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(DEMO_CHECKPOINT, d)
    return d


def rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def refused(directory, *fragments, pretrained_path=None):
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(open_checkpoint(directory, pretrained_path))
    for fragment in fragments:
        assert fragment in str(info.value)
    return str(info.value)


def test_demo_loads_and_predicts_in_robot_units(ckpt):
    policy = load_policy(open_checkpoint(ckpt), "cpu")
    assert policy.spec.chunk_length == 16 and policy.spec.action_dim == 8


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    refused(ckpt, str(ckpt / "model.safetensors"), "refusing to serve random weights")


def test_missing_config(tmp_path):
    refused(tmp_path, "train_config.json", "no such file")


def test_missing_weight(ckpt):
    rewrite_weights(ckpt, lambda s: s.pop("head.0.weight"))
    refused(ckpt, "model.safetensors", "1 missing weights", "head.0.weight")


def test_unexpected_weight(ckpt):
    rewrite_weights(ckpt, lambda s: s.__setitem__("extra.bias", torch.zeros(3)))
    refused(ckpt, "1 unexpected weights", "extra.bias")


def test_shape_mismatch(ckpt):
    rewrite_weights(ckpt, lambda s: s.__setitem__("state_mean", torch.zeros(31)))
    refused(ckpt, "shape mismatches", "state_mean (31,) != (32,)")


def test_config_that_disagrees_with_weights(ckpt):
    config = json.loads((ckpt / "train_config.json").read_text())
    config["max_action_dim"] = 7
    (ckpt / "train_config.json").write_text(json.dumps(config))
    refused(ckpt, "shape mismatches", "head.5")


def test_corrupt_weights_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    refused(ckpt, "not a readable safetensors file")


def test_unknown_policy_type_and_missing_keys(ckpt):
    config = json.loads((ckpt / "train_config.json").read_text())
    (ckpt / "train_config.json").write_text(json.dumps({**config, "policy": {**config["policy"], "type": "pi99"}}))
    refused(ckpt, "unknown policy.type 'pi99'", "visuomotor_chunk")
    del config["action_chunk"]
    (ckpt / "train_config.json").write_text(json.dumps(config))
    refused(ckpt, "missing required key 'action_chunk'")
    (ckpt / "train_config.json").write_text("{not json")
    refused(ckpt, "not readable JSON")


def test_pretrained_path_is_followed_only_when_no_weights_beside_the_config(ckpt, tmp_path):
    elsewhere = tmp_path / "weights"
    elsewhere.mkdir()
    shutil.move(ckpt / "model.safetensors", elsewhere / "model.safetensors")
    config = json.loads((ckpt / "train_config.json").read_text())
    config["policy"]["pretrained_path"] = str(elsewhere)
    (ckpt / "train_config.json").write_text(json.dumps(config))
    assert open_checkpoint(ckpt).weights_path == elsewhere / "model.safetensors"
    refused(ckpt, "no such file (from --policy.pretrained_path)", pretrained_path=tmp_path / "nowhere")


def test_the_app_refuses_to_build_on_a_bad_checkpoint(ckpt):
    rewrite_weights(ckpt, lambda s: s.pop("state_std"))
    with pytest.raises(CheckpointError, match="state_std"):
        build_app({"checkpoint": str(ckpt)})
    with pytest.raises(ValueError, match="unknown args"):
        build_app({"checkpoint": str(ckpt), "api_kye_env": "X"})


# --- the checkpoint id: a content hash, computed once per file version ---------


@pytest.fixture()
def id_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBOT_POLICY_SERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_checkpoint_id_is_the_content_hash_and_the_second_start_reads_no_weights(ckpt, id_cache, monkeypatch):
    import hashlib

    from serve_app import checkpoint_id as ids

    weights = ckpt / "model.safetensors"
    first = open_checkpoint(ckpt).checkpoint_id()
    assert first == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert list((id_cache / "checkpoint-ids").glob("*.json"))
    monkeypatch.setattr(ids, "content_id", lambda path: pytest.fail("re-read the weights of an unchanged file"))
    assert open_checkpoint(ckpt).checkpoint_id() == first


def test_checkpoint_id_changes_with_the_bytes_even_at_the_same_size_and_mtime(ckpt, id_cache):
    import os

    weights = ckpt / "model.safetensors"
    first = open_checkpoint(ckpt).checkpoint_id()
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor, as a fine-tune of one small statistic would
    with weights.open("r+b") as f:  # in place: same inode, same size
        f.write(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime put back
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert open_checkpoint(ckpt).checkpoint_id() != first


def test_checkpoint_id_changes_when_the_file_is_replaced(ckpt, tmp_path, id_cache):
    first = open_checkpoint(ckpt).checkpoint_id()
    other = tmp_path / "other.safetensors"
    state = load_file(str(ckpt / "model.safetensors"))
    state[next(iter(state))] = state[next(iter(state))] + 1
    save_file(state, str(other))
    other.replace(ckpt / "model.safetensors")
    assert open_checkpoint(ckpt).checkpoint_id() != first


def test_checkpoint_id_is_right_when_the_cache_cannot_be_written(ckpt, tmp_path, monkeypatch):
    import hashlib

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory would go")
    monkeypatch.setenv("ROBOT_POLICY_SERVE_CACHE", str(blocked))
    expected = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert open_checkpoint(ckpt).checkpoint_id() == expected


def test_preprocessing_names_are_checked_at_deploy(ckpt):
    assert load_policy(open_checkpoint(ckpt), "cpu").frames.name == "letterbox"
    with pytest.raises(CheckpointError, match="preprocessing 'opentau_server' is not one of policy 'visuomotor_chunk'"):
        verify_checkpoint(open_checkpoint(ckpt), "opentau_server")
    with pytest.raises(CheckpointError, match="preprocessing"):
        build_app({"checkpoint": str(ckpt), "preprocessing": "stretch"})
