"""The model manager: lazy loading, a memory budget per device with LRU eviction, idle unload."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from sightstream.config import ModelEntry
from sightstream.errors import ModelError
from sightstream.models.catalogue import Catalogue
from sightstream.models.manager import ModelManager, ModelTooLarge
from tests.fake_adapters import entry


def manager(budget_mb: float | None = None, **sizes: float) -> ModelManager:
    catalogue = Catalogue({"fake": {name: ModelEntry(**entry(memory_mb=mb)) for name, mb in sizes.items()}})
    return ModelManager(catalogue, {"cpu": budget_mb} if budget_mb else None, room_wait_s=0.3)


@pytest.fixture
def pool():
    with ThreadPoolExecutor(1) as executor:
        yield executor


async def test_the_least_recently_used_idle_model_is_evicted_to_make_room(pool):
    m = manager(1000, a=400, b=400, c=400)
    for name in ("a", "b"):
        async with m.use(f"fake/{name}", "cpu", pool):
            pass
    async with m.use("fake/a", "cpu", pool):  # a is now more recent than b
        pass
    async with m.use("fake/c", "cpu", pool):
        pass
    assert sorted(x["model"] for x in m.loaded()) == ["fake/a", "fake/c"]
    assert m.used_mb("cpu") == 800


async def test_a_model_in_use_is_never_evicted(pool):
    m = manager(1000, a=600, b=600)
    async with m.use("fake/a", "cpu", pool):  # held past room_wait_s: the load of b gives up
        with pytest.raises(ModelTooLarge, match=r"fake/b needs about 600 MB; cpu has 400 MB free .* in use \(fake/a\)"):
            async with m.use("fake/b", "cpu", pool):
                pass
    async with m.use("fake/b", "cpu", pool):  # once a is idle it can go
        pass
    assert [x["model"] for x in m.loaded()] == ["fake/b"]


async def test_a_model_bigger_than_the_budget_is_a_clear_error(pool):
    m = manager(500, huge=2000)
    with pytest.raises(ModelTooLarge, match="needs about 2000 MB; the budget of cpu is 500 MB"):
        await m.load("fake/huge", "cpu", pool)
    assert m.loaded() == []


async def test_no_budget_means_no_eviction(pool):
    m = manager(None, a=10_000, b=10_000)
    for name in ("a", "b"):
        await m.load(f"fake/{name}", "cpu", pool)
    assert len(m.loaded()) == 2


async def test_idle_models_are_unloaded(pool):
    m = manager(None, a=1, b=1)
    await m.load("fake/a", "cpu", pool)
    async with m.use("fake/b", "cpu", pool):
        gone = m.cleanup(inactive_seconds=0)
        assert gone == [{"model": "fake/a", "device": "cpu"}]  # b is in use
    assert [x["model"] for x in m.loaded()] == ["fake/b"]
    assert m.cleanup(inactive_seconds=3600) == []  # b was just used


async def test_explicit_unload(pool):
    m = manager(None, a=1)
    await m.load("fake/a", "cpu", pool)
    async with m.use("fake/a", "cpu", pool):
        with pytest.raises(ModelError, match="in use"):
            m.unload("fake/a")
    assert m.unload("fake/a") == ["cpu"] and m.loaded() == []


async def test_concurrent_loads_on_one_device_take_turns_within_the_budget(pool):
    """Two batches in flight want two models that do not fit together: the second load waits
    for the first model to be let go, evicts it, and loads; never both at once."""
    m = manager(1000, a=600, b=600)
    m.room_wait_s = 5
    used: list[float] = []

    async def hold(name: str):
        async with m.use(f"fake/{name}", "cpu", pool):
            used.append(m.used_mb("cpu"))
            await asyncio.sleep(0.05)

    await asyncio.gather(hold("a"), hold("b"))
    assert used == [600, 600] and [x["model"] for x in m.loaded()] == ["fake/b"]


async def test_a_load_queued_behind_a_long_call_keeps_no_other_load_waiting(pool):
    """A device's text worker and frames worker each load on their own thread: a load queued
    behind a text call that takes minutes must not hold up the frames' model's load."""
    import threading

    m = manager(2000, a=600, b=600)
    release = threading.Event()
    pool.submit(release.wait, 10)  # the long call on a's thread
    queued = asyncio.ensure_future(m.load("fake/a", "cpu", pool))
    await asyncio.sleep(0.05)
    with ThreadPoolExecutor(1) as other:
        await asyncio.wait_for(m.load("fake/b", "cpu", other), 5)
    assert not queued.done() and [x["model"] for x in m.loaded()] == ["fake/b"]
    release.set()
    await queued
    assert sorted(x["model"] for x in m.loaded()) == ["fake/a", "fake/b"] and m.used_mb("cpu") == 1200


async def test_a_load_under_way_keeps_its_room(pool):
    """Room promised to a load still on its way is not given to another: the second waits,
    then evicts the first once it is loaded and idle; the budget is never exceeded."""
    import threading

    m = manager(1000, a=600, b=600)
    m.room_wait_s = 5
    release = threading.Event()
    pool.submit(release.wait, 10)
    first = asyncio.ensure_future(m.load("fake/a", "cpu", pool))
    await asyncio.sleep(0.05)
    with ThreadPoolExecutor(1) as other:
        second = asyncio.ensure_future(m.load("fake/b", "cpu", other))
        await asyncio.sleep(0.2)
        assert not second.done() and m.loaded() == []  # waiting for the room a's load holds
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert [x["model"] for x in m.loaded()] == ["fake/b"] and m.used_mb("cpu") == 600


async def test_loads_unloads_and_memory_are_counted_per_device(pool):
    from sightstream.metrics import Metrics

    m = manager(1000, a=600, b=600)
    m._metrics = metrics = Metrics()
    await m.load("fake/a", "cpu", pool)
    await m.load("fake/b", "cpu", pool)  # evicts a
    m.unload("fake/b", "cpu")

    def value(name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    assert value("sightstream_model_loads_total", device="cpu") == 2
    assert value("sightstream_model_unloads_total", device="cpu", reason="evicted") == 1
    assert value("sightstream_model_unloads_total", device="cpu", reason="requested") == 1


async def test_a_load_that_ends_after_the_daemon_stopped_is_let_go(pool):
    """An overdue load that ends late is taken in as loaded, unless the manager was closed
    meanwhile (the daemon stopped): then it is unloaded, and its room given back."""
    from sightstream.models.manager import LoadTimeout

    catalogue = Catalogue({"fake": {"slow": ModelEntry(**entry(memory_mb=100, load_s=0.6))}})
    m = ModelManager(catalogue, {"cpu": 1000}, load_timeout_s=0.2)
    with pytest.raises(LoadTimeout, match="did not load on cpu within 0.2 s"):
        await m.load("fake/slow", "cpu", pool)
    assert m._reserved_mb["cpu"] == 100
    m.unload_all()
    await asyncio.sleep(0.8)  # the load has ended by now
    assert not m.is_loaded("fake/slow") and m._reserved_mb["cpu"] == 0


async def test_a_model_whose_load_failed_is_tried_again_after_a_back_off_not_per_batch(pool, monkeypatch):
    """A bad weights file swapped in was read again for every batch (five loads a second of a
    200 MB file at 5 fps); an explicit load (POST …/load) still tries at once."""
    import sightstream.models.manager as manager_module

    tries = []
    real = manager_module._load
    monkeypatch.setattr(manager_module, "_load", lambda *a: (tries.append(1), real(*a)))
    catalogue = Catalogue({"fake": {"bad": ModelEntry(**entry(fail_load=True))}})
    m = ModelManager(catalogue)
    for _ in range(5):
        with pytest.raises(ModelError, match=r"failed to load on cpu: KeyError"):
            async with m.use("fake/bad", "cpu", pool):
                pass
    assert len(tries) == 1  # the others got its error at once, within the 1 s back-off
    with pytest.raises(ModelError):
        await m.load("fake/bad", "cpu", pool)
    assert len(tries) == 2
    m._failed_loads[("fake/bad", "cpu")].until = 0  # its back-off (now 2 s) over
    with pytest.raises(ModelError):
        async with m.use("fake/bad", "cpu", pool):
            pass
    assert len(tries) == 3 and m._failed_loads[("fake/bad", "cpu")].tries == 3


async def test_a_built_in_model_that_fails_its_test_frame_fails_its_load(pool, tmp_path, monkeypatch):
    """Labels that do not match the export's outputs: every frame failed, and the load said
    200. The test frame runs once per version of the file, not at every reload."""
    from sightstream.models import self_test
    from tests.tiny_models import ROWS, constant_yolov8

    path = constant_yolov8(tmp_path / "y.onnx", ROWS, classes=2, size=64)
    wrong = Catalogue({"yolo": {"v": ModelEntry(backend="onnx", task="detect", path=str(path), labels=["a"])}})
    with pytest.raises(ModelError, match="fails on a test frame.*labels name 1 classes"):
        await ModelManager(wrong).load("yolo/v", "cpu", pool)

    runs = []
    real = self_test.run
    monkeypatch.setattr(self_test, "run", lambda *a: (runs.append(a[1].shape), real(*a))[1])
    right = ModelManager(Catalogue({"yolo": {"v": ModelEntry(backend="onnx", task="detect", path=str(path),
                                                             labels=["a", "b"])}}))
    for _ in range(2):
        await right.load("yolo/v", "cpu", pool)
        right.unload("yolo/v")
    assert runs == [(64, 64, 3)]  # tested once
    constant_yolov8(path, ROWS, classes=2, size=64)  # the file replaced (a rollout): tested again
    await right.load("yolo/v", "cpu", pool)
    assert len(runs) == 2


async def test_models_that_evict_each_other_over_and_over_are_said_once_a_minute(pool):
    from structlog.testing import capture_logs

    m = manager(1000, a=600, b=600)
    with capture_logs() as logged:
        for _ in range(12):  # two pipelines' models taking turns on a budget that holds one
            for name in ("a", "b"):
                async with m.use(f"fake/{name}", "cpu", pool):
                    pass
    said = [e for e in logged if e["event"] == "models_thrashing"]
    assert len(said) == 1 and said[0]["device"] == "cpu" and "max_memory_mb" in said[0]["hint"]


def _yolo(path, rows=None, labels=("a", "b"), **options) -> ModelManager:
    from tests.tiny_models import ROWS, constant_yolov8

    constant_yolov8(path, rows or ROWS, classes=2, size=64)
    return ModelManager(Catalogue({"yolo": {"v": ModelEntry(backend="onnx", task="detect", path=str(path),
                                                            labels=list(labels), **options)}}))


async def _top_label(m: ModelManager, pool) -> str:
    import numpy as np

    from sightstream.models.adapter import predict

    async with m.use("yolo/v", "cpu", pool) as adapter:
        (prediction,) = await asyncio.get_running_loop().run_in_executor(
            pool, predict, adapter, [np.zeros((64, 64, 3), np.uint8)])
    return prediction.result["detections"][0]["label"]


async def test_a_load_of_a_loaded_model_whose_file_changed_loads_the_new_file(pool, tmp_path):
    """A rollout to a running daemon: POST …/load answered the copy loaded at start and the new
    file was read only at the next restart. Now the new file is loaded beside the old copy,
    takes the next calls, and the old copy is let go."""
    from tests.tiny_models import constant_yolov8

    path = tmp_path / "y.onnx"
    m = _yolo(path)
    first = await m.load("yolo/v", "cpu", pool)
    assert await _top_label(m, pool) == "b"
    assert (await m.load("yolo/v", "cpu", pool))["loaded_at"] == first["loaded_at"]  # unchanged: kept
    swapped = [[32, 32, 20, 20, 0.95, 0.10]]  # the new export finds class 0
    constant_yolov8(path, swapped, classes=2, size=64)
    again = await m.load("yolo/v", "cpu", pool)
    assert again["loaded_at"] > first["loaded_at"]
    assert await _top_label(m, pool) == "a"
    assert len(m.loaded()) == 1
    await asyncio.sleep(0.2)
    assert m._retiring == []  # the old copy, idle, was let go


async def test_a_reload_lets_a_call_in_flight_finish_on_the_old_copy(pool, tmp_path):
    from tests.tiny_models import constant_yolov8

    path = tmp_path / "y.onnx"
    m = _yolo(path, memory_mb=100)
    await m.load("yolo/v", "cpu", pool)
    async with m.use("yolo/v", "cpu", pool) as old:
        constant_yolov8(path, [[32, 32, 20, 20, 0.95, 0.10]], classes=2, size=64)
        await m.load("yolo/v", "cpu", pool)
        await asyncio.sleep(0.2)
        assert [entry.adapter for _, entry in m._retiring] == [old]  # held: not let go under the call
        assert m.used_mb("cpu") == 200  # both copies count until the old one is let go
    await asyncio.sleep(0.2)
    assert m._retiring == [] and await _top_label(m, pool) == "a"


async def test_a_new_file_that_fails_leaves_the_loaded_copy_in_use(pool, tmp_path):
    path = tmp_path / "y.onnx"
    m = _yolo(path)
    await m.load("yolo/v", "cpu", pool)
    path.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match=r"cannot load the model.*\(its file changed since model yolo/v was loaded on cpu: the copy loaded at .* stays in use\)"):
        await m.load("yolo/v", "cpu", pool)
    assert await _top_label(m, pool) == "b" and m._retiring == []
    assert ("yolo/v", "cpu") not in m._failed_loads  # the pipeline has its model: nothing to back off


async def test_a_reload_that_cannot_hold_both_copies_says_how_to_roll_the_file_out(pool, tmp_path):
    from tests.tiny_models import constant_yolov8

    path = tmp_path / "y.onnx"
    constant_yolov8(path, [[32, 32, 20, 20, 0.10, 0.90]], classes=2, size=64)
    catalogue = Catalogue({"yolo": {"v": ModelEntry(backend="onnx", task="detect", path=str(path),
                                                    labels=["a", "b"], memory_mb=600)}})
    m = ModelManager(catalogue, {"cpu": 1000}, room_wait_s=0.3)
    await m.load("yolo/v", "cpu", pool)
    constant_yolov8(path, [[32, 32, 20, 20, 0.95, 0.10]], classes=2, size=64)
    with pytest.raises(ModelTooLarge, match="a reload holds the loaded copy.*unload the model, then load it"):
        await m.load("yolo/v", "cpu", pool)
    assert await _top_label(m, pool) == "b"
    m.unload("yolo/v")
    await m.load("yolo/v", "cpu", pool)
    assert await _top_label(m, pool) == "a"


async def test_a_model_being_reloaded_is_neither_unloaded_nor_evicted_meanwhile(pool, tmp_path):
    """An unload (or eviction) during a reload was undone when the new copy was put in, and
    the old copy unloaded twice."""
    from tests.tiny_models import constant_yolov8

    path = tmp_path / "y.onnx"
    m = _yolo(path)
    await m.load("yolo/v", "cpu", pool)
    constant_yolov8(path, [[32, 32, 20, 20, 0.95, 0.10]], classes=2, size=64)
    blocker = asyncio.get_running_loop().run_in_executor(pool, __import__("time").sleep, 0.5)
    reloading = asyncio.create_task(m.load("yolo/v", "cpu", pool))  # queued behind the device's call
    await asyncio.sleep(0.1)
    with pytest.raises(ModelError, match="is being reloaded from its new file"):
        m.unload("yolo/v")
    assert m.cleanup(0) == []
    await blocker
    await reloading
    assert await _top_label(m, pool) == "a" and len(m.loaded()) == 1


def test_a_model_with_no_weights_path_has_one_file_version(tmp_path, monkeypatch):
    """A plug-in without a path took the working directory's files for its weights: any file
    written there made a load re-read it."""
    from sightstream.models.self_test import file_version

    monkeypatch.chdir(tmp_path)
    before = file_version("")
    (tmp_path / "daemon.log").write_text("a line")
    assert file_version("") == before


async def test_a_load_timeout_under_a_second_is_kept(pool):
    """The wait for the device thread to start the load looked again after 1 s only: a
    0.3 s timeout let a 0.8 s load through."""
    from sightstream.models.manager import LoadTimeout

    catalogue = Catalogue({"fake": {"slow": ModelEntry(**entry(load_s=0.7))}})
    busy = asyncio.get_running_loop().run_in_executor(pool, __import__("time").sleep, 0.2)  # a call ahead
    with pytest.raises(LoadTimeout, match="within 0.3 s"):
        await ModelManager(catalogue, load_timeout_s=0.3).load("fake/slow", "cpu", pool)
    await busy
