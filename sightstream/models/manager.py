"""The model manager: one adapter instance per (model, device), loaded lazily on first use,
once, in the device's own executor (so loading never blocks the event loop)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass

from sightstream import log
from sightstream.errors import ModelError
from sightstream.models.adapter import Adapter
from sightstream.models.adapters import adapter_class
from sightstream.models.catalogue import Catalogue, Entry

_log = log.get(__name__)


@dataclass
class Loaded:
    adapter: Adapter
    device: str
    loaded_at: float
    last_used: float
    uses: int = 0


class ModelManager:
    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self._loaded: dict[tuple[str, str], Loaded] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def entry(self, model_id: str) -> Entry:
        return self.catalogue.get(model_id)

    def create(self, model_id: str) -> Adapter:
        """A new, not yet loaded adapter for an entry (raises if unknown or unavailable)."""
        entry = self.catalogue.get(model_id)
        return adapter_class(entry.adapter)(entry.resolve(), entry.options)

    async def acquire(self, model_id: str, device: str, executor: Executor) -> Adapter:
        key = (model_id, device)
        if (loaded := self._loaded.get(key)) is None:
            async with self._locks.setdefault(key, asyncio.Lock()):
                if (loaded := self._loaded.get(key)) is None:
                    adapter = self.create(model_id)
                    started = time.monotonic()
                    await asyncio.get_running_loop().run_in_executor(executor, adapter.load, device)
                    now = time.time()
                    loaded = self._loaded[key] = Loaded(adapter, device, now, now)
                    _log.info("model_loaded", model=model_id, device=device,
                              seconds=round(time.monotonic() - started, 3))
        loaded.last_used = time.time()
        loaded.uses += 1
        return loaded.adapter

    def input_size(self, model_id: str) -> tuple[int, int] | None:
        """The model's input size if known (loaded, or set in its options), for scaled decoding."""
        for (mid, _), loaded in self._loaded.items():
            if mid == model_id:
                return loaded.adapter.input_size
        try:
            return self.create(model_id).input_size  # adapters are cheap until load()
        except ModelError:
            return None

    def loaded(self) -> list[dict]:
        return [
            {"model": mid, "device": dev, "loaded_at": entry.loaded_at,
             "last_used": entry.last_used, "uses": entry.uses}
            for (mid, dev), entry in self._loaded.items()
        ]

    def unload_all(self) -> None:
        for loaded in self._loaded.values():
            loaded.adapter.unload()
        self._loaded.clear()
