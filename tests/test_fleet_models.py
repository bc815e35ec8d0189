"""Several checkpoints in one replica, the deployment class on its own (no Ray, no gRPC): real checkpoints on disk.

What a robot sees through Serve is in tests/test_fleet.py; here, the rules under it: which name a
config gives which checkpoint, least recently used eviction with the default pinned, a checkpoint
that breaks after the deploy, and the bound on robot labels."""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from policy_wire import robot_inference_pb2 as pb
from serve_app.app import build_app
from serve_app.checkpoint import CheckpointError
from serve_app.metrics import NO_ROBOT, OTHER_ROBOTS, RobotLabels
from serve_app.model_table import model_table
from serve_app.replica import RobotPolicyReplica
from tests.conftest import DEMO_CHECKPOINT, variant_checkpoint
from tests.payloads import CallContext, chunk_array, observation


def checkpoint_id(directory) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    return {name: variant_checkpoint(root / name, seed) for name, seed in (("b", 1), ("c", 2))}


def make_replica(variants, capacity=2, **extra):
    return RobotPolicyReplica.func_or_class(
        checkpoint=str(DEMO_CHECKPOINT), default_model="demo", api_key_env=None, max_models_per_replica=capacity,
        checkpoints={name: str(path) for name, path in variants.items()}, **extra,
    )


def chunk(replica, model=None, seed=0):
    context = CallContext(**({"multiplexed_model_id": model} if model else {}))
    response = asyncio.run(replica.GetActionChunk(observation(seed=seed), grpc_context=context))
    return response, context


# --- which name is which checkpoint -------------------------------------------


def test_the_single_checkpoint_is_the_default_and_names_resolve():
    table = model_table("a", {"b": "b"}, None)
    assert table.default == "default" and table.names == ["b", "default"] and table.resolve("") == "default"
    assert model_table("a", {"b": "b"}, "a").resolve(None) == "a"
    assert model_table(None, {"only": "x"}, None).default == "only"
    with pytest.raises(ValueError, match="default_model is required"):
        model_table(None, {"b": "b", "c": "c"}, None)
    with pytest.raises(ValueError, match="not in args.checkpoints"):
        model_table(None, {"b": "b"}, "z")
    with pytest.raises(ValueError, match="name the default once"):
        model_table("a", {"default": "elsewhere"}, None)
    with pytest.raises(ValueError, match="model name"):
        model_table(None, {"has space": "x"}, None)
    with pytest.raises(ValueError, match="args.checkpoint or args.checkpoints is required"):
        model_table(None, None, None)
    with pytest.raises(Exception) as info:
        table.resolve("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "b, default" in info.value.message


def test_a_broken_checkpoint_stops_the_deploy_and_names_itself(variants, tmp_path):
    broken = variant_checkpoint(tmp_path / "broken", seed=3)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"model 'broken': .*broken/model.safetensors: not a readable"):
        build_app({"checkpoint": str(DEMO_CHECKPOINT), "checkpoints": {"b": str(variants["b"]), "broken": str(broken)}})
    with pytest.raises(ValueError, match="max_models_per_replica"):
        build_app({"checkpoint": str(DEMO_CHECKPOINT), "checkpoints": {"b": str(variants["b"])},
                   "max_models_per_replica": 1})


# --- serving several models from one replica ----------------------------------


def test_each_model_answers_with_its_own_weights_and_id(variants):
    replica = make_replica(variants, capacity=3)
    chunks = {}
    for model, directory in (("demo", DEMO_CHECKPOINT), ("b", variants["b"]), ("c", variants["c"]), (None, DEMO_CHECKPOINT)):
        response, context = chunk(replica, model)
        assert context.code is None, context.details
        assert response.checkpoint_id == checkpoint_id(directory)
        chunks[model] = chunk_array(response)
    np.testing.assert_allclose(chunks[None], chunks["demo"], atol=1e-6)  # no id: the default
    assert not np.allclose(chunks["demo"], chunks["b"]) and not np.allclose(chunks["b"], chunks["c"])


