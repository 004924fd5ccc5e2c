"""The model manager: one adapter instance per (model, device), loaded lazily on first use and
once (concurrent users wait and share it), on the thread of the worker that runs it (a
device's frames worker, or its text worker), so loading never blocks the event loop.

Memory: each device may have a budget (`manager.max_memory_mb`, or a fraction of the GPU's
free memory). Loading past it first unloads the least recently used models that are not in
use; a model that cannot fit even then fails with a clear error, never an out-of-memory crash.
A model's size is what its adapter reports after loading (`memory_mb`), estimated beforehand
from the entry's `memory_mb` option or the size of its weights on disk.
"""

from __future__ import annotations

import asyncio
import ctypes
import difflib
import gc
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sightstream import log
from sightstream.config import TASKS
from sightstream.errors import ModelError
from sightstream.metrics import Metrics
from sightstream.models import self_test
from sightstream.models.adapter import TEXT_TIMEOUT_S, Adapter, input_shape
from sightstream.models.adapters import adapter_class, check_chained_prompt, check_prompt
from sightstream.models.catalogue import Catalogue
from sightstream.models.input_shape import InputShape

_log = log.get(__name__)


class ModelTooLarge(ModelError):
    """The model does not fit in its device's memory budget, even with nothing else loaded."""


class ModelInUse(ModelError):
    """An unload of a model that a call is using now."""


class RoomInUse(ModelTooLarge):
    """The model would fit once models now in use are let go (then they can be evicted)."""


class LoadTimeout(ModelError):
    """A load that cannot be had now, to be tried again later: one still running past
    `load_timeout_s` on `executor`'s thread, which it still holds (whoever owns that thread
    replaces it: a thread stuck inside a load cannot be killed); or, with no executor, a load
    of the model still running from before, or a device thread replaced since it was asked."""

    def __init__(self, message: str, executor: Executor | None = None, not_run: bool = False) -> None:
        super().__init__(message)
        self.executor = executor
        self.not_run = not_run  # the load never ran (its thread was replaced): another try may well




@dataclass
class Loaded:
    adapter: Adapter
    device: str
    memory_mb: float
    loaded_at: float
    last_used: float
    uses: int = 0
    in_use: int = 0
    file_version: Any = None  # its weights' (self_test.file_version) when it was loaded


def _load(adapter: Adapter, device: str, model_id: str) -> None:
    """Load on the device's thread; whatever the adapter raises is this model's error."""
    try:
        adapter.load(device)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"model {model_id} failed to load on {device}: {type(e).__name__}: {e}") from e


def _unload(adapter: Adapter, model_id: str, device: str) -> None:
    """The adapter's unload; what a plug-in's raises is logged, and the model let go all the same."""
    try:
        adapter.unload()
    except Exception as e:
        _log.error("model_unload_failed", model=model_id, device=device, error=f"{type(e).__name__}: {e}")


THRASH_WINDOW_S, THRASH_EVICTIONS = 60.0, 10  # evictions on a device within the window: said
LOAD_RETRY_MAX_S = 30.0  # a model whose load failed is tried again after 1, 2, 4 … s, then every 30 s


@dataclass
class FailedLoad:
    until: float  # monotonic: not tried again before, its error raised instead
    tries: int
    error: ModelError


