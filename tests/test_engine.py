"""The serving engine on its own: no Ray, no gRPC; a real checkpoint, real JPEG bytes.

A `GatedPolicy` wraps the real demo policy: it records which observations each
forward pass computed (by prompt) and can hold a pass until the test lets it go,
so the tests can line work up behind a busy device.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from policy_wire import robot_inference_pb2 as pb
from serve_app.checkpoint import open_checkpoint
from serve_app.deadlines import CANCELLED, EXPIRED, UNMEETABLE
from serve_app.engine import FAILED_PASSES_UNHEALTHY, BatchSettings, Engine
from serve_app.errors import RequestError
from serve_app.policies import load_policy
from tests.conftest import DEMO_CHECKPOINT
from tests.payloads import encode, frame, observation


class GatedPolicy:
    def __init__(self, policy, pass_s: float = 0.0):
        self.policy, self.spec, self.frames, self.device, self.pass_s = policy, policy.spec, policy.frames, policy.device, pass_s
        self.passes: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.busy = threading.Event()

    def predict(self, batch):
        self.busy.set()
        self.gate.wait(10)
        time.sleep(self.pass_s)
        self.passes.append(list(batch.prompts))
        return self.policy.predict(batch)

    def computed(self) -> list[str]:
        return [p for one in self.passes for p in one]


class Reports:
    def __init__(self):
        self.passes, self.drops = [], {}

    def forward_pass(self, report):
        self.passes.append(report)

    def dropped(self, reason, count):
        self.drops[reason] = self.drops.get(reason, 0) + count


@pytest.fixture(scope="module")
def demo_policy():
    return load_policy(open_checkpoint(str(DEMO_CHECKPOINT)), "cpu")


def make_engine(demo_policy, pass_s: float = 0.0, **settings):
    policy, reports = GatedPolicy(demo_policy, pass_s), Reports()
    engine = Engine(policy, settings=BatchSettings(**settings), listener=reports)
    engine.warm_up()
    policy.passes.clear()
    return engine, policy, reports


def robot(name: str, **fields) -> pb.ObservationRequest:
    request = observation(prompt=name)
    for key, value in fields.items():
        setattr(request, key, value)
    return request


async def hold_the_device(engine, policy, name="first"):
    """Start a pass on `name` and keep it on the device until policy.gate is set."""
    policy.gate.clear()
    policy.busy.clear()
    task = asyncio.ensure_future(engine.submit(robot(name), None))
    while not policy.busy.is_set():
        await asyncio.sleep(0.001)
    return task


def test_an_expired_observation_is_never_computed(demo_policy):
    engine, policy, reports = make_engine(demo_policy)

    async def scenario():
        first = await hold_the_device(engine, policy)
        late = asyncio.ensure_future(engine.submit(robot("late"), time.perf_counter() + 0.05))
        undated = asyncio.ensure_future(engine.submit(robot("undated"), None))
        await asyncio.sleep(0.15)  # "late" is past its deadline while the device is busy
        policy.gate.set()
        return await asyncio.gather(first, late, undated, return_exceptions=True)

    first, late, undated = asyncio.run(scenario())
    assert first.actions.shape == (16, 8) and undated.actions.shape == (16, 8)
    assert isinstance(late, RequestError) and late.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "dropped before the forward pass" in late.message and "deadline passed" in late.message
    assert policy.passes == [["first"], ["undated"]]
    assert reports.drops == {EXPIRED: 1}


def test_an_observation_the_next_pass_cannot_serve_in_time_is_dropped_unless_fifo(demo_policy):
    for scheduling in ("deadline", "fifo"):
        engine, policy, reports = make_engine(demo_policy, pass_s=0.2, scheduling=scheduling)

        async def scenario(engine):
            # Due in 100 ms; a pass here takes 200 ms (warm-up measured it).
            return await asyncio.gather(
                engine.submit(robot("hopeless"), time.perf_counter() + 0.1), return_exceptions=True
            )

        (outcome,) = asyncio.run(scenario(engine))
        if scheduling == "deadline":
            assert isinstance(outcome, RequestError) and outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "would end" in outcome.message
            assert policy.passes == [] and reports.drops == {UNMEETABLE: 1}
        else:
            assert outcome.actions.shape == (16, 8) and policy.passes == [["hopeless"]] and reports.drops == {}


def test_passes_are_formed_earliest_deadline_first(demo_policy):
    orders = {}
    for scheduling in ("deadline", "fifo"):
        engine, policy, _ = make_engine(demo_policy, max_batch_size=1, scheduling=scheduling)

        async def scenario(engine, policy):
            first = await hold_the_device(engine, policy)
            now = time.perf_counter()
            waiting = [
                asyncio.ensure_future(engine.submit(robot(name), None if due is None else now + due))
                for name, due in (("in 30 s", 30), ("in 20 s", 20), ("undated", None), ("in 0.5 s", 0.5))
            ]
            await asyncio.sleep(0.05)
            policy.gate.set()
            await asyncio.gather(first, *waiting)

        asyncio.run(scenario(engine, policy))
        orders[scheduling] = [p for (p,) in policy.passes[1:]]
    # Undated work is ordered as if due 1 s after it arrived: it cannot be starved.
    assert orders["deadline"] == ["in 0.5 s", "undated", "in 20 s", "in 30 s"]
    assert orders["fifo"] == ["in 30 s", "in 20 s", "undated", "in 0.5 s"]


def test_work_that_waits_for_the_device_rides_one_pass_and_batch_size_changes_live(demo_policy):
    engine, policy, reports = make_engine(demo_policy)

    async def scenario(n):
        first = await hold_the_device(engine, policy)
        waiting = [asyncio.ensure_future(engine.submit(robot(f"r{i}"), None)) for i in range(n)]
        await asyncio.sleep(0.05)
        policy.gate.set()
        return await asyncio.gather(first, *waiting)

    results = asyncio.run(scenario(6))
    assert [len(p) for p in policy.passes] == [1, 6]
    assert [r.batch_size for r in results] == [1] + [6] * 6
    assert reports.passes[-1].size == 6 and reports.passes[-1].tightest_slack_ms is None

    engine.configure(BatchSettings(max_batch_size=4))
    policy.passes.clear()
    asyncio.run(scenario(6))
    assert [len(p) for p in policy.passes] == [1, 4, 2]


def test_a_robot_that_hangs_up_is_not_computed(demo_policy):
    engine, policy, reports = make_engine(demo_policy)

    async def scenario():
        first = await hold_the_device(engine, policy)
        gone = asyncio.ensure_future(engine.submit(robot("gone"), None))
        stays = asyncio.ensure_future(engine.submit(robot("stays"), None))
        await asyncio.sleep(0.02)
        gone.cancel()
        await asyncio.sleep(0.02)
        policy.gate.set()
        await asyncio.gather(first, stays)

    asyncio.run(scenario())
    assert policy.computed() == ["first", "stays"] and reports.drops == {CANCELLED: 1}


def test_rtc_prefix_rows_are_returned_as_sent_for_every_policy(demo_policy):
    engine, _, _ = make_engine(demo_policy)
    request = robot("rtc")
    prefix = np.random.default_rng(0).uniform(-1, 1, (5, 8)).astype(np.float32)
    request.prefix_action.extend(pb.ActionVector(values=row) for row in prefix.tolist())
    request.delay = 3
    chunk = asyncio.run(engine.submit(request, None)).actions
    np.testing.assert_array_equal(chunk[:3], prefix[:3])
    assert not np.allclose(chunk[3:5], prefix[3:5])


def test_bad_input_is_refused_before_the_queue(demo_policy):
    engine, policy, _ = make_engine(demo_policy)
    request = robot("broken")
    request.images[0].image_data = b"\xff\xd8 not a jpeg"
    with pytest.raises(RequestError) as err:
        asyncio.run(engine.submit(request, None))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "camera 0" in err.value.message
    assert policy.passes == []


def test_health_check_runs_no_pass_and_fails_after_failed_passes(demo_policy):
    engine, policy, _ = make_engine(load_policy(open_checkpoint(str(DEMO_CHECKPOINT)), "cpu"))
    asyncio.run(engine.check())
    assert policy.passes == []  # robots never wait behind a health probe
    with torch.no_grad():
        policy.policy.net.head[0].weight.fill_(float("nan"))
    for i in range(FAILED_PASSES_UNHEALTHY):
        with pytest.raises(RuntimeError, match="non-finite"):  # no NaN reaches a robot
            asyncio.run(engine.submit(robot(f"r{i}"), None))
        if i < FAILED_PASSES_UNHEALTHY - 1:
            asyncio.run(engine.check())  # one bad pass is not a broken replica
    with pytest.raises(RuntimeError, match=f"the last {FAILED_PASSES_UNHEALTHY} forward passes failed"):
        asyncio.run(engine.check())


class CountingPool:
    """The engine's decode pool, counting what is handed to it."""

    def __init__(self, pool):
        self.pool, self.calls = pool, 0

    def submit(self, fn, *args):
        self.calls += 1
        return self.pool.submit(fn, *args)


def test_small_frames_decode_inline_large_ones_in_the_pool_with_the_same_answer(demo_policy):
    engine = Engine(demo_policy)
    pool = engine._decode_pool = CountingPool(engine._decode_pool)

    def request(side):
        r = observation()
        for camera in r.images:
            camera.image_data = encode(frame(side, side), "JPEG")
        return r

    async def answer(r, inline_max):
        engine._inline_decode_max_pixels = inline_max
        before = pool.calls
        return (await engine.submit(r, None)).actions.tolist(), pool.calls - before

    async def scenario():
        small, large = request(96), request(1280)
        budget = 2 * 640 * 480  # the default: two VGA frames
        return [await answer(small, budget), await answer(small, 0), await answer(large, budget), await answer(large, 0)]

    (small_inline, hops_a), (small_pooled, hops_b), (large_default, hops_c), (large_pooled, hops_d) = asyncio.run(scenario())
    assert (hops_a, hops_b, hops_c, hops_d) == (0, 1, 1, 1)  # 2 x 1280^2 pixels is over the default budget
    assert len(small_inline) == 16 and small_inline == small_pooled and large_default == large_pooled