def test_least_recently_used_model_is_evicted_and_the_default_stays(variants):
    replica = make_replica(variants, capacity=2)  # the default + one more
    models = replica._models
    assert models.names == ["demo"]
    chunk(replica, "b")
    first_b = models.cached("b")
    assert models.names == ["demo", "b"] and first_b.load_ms > 0
    chunk(replica, "c")
    assert models.names == ["demo", "c"] and models.cached("b") is None
    chunk(replica, "demo")  # the default never costs a slot nor a reload
    assert models.names == ["demo", "c"]
    response, _ = chunk(replica, "b")
    assert models.names == ["demo", "b"] and models.cached("b") is not first_b  # loaded again: a cold start
    assert response.checkpoint_id == checkpoint_id(variants["b"])


def test_room_for_three_keeps_the_recently_used(variants, tmp_path):
    d = variant_checkpoint(tmp_path / "d", seed=4)
    replica = make_replica({**variants, "d": d}, capacity=3)
    for model in ("b", "c", "b", "d"):  # c is the least recently used when d needs room
        chunk(replica, model)
    assert replica._models.names == ["demo", "d", "b"]


def test_unknown_model_is_not_found_with_the_names(variants):
    replica = make_replica(variants)
    response, context = chunk(replica, "nope")
    assert context.code == grpc.StatusCode.NOT_FOUND and not response.action_chunk
    assert "'nope'" in context.details and "b, c, demo" in context.details
    health = CallContext(multiplexed_model_id="nope")
    asyncio.run(replica.HealthCheck(pb.HealthCheckRequest(), grpc_context=health))
    assert health.code == grpc.StatusCode.NOT_FOUND


def test_a_checkpoint_broken_after_deploy_is_failed_precondition_and_the_others_serve(variants, tmp_path):
    broken = variant_checkpoint(tmp_path / "later", seed=5)
    replica = make_replica({"b": variants["b"], "later": broken}, capacity=2)
    chunk(replica, "b")
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # after the deploy's check
    for _ in range(2):  # the second is answered from the recorded failure, not another load
        response, context = chunk(replica, "later")
        assert context.code == grpc.StatusCode.FAILED_PRECONDITION, context.code
        assert "model 'later' cannot be loaded" in context.details and "model.safetensors" in context.details
    assert replica._models.names == ["demo", "b"]  # a checkpoint that cannot load evicts nothing
    for model in ("demo", "b", None):
        response, context = chunk(replica, model)
        assert context.code is None and len(response.action_chunk) == 16
    probe = CallContext()
    asyncio.run(replica.Check(health_pb2.HealthCheckRequest(service="later"), grpc_context=probe))
    assert asyncio.run(replica.Check(health_pb2.HealthCheckRequest(service="later"), grpc_context=probe)).status \
        == health_pb2.HealthCheckResponse.NOT_SERVING
    assert asyncio.run(replica.Check(health_pb2.HealthCheckRequest(service="b"), grpc_context=CallContext())).status \
        == health_pb2.HealthCheckResponse.SERVING
    variant_checkpoint(broken, seed=5)  # mended: its files changed, so the next call loads at once
    response, context = chunk(replica, "later")
    assert context.code is None and response.checkpoint_id == checkpoint_id(broken)


def test_health_check_answers_for_the_model_named(variants):
    replica = make_replica(variants)
    for model, directory in (("b", variants["b"]), (None, DEMO_CHECKPOINT)):
        context = CallContext(**({"multiplexed_model_id": model} if model else {}))
        health = asyncio.run(replica.HealthCheck(pb.HealthCheckRequest(), grpc_context=context))
        assert context.code is None and health.healthy and health.chunk_length == 16
        assert health.checkpoint_id == checkpoint_id(directory)
    assert "b" in replica._models.names  # a robot's HealthCheck warms its model


def test_stream_keeps_its_model_and_marks_it_used(variants):
    replica = make_replica(variants, capacity=2)

    async def run():
        async def requests():
            for i in range(3):
                yield observation(seed=i, request_id=f"s{i}")
                # Another robot's call for c in the middle: room for one, so b is evicted from the cache ...
                if i == 0:
                    await replica.GetActionChunk(observation(), grpc_context=CallContext(multiplexed_model_id="c"))
        out = []
        async for answer in replica.StreamActionChunks(requests(), grpc_context=CallContext(multiplexed_model_id="b")):
            out.append(answer)
        return out

    answers = asyncio.run(run())
    # ... but the open stream keeps the version it opened with: every chunk from b.
    assert [a.checkpoint_id for a in answers] == [checkpoint_id(variants["b"])] * 3
    assert all(a.error_code == 0 and len(a.action_chunk) == 16 for a in answers)


