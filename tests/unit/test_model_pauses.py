"""The pause of a pipeline whose model cannot be loaded (daemon/model_pauses.py)."""

from __future__ import annotations

import asyncio

from sightstream.daemon import model_pauses
from sightstream.errors import ModelError
from sightstream.stages.flow import InFlight


class Loader:
    """Fails with each of `errors` in turn, then loads."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.tries = list(errors), 0
        self.loaded = False

    async def load(self, model: str) -> dict:
        self.tries += 1
        if self.errors:
            raise self.errors.pop(0)
        self.loaded = True
        return {}


async def test_any_failure_of_a_try_is_tried_again_and_the_pipeline_goes_on(monkeypatch):
    """A weights file replaced under the load's size estimate raised FileNotFoundError, no
    model's error: the tries ended there and the pipeline stayed paused until a restart."""
    monkeypatch.setattr(model_pauses, "RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(model_pauses, "LOOK_EVERY_S", 0.01)
    flow, loader, resumed = InFlight(4), Loader(FileNotFoundError("weights.onnx"), ModelError("bad file")), []
    pauses = model_pauses.ModelPauses({"people": "m/v"}, lambda m, d: loader.loaded, lambda name: flow,
                                      lambda d, m: loader, resumed.append, asyncio.Event())
    assert pauses.pause("people", "m/v", "cpu", ModelError("no weights"))
    assert "m/v cannot be loaded on cpu: no weights" in flow.paused
    await asyncio.wait_for(pauses.tasks["people"], 5)
    assert loader.tries == 3 and flow.paused is None and resumed == ["people"]


async def test_a_pause_while_stopping_leaves_the_frames_pending_and_tries_nothing():
    stop = asyncio.Event()
    stop.set()
    flow = InFlight(4)
    pauses = model_pauses.ModelPauses({"people": "m/v"}, lambda m, d: False,
                                      lambda name: flow if name == "people" else None,
                                      lambda d, m: Loader(), lambda name: None, stop)
    assert pauses.pause("people", "m/v", "cpu", ModelError("no weights"))  # not dead-lettered
    assert not pauses.tasks and flow.paused is None
    assert not pauses.pause("predict", "m/v", "cpu", ModelError("no weights"))  # not a pipeline: its error
