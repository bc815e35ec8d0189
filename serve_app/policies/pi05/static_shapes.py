"""How pi05 shapes a batch for the sampler, and the CUDA graphs that static shapes allow.

    ExactShapes  CPU: the batch as it comes, the prompt padding every row shares dropped.
    Buckets      the batch padded to the next of a few sizes (1, 2, 4, ... 32) and the prompt to
                 prompt_max_length, so the sampler only ever sees a handful of shapes.
    CudaGraphs   Buckets on CUDA: the whole Euler loop of each (bucket, prefix length) captured
                 once as one CUDA graph over static input buffers, then replayed.

Padding rows repeat the last real row and are dropped afterwards; rows never
mix (attention and normalisation are per row), so the real rows are those of
the unpadded batch up to float rounding (tests/test_pi05_speed.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from serve_app.policies.pi05.model import KVCache
from serve_app.policies.pi05.sampler import FlowSampler

logger = logging.getLogger(__name__)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
WARMUP_CALLS = 2  # before a capture: kernels chosen, cuBLAS workspaces made, torch.compile traced


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, ...) -> (rows, ...), repeating the last row."""
    extra = rows - t.shape[0]
    return t if extra <= 0 else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])


class ExactShapes:
    static = False  # the caller may drop prompt padding that every row shares

    def __init__(self, sampler: FlowSampler):
        self.sampler = sampler

    def rows(self, batch: int) -> int:
        return batch

    def cache(self, batch: int, prefix_len: int) -> KVCache:
        return self.sampler.model.new_kv_cache(batch, prefix_len)

    def sample(self, cache: KVCache, prefix_pad, delay, action_prefix, noise) -> torch.Tensor:
        return self.sampler(cache, prefix_pad, delay, action_prefix, noise)


class Buckets(ExactShapes):
    static = True  # prompts stay padded to prompt_max_length

    def __init__(self, sampler: FlowSampler, sizes: tuple[int, ...] = BATCH_BUCKETS):
        super().__init__(sampler)
        self.sizes = tuple(sorted(sizes))

    def rows(self, batch: int) -> int:
        """The smallest bucket that holds the batch; a batch beyond the largest runs at its own size."""
        return next((s for s in self.sizes if s >= batch), batch)


@dataclass
class _Captured:
    """One bucket's static buffers and graph. The prefix pass writes `cache` in place; `out` is the graph's."""

    cache: KVCache
    prefix_pad: torch.Tensor
    delay: torch.Tensor
    action_prefix: torch.Tensor
    noise: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None

    def inputs(self):
        return self.cache, self.prefix_pad, self.delay, self.action_prefix, self.noise


class CudaGraphs(Buckets):
    """Buckets whose Euler loop replays a CUDA graph: one per (bucket, prefix length), captured on first use.

    All graphs share one memory pool; predict calls are serial (one device
    thread), so no two replays overlap. With `compile`, the loop is first
    compiled by torch.compile (fullgraph, static shapes) and the compiled code
    is what gets captured; should compiling fail, the eager loop is captured
    instead. CUDA only, and not exercised by the CPU test suite.
    """

    def __init__(self, sampler: FlowSampler, sizes: tuple[int, ...] = BATCH_BUCKETS, compile: bool = False):
        super().__init__(sampler, sizes)
        self._compiled = torch.compile(sampler.__call__, fullgraph=True, dynamic=False) if compile else None
        self._captured: dict[tuple[int, int], _Captured] = {}
        self._pool = None

    def cache(self, batch: int, prefix_len: int) -> KVCache:
        if batch not in self.sizes:
            return super().cache(batch, prefix_len)
        key = (batch, prefix_len)
        if key not in self._captured:
            c = self.sampler.model.config
            dev = self.sampler.model.vlm.layers[0].mlp.down_proj.weight.device
            actions = torch.zeros(batch, c.chunk_size, c.max_action_dim, device=dev)
            self._captured[key] = _Captured(
                cache=super().cache(batch, prefix_len),
                prefix_pad=torch.ones(batch, prefix_len, dtype=torch.bool, device=dev),
                delay=torch.zeros(batch, dtype=torch.long, device=dev),
                action_prefix=actions,
                noise=actions.clone(),
            )
        return self._captured[key].cache

    def sample(self, cache: KVCache, prefix_pad, delay, action_prefix, noise) -> torch.Tensor:
        entry = self._captured.get(tuple(prefix_pad.shape))
        if entry is None or entry.cache is not cache:  # beyond the largest bucket: eager, its own shape
            return self.sampler(cache, prefix_pad, delay, action_prefix, noise)
        entry.prefix_pad.copy_(prefix_pad)
        entry.delay.copy_(delay)
        entry.action_prefix.copy_(action_prefix)
        entry.noise.copy_(noise)
        if entry.graph is None:
            self._capture(entry)
        entry.graph.replay()
        return entry.out.clone()  # the next replay overwrites `out`

    def _capture(self, entry: _Captured) -> None:
        """Warm up on a side stream (as torch.cuda.graphs requires), then record one call."""
        self.sampler.constants(entry.noise.device)  # made eagerly: never inside a capture or a trace
        loop = self._warm_up(entry)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            entry.out = loop(*entry.inputs())
        entry.graph = graph

    def _warm_up(self, entry: _Captured):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop = self._compiled or self.sampler
            try:
                for _ in range(WARMUP_CALLS):
                    loop(*entry.inputs())
            except Exception as exc:  # noqa: BLE001 - only the optional compiled loop may fail here
                if loop is self.sampler:
                    raise
                logger.warning("pi05: torch.compile of the sampler failed (%s); capturing the eager loop", exc)
                self._compiled, loop = None, self.sampler
                for _ in range(WARMUP_CALLS):
                    loop(*entry.inputs())
        torch.cuda.current_stream().wait_stream(side)
        return loop


def shapes_for(sampler: FlowSampler, device: torch.device, compile: bool = False) -> ExactShapes:
    """CUDA: bucketed shapes and graphs; elsewhere exact shapes, eager.

    torch.compile stays off the CPU: at a quarter of pi05's widths its first
    call took 15 minutes on two cores (gcc 12) for a loop ~8% faster after.
    """
    if device.type == "cuda":
        return CudaGraphs(sampler, compile=compile)
    return ExactShapes(sampler)