def test_robot_labels_are_bounded():
    labels = RobotLabels(limit=2)
    assert [labels(r) for r in ("r1", "r2", "r3", "r1", "", OTHER_ROBOTS)] == ["r1", "r2", OTHER_ROBOTS, "r1", NO_ROBOT,
                                                                              OTHER_ROBOTS]


def publish(directory, seed, tmp_path):
    """A new version of a checkpoint, put in place the way an upload should be: written beside, renamed over."""
    import os

    staged = variant_checkpoint(tmp_path / f"staged-{seed}", seed)
    os.replace(staged / "model.safetensors", directory / "model.safetensors")


def test_a_new_version_serves_new_calls_while_an_open_stream_keeps_its_own(variants, tmp_path):
    b = variant_checkpoint(tmp_path / "b", seed=1)
    replica = make_replica({"b": b}, capacity=2)
    old = checkpoint_id(b)

    async def run():
        stream_ids, fresh_ids = [], []

        async def requests():
            for i in range(4):
                yield observation(seed=i, request_id=f"s{i}")
                if i == 1:  # mid-stream: a new version lands, and a new call sees it
                    publish(b, 21, tmp_path)
                    await asyncio.sleep(1.1)  # past the version check interval
                    fresh = await replica.GetActionChunk(observation(), grpc_context=CallContext(multiplexed_model_id="b"))
                    fresh_ids.append(fresh.checkpoint_id)

        async for answer in replica.StreamActionChunks(requests(), grpc_context=CallContext(multiplexed_model_id="b")):
            stream_ids.append(answer.checkpoint_id)
        return stream_ids, fresh_ids

    stream_ids, fresh_ids = asyncio.run(run())
    assert stream_ids == [old] * 4  # the open stream: one version, start to end
    assert fresh_ids == [checkpoint_id(b)] and checkpoint_id(b) != old
    (b / "model.safetensors").write_bytes(b"broken upload")
    time.sleep(1.1)
    response, context = chunk(replica, "b")  # a new version that does not load: the one held keeps serving
    assert context.code is None and response.checkpoint_id == fresh_ids[0]


def test_a_new_version_of_the_default(tmp_path):
    import shutil

    demo = tmp_path / "demo"
    shutil.copytree(DEMO_CHECKPOINT, demo)
    replica = RobotPolicyReplica.func_or_class(checkpoint=str(demo), api_key_env=None)
    assert chunk(replica)[0].checkpoint_id == checkpoint_id(DEMO_CHECKPOINT)
    publish(demo, 22, tmp_path)
    time.sleep(1.1)
    assert chunk(replica)[0].checkpoint_id == checkpoint_id(demo) != checkpoint_id(DEMO_CHECKPOINT)
    assert replica._engine is replica._models.default.engine


def test_models_of_different_types_and_specs_in_one_replica(tiny_dir):
    """Another embodiment: a tiny pi05 (its own cameras, state and chunk) beside the demo policy."""
    replica = RobotPolicyReplica.func_or_class(checkpoint=str(DEMO_CHECKPOINT), default_model="demo",
                                               checkpoints={"pi": str(tiny_dir)}, api_key_env=None)
    specs = {}
    for model in ("demo", "pi"):
        context = CallContext(multiplexed_model_id=model)
        health = asyncio.run(replica.HealthCheck(pb.HealthCheckRequest(), grpc_context=context))
        assert context.code is None, context.details
        specs[model] = health
    assert specs["demo"].policy_type == "visuomotor_chunk" and specs["pi"].policy_type == "pi05"
    pi = specs["pi"]
    request = observation(num_cameras=pi.num_cameras, state_dim=min(pi.state_dim, 8))
    context = CallContext(multiplexed_model_id="pi")
    response = asyncio.run(replica.GetActionChunk(request, grpc_context=context))
    assert context.code is None, context.details
    assert chunk_array(response).shape == (pi.chunk_length, pi.action_dim)
    assert response.checkpoint_id == pi.checkpoint_id != specs["demo"].checkpoint_id
