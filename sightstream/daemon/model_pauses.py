"""A pipeline whose model cannot be loaded (a bad weights file rolled out, a device without
room) pauses until it can, rather than dead-letter every frame of every camera meanwhile.

Its readers stop reading (the stream reader and the reclaimer look at `InFlight.paused` before
each read), so new frames wait in the stream, unread; the frames it held are left pending in
Redis, and re-read first, in order, when it goes on (or reclaimed by another daemon of the
group whose model loads, once idle `reclaim_min_idle_ms`). Each costs one delivery per pause,
not one per batch tried. Its video inputs (jobs) hold their frames and send them again then.

The load is tried again with no frame at stake: after 1, 2, 4 … s, then every 30 s, and at
once when something else loaded the model meanwhile (`POST /models/…/load`, a job). The pipeline
goes on once the model is loaded on the device where it failed.

A pipeline also starts this way (`loading`): it reads nothing, not even the frames it left
pending, until its model is loaded. Each start re-read them (a delivery each) before finding the
model broken, so a daemon restarted five times with a bad file dead-lettered them
`max_deliveries`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from sightstream import log
from sightstream.stages.flow import InFlight, wait_or_stop

_log = log.get(__name__)

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
LOOK_EVERY_S = 0.5  # between tries: whether the model was loaded by another caller


class ModelPauses:
    def __init__(self, models: Mapping[str, str], is_loaded: Callable[[str, str], bool],
                 in_flight: Callable[[str], InFlight | None], loader: Callable[[str, str], Any],
                 resumed: Callable[[str], None], stop: asyncio.Event) -> None:
        self._models = models  # each pipeline's model
        self._is_loaded = is_loaded  # (model, device)
        self._in_flight = in_flight  # a pipeline's registry, by name (None: not one of ours)
        self._loader = loader  # (device, model) -> the worker that loads it there
        self._resumed = resumed  # (pipeline): it goes on; its readers re-read what it held
        self._stop = stop
        self.tasks: dict[str, asyncio.Task] = {}  # by pipeline: its model's tries

    def loading(self, pipeline: str, model: str, device: str) -> None:
        """At start: `pipeline` reads nothing until `model` is loaded on `device`."""
        flow = self._in_flight(pipeline)
        if flow is None or self._stop.is_set():
            return
        flow.paused, flow.loading = f"its model {model} is loading on {device}", True
        self.tasks[pipeline] = asyncio.create_task(
            self._until_loaded(pipeline, flow, model, device, first_try_s=0.0), name=f"model-load-{pipeline}")

    def pause(self, pipeline: str, model: str, device: str, error: Exception) -> bool:
        """Pause `pipeline` until `model` loads on `device`; False: not a pipeline of this
        daemon's and its model (/predict, a user's job: their frames get the error; their batch
        label, "predict" or "jobs", may be a pipeline's name too)."""
        flow = self._in_flight(pipeline)
        if flow is None or self._models.get(pipeline) != model:
            return False
        if self._stop.is_set():
            return True  # stopping: the frames stay pending for the next start, nothing is tried
        if flow.paused is None:
            flow.paused = _why(model, device, error)
            _log.error("pipeline_paused", pipeline=pipeline, model=model, device=device, error=str(error),
                       why="its model cannot be loaded: its frames wait in Redis until it can")
        task = self.tasks.get(pipeline)
        if task is None or task.done():
            self.tasks[pipeline] = asyncio.create_task(
                self._until_loaded(pipeline, flow, model, device), name=f"model-pause-{pipeline}")
        return True

    async def _until_loaded(self, pipeline: str, flow: InFlight, model: str, device: str,
                            first_try_s: float | None = None) -> None:
        paused_at = time.monotonic()
        delay = RETRY_FIRST_S if first_try_s is None else first_try_s
        failed = delay > 0  # at start (tried at once): not failed until a try fails
        while True:
            due = time.monotonic() + delay
            while time.monotonic() < due and not self._is_loaded(model, device):
                if await wait_or_stop(self._stop, LOOK_EVERY_S):
                    return
            try:
                await self._loader(device, model).load(model)
                break
            # Any failure is tried again: a task that ended here would leave the pipeline paused
            # until a restart (a weights file replaced under the load's size estimate raised
            # FileNotFoundError, no model's error).
            except Exception as e:  # noqa: BLE001
                why: Exception = e
            delay = min(RETRY_MAX_S, max(RETRY_FIRST_S, delay * 2))
            text, flow.loading = _why(model, device, why), False
            if text != flow.paused:
                flow.paused = text
                _log.error("pipeline_still_paused" if failed else "pipeline_paused", pipeline=pipeline,
                           model=model, device=device, error=str(why),
                           why="its model cannot be loaded: its frames wait in Redis until it can")
            failed = True
        flow.paused, flow.loading = None, False
        self._resumed(pipeline)
        if failed:
            _log.info("pipeline_resumed", pipeline=pipeline, model=model, device=device,
                      paused_s=round(time.monotonic() - paused_at, 1))


def _why(model: str, device: str, error: BaseException) -> str:
    return (f"its model {model} cannot be loaded on {device}: {error}. Its frames wait in Redis; the "
            f"load is tried again every {RETRY_MAX_S:g} s at most (POST /models/{model}/load tries at once)")
