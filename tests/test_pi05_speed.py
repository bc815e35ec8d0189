"""pi05's fast paths compute what the plain path computes: bucketed static shapes, fused projections, CUDA graphs.

The speed itself is benchmarks/pi05_cpu.py (OpenTau side by side, opt-in); its
--quick mode runs here so that it cannot rot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")

from serve_app.checkpoint import open_checkpoint
from serve_app.observation import ObservationBatch
from serve_app.policies import load_policy
from serve_app.policies.pi05.sampler import FlowSampler, flow_times
from serve_app.policies.pi05.static_shapes import Buckets, CudaGraphs, ExactShapes, pad_rows

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return load_policy(open_checkpoint(tiny_dir), "cpu")


def _batch(spec, n: int, seed: int = 0) -> ObservationBatch:
    rng = np.random.default_rng(seed)
    return ObservationBatch(
        images=rng.integers(0, 256, (n, spec.num_cameras, spec.image_height, spec.image_width, 3), dtype=np.uint8),
        camera_mask=np.ones((n, spec.num_cameras), bool),
        state=rng.uniform(-1, 1, (n, spec.state_dim)).astype(np.float32),
        prompts=["pick up the cube", "open the drawer and push the button", ""][:n],
        prefix=rng.normal(size=(n, spec.chunk_length, spec.action_dim)).astype(np.float32),
        delay=np.arange(n, dtype=np.int64) % (spec.max_delay + 1),
    )


def _noise(policy, n: int) -> np.ndarray:
    c = policy.config
    return np.random.default_rng(1).normal(size=(n, c.chunk_size, c.max_action_dim)).astype(np.float32)


def test_bucketed_static_shapes_give_the_unpadded_rows(policy):
    """Batch padded 3 -> 4 and prompts to prompt_max_length (the CUDA-graph shapes), run eagerly on the CPU."""
    batch, noise = _batch(policy.spec, 3), _noise(policy, 3)
    batch.camera_mask[1, 1] = False
    exact = policy.predict(batch, noise=noise)
    policy.shapes = Buckets(FlowSampler(policy.model), sizes=(1, 2, 4))
    try:
        assert policy.shapes.rows(3) == 4 and policy.shapes.rows(5) == 5  # beyond the largest: its own size
        bucketed = policy.predict(batch, noise=noise)
    finally:
        policy.shapes = ExactShapes(FlowSampler(policy.model))
    assert bucketed.shape == exact.shape
    np.testing.assert_allclose(bucketed, exact, rtol=0, atol=1e-6)


def test_warm_up_runs_every_bucket_once(policy, monkeypatch):
    policy.shapes = Buckets(FlowSampler(policy.model), sizes=(1, 2, 4))
    seen = []
    predict = policy.predict
    monkeypatch.setattr(policy, "predict", lambda batch, noise=None: seen.append(len(batch)) or predict(batch, noise))
    try:
        policy.warm_up()
        policy.warm_up(batch_sizes=(3,))
    finally:
        policy.shapes = ExactShapes(FlowSampler(policy.model))
    assert seen == [1, 2, 4, 4]


def test_padding_repeats_the_last_row():
    t = torch.arange(6).view(3, 2)
    assert pad_rows(t, 5).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert pad_rows(t, 3) is t


def test_projections_are_fused_once_and_the_originals_freed(policy):
    attn = policy.model.vlm.layers[0].self_attn
    assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")
    expert = policy.model.expert
    assert not hasattr(expert.layers[0].mlp, "gate_proj") and not hasattr(expert.norm, "dense")
    qkv = attn.qkv_proj.weight
    policy.model.fuse_projections()  # idempotent
    assert policy.model.vlm.layers[0].self_attn.qkv_proj.weight is qkv
    c = policy.config.arch.language
    assert qkv.shape == ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, c.hidden_size)


def test_flow_times_are_opentaus_float32_sequence():
    times = flow_times(10)
    assert len(times) == 11 and times[0] == 1.0 and times[-1] == 0.0
    t, dt = torch.tensor(1.0), torch.tensor(-0.1)
    for expected in times[:-1]:  # the same float32 accumulation as OpenTau's `time += dt`
        assert float(t) == expected
        t = t + dt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay_matches_eager(tiny_dir):
    policy = load_policy(open_checkpoint(tiny_dir), "cuda")
    assert isinstance(policy.shapes, CudaGraphs)
    batch, noise = _batch(policy.spec, 3), _noise(policy, 3)
    first = policy.predict(batch, noise=noise)  # captures bucket 4
    again = policy.predict(batch, noise=noise)  # replays it
    policy.shapes = Buckets(FlowSampler(policy.model))
    eager = policy.predict(batch, noise=noise)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, eager, rtol=0, atol=1e-2)  # bf16 network


def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "pi05_cpu.json"
    subprocess.run([sys.executable, "-m", "benchmarks.pi05_cpu", "--quick", "--out", str(out)], cwd=REPO_ROOT,
                   check=True, timeout=600)
    report = json.loads(out.read_text())
    ours = report["sides"]["ours"]
    assert ours["latency_s"]["median"] > 0 and len(ours["latency_s"]["samples"]) == report["rounds"]
    assert ours["aten_events_per_predict"] > 0 and ours["info"]["prefix_tokens"] > 0
    assert report["torch_threads"] >= 1 and report["config"]["batch"] == 1


def test_benchmark_says_plainly_when_opentau_is_absent(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.pi05_cpu", "--opentau-venv", str(tmp_path / "none")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "NOT RUN: no OpenTau environment" in done.stderr
