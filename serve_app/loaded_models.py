"""The models one replica holds in memory: the default always, up to `capacity - 1` others, least recently used first out.

    get(name) -> the LoadedModel (loaded on first use, one load at a time)
              -> FAILED_PRECONDITION with the checkpoint's error when it cannot be loaded

Why the default is pinned: robots that send no model id (every OpenTau-era client) and Serve's
health probe use it, so it is loaded before the replica reports ready and never pays a cold
start again. Why not `@serve.multiplexed`: it cannot pin a model, cannot be asked to mark a
model used without loading it (a bidi stream keeps its model for its life and marks it used at
every message, so a busy model is not evicted under its robots), needs a replica context (the
unit tests have none), and its one extra, steering a model's calls to the replicas that hold it,
exists only behind Serve's standard proxy, not behind HAProxy (the default ingress). The model id
still comes from Serve (`serve.get_multiplexed_model_id()`, serve_app/fleet_metadata.py).

A model that failed to load is not retried for each call: the same files (path, inode, size,
mtime, ctime) get the same answer for `retry_after_s`; a change to its files retries at once.

New versions: a held model whose files change (new files written into its directory, or the
directory a symlink names swapped) is loaded again on its next call, beside the old version, which
answers meanwhile. Calls made after the swap get the new version; a bidi stream keeps the version
it opened with (serve_app/replica.py), so robots move over at their next stream renewal and no
stream, let alone a chunk, mixes two versions. Every chunk carries its version's checkpoint_id.
Plain Python (no Ray): tests/test_fleet_models.py drives it directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc

from serve_app.engine import Engine
from serve_app.errors import RequestError
from serve_app.responses import ReplicaIdentity

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 10.0  # a model that failed to load, its files unchanged, is not tried again sooner
VERSION_CHECK_S = 1.0  # how often a held model's files are compared with the version in memory


@dataclass(eq=False)
class LoadedModel:
    name: str
    policy_type: str
    engine: Engine
    who: ReplicaIdentity  # its checkpoint_id on every chunk
    directory: str
    load_ms: float  # cold start: files -> weights on the device -> warm-up passes
    loaded_at: float = field(default_factory=time.time)
    files: tuple = ()  # the identity of the files this version was loaded from (_files_of)
    checked_at: float = 0.0  # when they were last compared with the directory


@dataclass(frozen=True)
class _Failure:
    error: RequestError
    files: tuple
    at: float


Loader = Callable[[str], Awaitable[LoadedModel]]


class LoadedModels:
    def __init__(
        self,
        default: LoadedModel,
        capacity: int,
        load: Loader,
        directory_of: Callable[[str], str],
        check: Callable[[str], Awaitable[None]] | None = None,
        on_change: Callable[[LoadedModels, str, str], None] | None = None,
        retry_after_s: float = RETRY_AFTER_S,
        version_check_s: float = VERSION_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if capacity < 1:
            raise ValueError(f"max_models_per_replica must be >= 1 (the default model), got {capacity}")
        self.default = default
        self.capacity = capacity
        self._load, self._directory_of, self._check = load, directory_of, check
        self._on_change = on_change or (lambda models, event, name: None)
        self._retry_after_s, self._version_check_s, self._clock = retry_after_s, version_check_s, clock
        self._others: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._failures: dict[str, _Failure] = {}
        self._lock: asyncio.Lock | None = None
        self._loop = None
        default.files = default.files or _files_of(directory_of(default.name))
        default.checked_at = clock()

    @property
    def names(self) -> list[str]:
        """Loaded now: the default, then the others from most recently used."""
        return [self.default.name, *reversed(self._others)]

    def cached(self, name: str) -> LoadedModel | None:
        if name == self.default.name:
            return self.default
        return self._others.get(name)

    def touch(self, model: LoadedModel) -> None:
        """`model` was just used: the last to be evicted (no-op if it was evicted meanwhile)."""
        if self._others.get(model.name) is model:
            self._others.move_to_end(model.name)

    async def get(self, name: str) -> LoadedModel:
        """The model's current version, loading it if it is not held, or if its files changed."""
        model = self.cached(name)
        if model is not None:
            self.touch(model)
            if not self._new_version_on_disk(model):
                return model
            return await self._locked(self._replace, model)
        if self.capacity < 2:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"model {name!r} cannot be loaded: this replica holds only "
                               f"{self.capacity} model (max_models_per_replica), the default {self.default.name!r}")
        self._refuse_if_failed_recently(name)
        return await self._locked(self._add, name)

    def last_failure(self, name: str) -> RequestError | None:
        failure = self._failures.get(name)
        return failure.error if failure is not None else None

    async def _locked(self, step, *args) -> LoadedModel:
        loop = asyncio.get_running_loop()
        if self._lock is None or loop is not self._loop:
            self._lock, self._loop = asyncio.Lock(), loop
        async with self._lock:  # one load at a time; calls for loaded models never wait here
            return await step(*args)

    async def _add(self, name: str) -> LoadedModel:
        model = self.cached(name)
        if model is not None:  # loaded by the call this one waited behind
            self.touch(model)
            return model
        self._refuse_if_failed_recently(name)
        # A checkpoint that cannot load (files broken since the deploy) evicts nothing: the cheap
        # strict check of its files runs before any room is made.
        files = await self._checked(name)
        # Room before the load, as a device that holds `capacity` models may not hold one more.
        while len(self._others) >= self.capacity - 1:
            evicted, _ = self._others.popitem(last=False)
            self._on_change(self, "evicted", evicted)
        model = await self._loaded(name, files)
        self._others[name] = model
        self._on_change(self, "loaded", name)
        return model

    async def _replace(self, old: LoadedModel) -> LoadedModel:
        """A new version of a held model: loaded beside the old, which serves meanwhile (and keeps serving,
        its streams' and every call's, if the new files do not load: a broken upload cuts no robot)."""
        name = old.name
        current = self.cached(name)
        if current is not old:  # replaced (or evicted) by the call this one waited behind
            return current if current is not None else await self._add(name)
        files = _files_of(self._directory_of(name))
        failure = self._failures.get(name)
        if files == old.files or (failure is not None and failure.files == files):
            return old  # back as it was, or this very upload already failed
        try:
            await self._checked(name)
            new = await self._loaded(name, files)
        except RequestError as err:
            logger.warning("model %r: keeping version %s, the new files do not load: %s",
                           name, old.who.checkpoint_id, err.message)
            return old
        if name == self.default.name:
            self.default = new
        elif name in self._others:
            self._others[name] = new
            self._others.move_to_end(name)
        self._on_change(self, "replaced", name)
        return new

    async def _checked(self, name: str) -> tuple:
        files = _files_of(self._directory_of(name))
        if self._check is not None:
            await self._recorded(name, files, self._check(name))
        return files

    async def _loaded(self, name: str, files: tuple) -> LoadedModel:
        model = await self._recorded(name, files, self._load(name))
        model.files, model.checked_at = files, self._clock()
        self._failures.pop(name, None)
        return model

    async def _recorded(self, name: str, files: tuple, step: Awaitable):
        try:
            return await step
        except RequestError as err:
            self._failures[name] = _Failure(err, files, self._clock())
            self._on_change(self, "failed", name)
            raise

    def _new_version_on_disk(self, model: LoadedModel) -> bool:
        """Whether the model's files changed since it loaded; looked at once per version_check_s per model."""
        now = self._clock()
        if now - model.checked_at < self._version_check_s:
            return False
        model.checked_at = now
        return _files_of(self._directory_of(model.name)) != model.files

    def _refuse_if_failed_recently(self, name: str) -> None:
        failure = self._failures.get(name)
        if failure is None:
            return
        if self._clock() - failure.at < self._retry_after_s and _files_of(self._directory_of(name)) == failure.files:
            raise failure.error


def _files_of(directory: str) -> tuple:
    """What identifies a checkpoint directory's current contents, without reading them. Hidden files are
    not part of a version: uploads stage there (rsync's `.name.XXXXXX`), then rename into place."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as err:
        return (str(Path(directory)), err.errno)
    out = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        out.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)
