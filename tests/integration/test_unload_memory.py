"""Unloading a model gives its memory back, for an ONNX, a transformers and a TorchScript
model, also after ten load/infer/unload cycles (Triton's users report leaks there). RSS is
noisy, so the models are large (about 100 MB) and the bounds are fractions of their size."""

from __future__ import annotations

import pytest

from sightstream.models.catalogue import Catalogue
from sightstream.models.manager import ModelManager
from tests.unload_memory import build, measure

MB = 100


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    return ModelManager(Catalogue(build(tmp_path_factory.mktemp("heavy"), MB)))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("model", ["heavy/onnx", "heavy/torch", "heavy/torchscript"])
async def test_unloading_gives_the_memory_back_cycle_after_cycle(heavy, model):
    row = await measure(heavy, model, "cpu", cycles=10)
    assert row["inferred"] - row["before"] > 0.6 * MB  # the weights were really in memory
    assert row["unloaded"] - row["before"] < 0.25 * MB
    assert row["after_10_cycles"] - row["unloaded"] < 0.1 * MB
    assert not heavy.loaded()