class ModelManager:
    def __init__(self, catalogue: Catalogue, budgets_mb: dict[str, float] | None = None,
                 room_wait_s: float = 60.0, metrics: Metrics | None = None,
                 load_timeout_s: float = 600.0) -> None:
        self.catalogue = catalogue
        self.load_timeout_s = load_timeout_s
        self.budgets_mb = dict(budgets_mb or {})  # device -> MB; a device not listed: no limit
        self._loaded: dict[tuple[str, str], Loaded] = {}
        self._retiring: list[tuple[str, Loaded]] = []  # copies a reload replaced, let go once idle (_retire)
        self._retirements: set[asyncio.Task] = set()
        self._reloading: set[tuple[str, str]] = set()  # models whose new file is being loaded
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._reserved_mb: dict[str, float] = {}  # device -> room promised to loads under way
        self._overdue: set[tuple[str, str]] = set()  # loads past load_timeout_s, still running
        self._failed_loads: dict[tuple[str, str], FailedLoad] = {}  # the last load failed: back off
        self._tested: set[tuple[str, str, Any]] = set()  # (model, device, its file's version) tested
        self._evictions: dict[str, list[float]] = {}  # device -> monotonic times of the last minute's
        self._thrash_said: dict[str, float] = {}  # device -> when models_thrashing was last said
        self._closed = False  # unload_all ran (the daemon stopped): a late load is not taken in
        self._declared_shapes: dict[str, InputShape | None] = {}
        self._let_go = asyncio.Event()  # set whenever a model stops being in use
        self.room_wait_s = room_wait_s  # how long a load waits for models in use to be let go
        self.memory_given_back: asyncio.Future | None = None  # the latest unload's clean-up
        self._metrics = metrics

    def create(self, model_id: str, options: dict[str, Any] | None = None) -> Adapter:
        """A new, not yet loaded adapter for an entry (raises if unknown or unavailable);
        `options`: the entry's, as another mapping (unread_options passes one that records)."""
        entry = self.catalogue.get(model_id)
        cls = adapter_class(entry.adapter)
        source = entry.resolve()
        try:
            adapter = cls(source, entry.options if options is None else options)
        except ModelError:
            raise
        except Exception as e:  # a plug-in's bug or a bad option: this model's error, not the daemon's
            raise ModelError(f"model {model_id}: its adapter {entry.adapter!r} could not be set up "
                             f"with its options: {type(e).__name__}: {e}") from e
        if getattr(adapter, "task", None) not in TASKS:  # results say their task: readers rely on it
            raise ModelError(f"model {model_id}: its adapter's task is {getattr(adapter, 'task', None)!r}; "
                             f"it must be one of {', '.join(sorted(TASKS))}")
        return adapter

    def unread_options(self, model_id: str) -> dict[str, str | None]:
        """The entry's options its adapter does not read when set up, nor later (LATE_OPTIONS):
        most likely misspelt (`score_treshold`), so the default stays in force unsaid. Each
        with the nearest name the adapter asked for, if one is near."""
        entry = self.catalogue.get(model_id)
        recording = _Recording(entry.options)
        self.create(model_id, recording)
        asked = sorted(recording.read | LATE_OPTIONS)
        return {name: next(iter(difflib.get_close_matches(name, asked, n=1)), None)
                for name in sorted(set(entry.options) - recording.read - LATE_OPTIONS)}

    def timeout_s(self, model_id: str, adapter: object, default: float) -> float:
        """How long one call of this model may take: its entry's `timeout_s` as set; else at
        least what its adapter asks (`call_timeout_s`; a text model, plug-ins included: 600 s,
        a summary window takes minutes on a CPU) and at least `default` (inference_timeout_s)."""
        entry = self.catalogue.get(model_id)
        if entry.options.get("timeout_s"):
            return float(entry.options["timeout_s"])
        asked = getattr(adapter, "call_timeout_s", None)
        if not isinstance(asked, (int, float)) or isinstance(asked, bool) or not asked > 0:
            asked = 0.0
        text = TEXT_TIMEOUT_S if getattr(adapter, "task", "") == "generate" else 0.0
        return max(float(asked), text, default)

    @asynccontextmanager
    async def use(self, model_id: str, device: str, executor: Executor) -> AsyncIterator[Adapter]:
        """The loaded adapter, held in use (never evicted) for the duration of the block."""
        loaded = await self._ensure(model_id, device, executor)
        loaded.in_use += 1
        loaded.uses += 1
        loaded.last_used = time.time()
        try:
            yield loaded.adapter
        finally:
            loaded.in_use -= 1
            loaded.last_used = time.time()
            self._let_go.set()

    async def load(self, model_id: str, device: str, executor: Executor) -> dict:
        """Explicit load (the control plane's POST …/load): tried now, whatever failed before.
        A model loaded already whose weights have changed since is loaded again from them
        (`_reload`): the rollout of a new file to a running daemon."""
        if (loaded := self._loaded.get((model_id, device))) is not None:
            loaded = await self._reload(model_id, device, executor, loaded)
        else:
            loaded = await self._ensure(model_id, device, executor, asked=True)
        return self._describe(model_id, loaded)

    async def _ensure(self, model_id: str, device: str, executor: Executor, asked: bool = False) -> Loaded:
        key = (model_id, device)
        if (loaded := self._loaded.get(key)) is not None:
            return loaded
        async with self._locks.setdefault(key, asyncio.Lock()):
            if (loaded := self._loaded.get(key)) is not None:
                return loaded
            self._check_not_overdue(key)
            failed = self._failed_loads.get(key)
            if failed is not None and not asked and time.monotonic() < failed.until:
                raise ModelError(str(failed.error))  # a bad weights file was read again for every batch
            try:
                loaded = self._loaded[key] = await self._load_new(model_id, device, executor)
            except ModelError as e:
                if not isinstance(e, (LoadTimeout, ModelTooLarge)):
                    tries = failed.tries + 1 if failed is not None else 1
                    self._failed_loads[key] = FailedLoad(
                        time.monotonic() + min(LOAD_RETRY_MAX_S, 2.0 ** (tries - 1)), tries, e)
                raise
            self._failed_loads.pop(key, None)
            return loaded

    async def _reload(self, model_id: str, device: str, executor: Executor, old: Loaded) -> Loaded:
        """`old`, or, where its weights have changed since it was loaded, a copy loaded from
        them beside it: calls go on with `old` meanwhile, then the new copy takes the next
        batches and `old` is let go once no call holds it. A new file that fails to load (or
        its test frame) leaves `old` in use. A path that is no file here (a package's) is
        never seen to change."""
        key = (model_id, device)
        path = self.catalogue.get(model_id).path
        version = await asyncio.get_running_loop().run_in_executor(None, self_test.file_version, path)
        if version == old.file_version:
            return old
        async with self._locks.setdefault(key, asyncio.Lock()):
            current = self._loaded.get(key)
            if current is None:  # unloaded meanwhile: a plain load, after this lock
                pass
            elif current is not old and current.file_version == version:
                return current  # another reload took this file in meanwhile
            else:
                self._check_not_overdue(key)
                self._reloading.add(key)  # the running copy is neither unloaded nor evicted meanwhile
                try:
                    new = await self._load_new(model_id, device, executor, keep=key, reload=True)
                except ModelError as e:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.loaded_at))
                    e.args = (f"{e} (its file changed since model {model_id} was loaded on {device}: the "
                              f"copy loaded at {since}, from the file as it was then, stays in use)",)
                    raise
                finally:
                    self._reloading.discard(key)
                if self._closed:  # the daemon stopped meanwhile: nothing is taken in
                    _unload(new.adapter, model_id, device)
                    return current
                self._loaded[key] = new
                self._retire(key, current)
                return new
        return await self._ensure(model_id, device, executor, asked=True)

    def _retire(self, key: tuple[str, str], old: Loaded) -> None:
        """Let `old` go once no call holds it (a batch in flight finishes on it); its memory
        counts on its device until then."""
        model_id, device = key
        self._retiring.append((model_id, old))

        async def when_idle() -> None:
            while old.in_use:
                await asyncio.sleep(0.05)
            self._retiring.remove((model_id, old))
            _unload(old.adapter, model_id, device)
            self._give_back(device)
            self._let_go.set()
            if self._metrics is not None:
                self._metrics.model_unloads.labels(device, "reloaded").inc()
            _log.info("model_unloaded", model=model_id, device=device, reason="reloaded",
                      memory_mb=round(old.memory_mb, 1))

        task = asyncio.get_running_loop().create_task(when_idle())
        self._retirements.add(task)
        task.add_done_callback(self._retirements.discard)

    def _check_not_overdue(self, key: tuple[str, str]) -> None:
        if key in self._overdue:  # one stuck load of it at a time, not one more per try
            raise LoadTimeout(f"model {key[0]} is still loading on {key[1]}, past "
                              f"{self.load_timeout_s:g} s (manager.load_timeout_s); try again later")

    async def _load_new(self, model_id: str, device: str, executor: Executor,
                        keep: tuple[str, str] | None = None, reload: bool = False) -> Loaded:
        """A new copy of the model loaded on the device (the caller holds its lock and keeps
        it); `keep`: a loaded model that making room may not evict (a reload's old copy)."""
        key = (model_id, device)
        adapter = self.create(model_id)
        estimate = self._estimate_mb(model_id)
        # The room is promised to this load until it ends, so two loads on one device
        # cannot both count on it. No lock is held meanwhile: a load queued on a device
        # thread behind a long call (a text model's) keeps no other load of the device waiting.
        await self._wait_for_room(device, estimate, model_id, keep)
        overdue = False
        try:
            started = time.monotonic()
            loading = self._start_load(executor, adapter, device, model_id)
            overdue = not await self._within_timeout(loading)
            if overdue:  # the room stays promised until the load ends (_ended_late)
                self._overdue.add(key)
                loading.add_done_callback(partial(self._ended_late, key, adapter, estimate))
                _log.error("model_load_timeout", model=model_id, device=device,
                           timeout_s=self.load_timeout_s)
                raise LoadTimeout(f"model {model_id} did not load on {device} within "
                                  f"{self.load_timeout_s:g} s (manager.load_timeout_s); try again later",
                                  executor)
            version = loading.result()
            size = float(getattr(adapter, "memory_mb", 0) or estimate)
            now = time.time()
            loaded = Loaded(adapter, device, size, now, now, file_version=version)
        finally:
            if not overdue:
                self._reserved_mb[device] -= estimate
                self._let_go.set()  # the room counted on may have changed: waiting loads look again
        if self._metrics is not None:
            self._metrics.model_loads.labels(device).inc()
        _log.info("model_reloaded" if reload else "model_loaded", model=model_id, device=device,
                  memory_mb=round(size, 1), seconds=round(time.monotonic() - started, 3))
        return loaded

    def _start_load(self, executor: Executor, adapter: Adapter, device: str, model_id: str) -> asyncio.Future:
        """The load, on the device's thread; its start time is noted (`began`), for the timeout."""
        began: list[float] = []

        def timed() -> Any:
            began.append(time.monotonic())
            # the file's version before the load: one replaced meanwhile is tested at its next load
            version = (model_id, device, self_test.file_version(self.catalogue.get(model_id).path))
            _load(adapter, device, model_id)
            try:
                self._self_test(adapter, device, model_id, version)
            except BaseException:  # let go: a model loaded and not kept would hold its memory
                _unload(adapter, model_id, device)
                raise
            return version[2]

        try:
            loading = asyncio.get_running_loop().run_in_executor(executor, timed)
        except RuntimeError:  # shut down: the device thread was replaced (a stuck call) since asked
            raise LoadTimeout(f"model {model_id} was not loaded: the device thread of {device} was "
                              "replaced meanwhile; try again", not_run=True) from None
        loading.began = began  # type: ignore[attr-defined]
        return loading

    def _self_test(self, adapter: Adapter, device: str, model_id: str, version: tuple[str, str, Any]) -> None:
        """A built-in model's test frame, once per device and version of its file
        (models/self_test.py): one that fails fails the load."""
        if version in self._tested or (frame := self_test.frame_for(adapter)) is None:
            return
        self_test.run(adapter, frame, model_id, device)
        self._tested.add(version)

    async def _within_timeout(self, loading: asyncio.Future) -> bool:
        """Wait for the load; False once it has run `load_timeout_s` (timed from when the device
        thread started it, not while it waited behind a call)."""
        began: list[float] = loading.began  # type: ignore[attr-defined]
        while not loading.done():
            # not started yet: look again soon (within the timeout: 0.3 s went unnoticed for 1 s)
            timeout = self.load_timeout_s
            wait = began[0] + timeout - time.monotonic() if began else min(1.0, timeout)
            if wait <= 0:
                return False
            await asyncio.wait((loading,), timeout=wait)
        if loading.cancelled():  # queued on a device thread that was replaced before it ran
            raise LoadTimeout("the load was not run: its device thread was replaced meanwhile; try again",
                              not_run=True)
        return True

    def _ended_late(self, key: tuple[str, str], adapter: Adapter, estimate: float,
                    done: asyncio.Future) -> None:
        """A load past its timeout has ended: its room is given back, and the model, if it
        loaded, is taken in (a model that needs longer than load_timeout_s is loaded once)."""
        model_id, device = key
        self._overdue.discard(key)
        self._reserved_mb[device] -= estimate
        self._let_go.set()
        error = None if done.cancelled() else done.exception()
        if not done.cancelled() and error is None and (self._closed or key in self._loaded):
            _unload(adapter, model_id, device)
        if done.cancelled() or error is not None or self._closed or key in self._loaded:
            _log.warning("model_load_ended_late", model=model_id, device=device, loaded=False,
                         error=repr(error) if error else None)
            return
        size = float(getattr(adapter, "memory_mb", 0) or estimate)
        now = time.time()
        self._loaded[key] = Loaded(adapter, device, size, now, now, file_version=done.result())
        _log.info("model_load_ended_late", model=model_id, device=device, loaded=True,
                  memory_mb=round(size, 1))

    async def _wait_for_room(self, device: str, needed_mb: float, model_id: str,
                             keep: tuple[str, str] | None = None) -> None:
        """Make room and promise it to this load (the caller gives it back once loaded); when
        only models in use stand in the way (a batch in flight on the device, a /predict call),
        or loads under way, wait for them rather than fail the load."""
        deadline = time.monotonic() + self.room_wait_s
        while True:
            self._let_go.clear()
            try:
                self._make_room(device, needed_mb, model_id, keep)
                # no await between the check and the promise: no other load can come between
                self._reserved_mb[device] = self._reserved_mb.get(device, 0.0) + needed_mb
                return
            except RoomInUse:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                try:
                    await asyncio.wait_for(self._let_go.wait(), remaining)
                except TimeoutError:
                    pass

    def _estimate_mb(self, model_id: str) -> float:
        entry = self.catalogue.get(model_id)
        if "memory_mb" in entry.options:
            return float(entry.options["memory_mb"])
        source = entry.resolve()
        if not source or source.startswith("package:"):
            return 0.0  # no weights file to measure (a plugin, or bytes inside a wheel)
        path = Path(source)
        try:
            if path.is_file():
                return path.stat().st_size / 2**20
            if path.is_dir():
                return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        except OSError:  # a file replaced (or removed) while measured: a rollout; the load says more
            return 0.0
        return 0.0

    def _make_room(self, device: str, needed_mb: float, model_id: str,
                   keep: tuple[str, str] | None = None) -> None:
        budget = self.budgets_mb.get(device)
        if not budget:
            return
        if needed_mb > budget:
            raise ModelTooLarge(
                f"model {model_id} needs about {needed_mb:.0f} MB; the budget of {device} is "
                f"{budget:.0f} MB (manager.max_memory_mb)"
            )
        old = self._loaded.get(keep) if keep is not None else None
        if old is not None and old.memory_mb + needed_mb > budget:
            raise ModelTooLarge(
                f"model {model_id}: a reload holds the loaded copy (about {old.memory_mb:.0f} MB) until "
                f"the new one (about {needed_mb:.0f} MB) is in, more than the budget of {device}, "
                f"{budget:.0f} MB (manager.max_memory_mb); unload the model, then load it to read "
                "the new file in its place"
            )
        idle = sorted(
            (item for item in self._loaded.items()
             if item[1].device == device and item[1].in_use == 0 and item[0] != keep
             and item[0] not in self._reloading),
            key=lambda item: item[1].last_used,
        )
        taken = self.used_mb(device) + self._reserved_mb.get(device, 0.0)
        if taken - sum(entry.memory_mb for _, entry in idle) + needed_mb > budget:
            idle = []  # evicting every idle model would not make room: evict none, wait
        while (taken := self.used_mb(device) + self._reserved_mb.get(device, 0.0)) + needed_mb > budget:
            if not idle:
                busy = [m for (m, d), entry in self._loaded.items() if d == device]
                loading = " or being loaded" if self._reserved_mb.get(device, 0.0) > 1e-6 else ""
                raise RoomInUse(
                    f"model {model_id} needs about {needed_mb:.0f} MB; {device} has "
                    f"{budget - taken:.0f} MB free of {budget:.0f} MB and its models "
                    f"are in use{loading} ({', '.join(busy) or 'none loaded yet'})"
                )
            (victim, _), _ = idle.pop(0)
            self.unload(victim, device, reason="evicted")
            self._say_thrashing(device, victim, model_id)

    def _say_thrashing(self, device: str, victim: str, model_id: str) -> None:
        """Models that evict each other over and over (their budget holds one of two that are
        both needed) re-read their files at every turn: 126 loads in 30 s, latency 50x, and
        only info lines said so. Warned at most once a minute per device."""
        now = time.monotonic()
        recent = self._evictions.setdefault(device, [])
        recent[:] = [t for t in recent if now - t < THRASH_WINDOW_S] + [now]
        said = self._thrash_said.get(device, 0.0)
        if len(recent) >= THRASH_EVICTIONS and now - said >= THRASH_WINDOW_S:
            self._thrash_said[device] = now
            _log.warning("models_thrashing", device=device, evictions=len(recent), window_s=THRASH_WINDOW_S,
                         evicted=victim, for_model=model_id, budget_mb=self.budgets_mb.get(device),
                         hint="the models in use do not fit manager.max_memory_mb together: raise it, or "
                              "run their pipelines on different daemons or devices")

    def check_fits(self, model_id: str, devices: list[str]) -> None:
        """ModelTooLarge if the model is bigger than the budget of every one of `devices`."""
        needed = self._estimate_mb(model_id)
        budgets = [self.budgets_mb.get(d) for d in devices]
        if devices and all(b and needed > b for b in budgets):
            raise ModelTooLarge(f"model {model_id} needs about {needed:.0f} MB; the budget of "
                                f"{', '.join(devices)} is {max(b or 0 for b in budgets):.0f} MB at most "
                                "(manager.max_memory_mb)")

    def used_mb(self, device: str) -> float:
        # a reload's old copy counts until it is let go
        copies = [*self._loaded.values(), *(entry for _, entry in self._retiring)]
        return sum(entry.memory_mb for entry in copies if entry.device == device)

    def unload(self, model_id: str, device: str | None = None, reason: str = "requested") -> list[str]:
        """Unload a model from one device (or all); models in use are never unloaded, nor
        models being loaded (the load would end with the model loaded: say so, not 'not loaded')."""
        for (mid, dev), lock in self._locks.items():
            if mid == model_id and (device is None or dev == device) and (mid, dev) not in self._loaded \
                    and (lock.locked() or (mid, dev) in self._overdue):
                raise ModelInUse(f"model {model_id} is being loaded on {dev}; try again once it is loaded")
            if mid == model_id and (device is None or dev == device) and (mid, dev) in self._reloading:
                # unloaded now, the reload would put the new copy back
                raise ModelInUse(f"model {model_id} is being reloaded from its new file on {dev}; try "
                                 "again once it is loaded")
        done = []
        for (mid, dev), entry in list(self._loaded.items()):
            if mid == model_id and (device is None or dev == device):
                if entry.in_use:
                    raise ModelInUse(f"model {model_id} is in use on {dev}; try again when idle")
                del self._loaded[(mid, dev)]
                _unload(entry.adapter, mid, dev)
                self._give_back(dev)
                done.append(dev)
                if self._metrics is not None:
                    self._metrics.model_unloads.labels(dev, reason).inc()
                _log.info("model_unloaded", model=mid, device=dev, reason=reason,
                          memory_mb=round(entry.memory_mb, 1))
        return done

    def _give_back(self, device: str) -> None:
        """give_back_memory, off the event loop when there is one (a full collection of a big
        heap takes tens of ms); `memory_given_back` is the pending call."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            give_back_memory(device)
            return
        self.memory_given_back = loop.run_in_executor(None, give_back_memory, device)

    def cleanup(self, inactive_seconds: float) -> list[dict]:
        """Unload every model not in use and not used for `inactive_seconds`."""
        cutoff = time.time() - inactive_seconds
        gone = []
        for (mid, dev), entry in list(self._loaded.items()):
            if entry.in_use == 0 and entry.last_used <= cutoff and (mid, dev) not in self._reloading:
                self.unload(mid, dev, reason="idle")
                gone.append({"model": mid, "device": dev})
        return gone

    def decode_shape(self, model_id: str) -> InputShape | None:
        """How the model sizes a frame, if known (loaded, or set in its options), for scaled
        decoding."""
        for (mid, _), loaded in self._loaded.items():
            if mid == model_id:
                return input_shape(loaded.adapter)
        # Asked for every frame decoded before the model loads: ask its entry once, unless
        # its adapter knows its shape only once loaded (transformers: its processor's). This
        # runs on the event loop: resolving a hub id there would cost a hub lookup.
        if model_id not in self._declared_shapes:
            try:
                entry = self.catalogue.get(model_id)
                if getattr(adapter_class(entry.adapter), "shape_after_load", False):
                    return None
                shape = input_shape(self.create(model_id))  # adapters are cheap until load()
            except ModelError:
                shape = None
            self._declared_shapes[model_id] = shape
        return self._declared_shapes[model_id]

    async def prompt_refusal(self, model_id: str, text: str, chained: bool = False) -> str | None:
        """Why the model cannot use this prompt (`chained`: a chained pipeline's), or None: what
        its adapter refuses (check_prompt, check_chained_prompt), then, where it is loaded, a
        prompt longer than its text encoder reads (not loaded: its frames will say why).
        Tokenizes in a thread."""
        entry = self.catalogue.get(model_id)
        try:
            (check_chained_prompt if chained else check_prompt)(entry.adapter, entry.task, text)
        except ModelError as e:
            return str(e)
        adapter = next((loaded.adapter for (mid, _), loaded in self._loaded.items() if mid == model_id), None)
        check = getattr(adapter, "prompt_problem", None)
        return None if check is None else await asyncio.to_thread(check, text)

    def is_loaded(self, model_id: str, device: str | None = None) -> bool:
        return any(mid == model_id and device in (None, d) for mid, d in self._loaded)

    def loaded(self) -> list[dict]:
        return [self._describe(mid, entry) for (mid, _), entry in self._loaded.items()]

    @staticmethod
    def _describe(model_id: str, entry: Loaded) -> dict:
        return {"model": model_id, "device": entry.device, "memory_mb": round(entry.memory_mb, 1),
                "loaded_at": entry.loaded_at, "last_used": entry.last_used, "uses": entry.uses,
                "in_use": entry.in_use}

    def unload_all(self) -> None:
        self._closed = True
        for task in self._retirements:
            task.cancel()
        for mid, entry in self._retiring:
            _unload(entry.adapter, mid, entry.device)
        self._retiring.clear()
        for (mid, dev), entry in self._loaded.items():
            _unload(entry.adapter, mid, dev)
        self._loaded.clear()


# Options read when a model loads or runs, not when its adapter is set up: the runners' (ONNX
# Runtime and torch: dtype, CUDA options, batch buckets, I/O binding, input size), processors'
# sizes, and the manager's own (task, timeout, memory).
LATE_OPTIONS = frozenset({"dtype", "cuda_options", "batch_buckets", "io_binding", "input_size", "min_pixels",
                          "max_pixels", "longest_edge", "task", "timeout_s", "memory_mb"})


class _Recording(dict):
    """An entry's options that note which names an adapter asks for."""

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.read: set[str] = set()

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)


def give_back_memory(device: str) -> None:
    """After an unload: free what reference cycles still hold, hand freed heap pages back to
    the operating system (glibc keeps them otherwise), and on a GPU empty torch's cache, which
    keeps freed blocks reserved for the next model. (ONNX Runtime's arena goes with its
    session.) Measured in docs/operations.md."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    torch = sys.modules.get("torch")  # only if a model already imported it
    if device.startswith("cuda") and torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        host = getattr(torch._C, "_accelerator_emptyHostCache", None)  # pinned input buffers
        if host is not None:
            host()
