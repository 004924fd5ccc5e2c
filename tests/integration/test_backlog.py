"""The backlog gauges an operator alerts on: pending and lag per pipeline and source, from a
real redis-server's XINFO; gauges of streams no longer read are dropped."""

from __future__ import annotations

import asyncio

import pytest

from sightstream.daemon.backlog import keep_gauges
from sightstream.daemon.devices import watch_gpus
from sightstream.metrics import Metrics
from sightstream.redis_conn import close_client, make_client
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


async def test_pending_and_lag_per_source_follow_redis(redis_url, sync_redis):
    for stream in ("frames:{a}", "frames:{b}"):
        sync_redis.xgroup_create(stream, "people", id="0", mkstream=True)
        for _ in range(5):
            sync_redis.xadd(stream, {"image": b"x"})
    sync_redis.xreadgroup("people", "c", {"frames:{a}": ">"}, count=3)  # 3 pending, 2 unread
    sync_redis.sadd("sightstream:jobs:active", "j1", "j2")  # two jobs pending or running
    client = make_client(redis_url)
    metrics, stop = Metrics(), asyncio.Event()
    streams = ["frames:{a}", "frames:{b}"]
    task = asyncio.create_task(keep_gauges(client, {"people": lambda: streams}, metrics, stop, every_s=0.05))

    def value(gauge, source):
        return metrics.registry.get_sample_value(gauge, {"pipeline": "people", "source": source})

    try:
        await wait_for(lambda: value("sightstream_source_lag", "frames:{b}") == 5, what="the gauges")
        assert value("sightstream_source_pending", "frames:{a}") == 3
        assert value("sightstream_source_lag", "frames:{a}") == 2
        assert metrics.registry.get_sample_value("sightstream_jobs_active") == 2
        assert value("sightstream_source_pending", "frames:{b}") == 0
        streams.remove("frames:{b}")  # no longer read: its gauges go
        await wait_for(lambda: value("sightstream_source_lag", "frames:{b}") is None, what="the drop")
        assert value("sightstream_source_pending", "frames:{a}") == 3
    finally:
        stop.set()
        await task
        await close_client(client)


def test_no_gpu_gauges_without_gpus_or_nvml():
    metrics = Metrics()
    assert watch_gpus(["cpu"], metrics) is False
    assert watch_gpus(["cuda:0"], metrics) is False  # no NVML on this machine
    assert metrics.registry.get_sample_value("sightstream_gpu_utilization_percent", {"device": "cuda:0"}) is None


def fake_nvml(monkeypatch, readings: dict[str, dict[str, int]]):
    """NVML with one GPU per entry of `readings` (UUID -> util and used bytes), no driver."""
    import sys
    import types

    uuids = list(readings)
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(uuids)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: uuids[i]
    nvml.nvmlDeviceGetUUID = lambda h: h.encode()  # older nvidia-ml-py answers bytes
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=readings[h]["util"])
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=readings[h]["used"])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_gpu_gauges_read_nvml_at_each_scrape(monkeypatch):
    """With NVML there (faked here: no GPU), each scrape reads utilisation and memory."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    readings = {"GPU-a": {"util": 37, "used": 3 * 2**30}}
    fake_nvml(monkeypatch, readings)
    metrics = Metrics()
    assert watch_gpus(["cuda:0", "cpu"], metrics) is True

    def value(name):
        return metrics.registry.get_sample_value(name, {"device": "cuda:0"})

    assert value("sightstream_gpu_utilization_percent") == 37
    assert value("sightstream_gpu_memory_used_mb") == 3072
    readings["GPU-a"]["util"] = 90
    assert value("sightstream_gpu_utilization_percent") == 90


def test_gpu_gauges_read_the_gpu_cuda_numbers_so_under_cuda_visible_devices(monkeypatch):
    """CUDA_VISIBLE_DEVICES=2,0: what the daemon calls cuda:0 is the host's third GPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    fake_nvml(monkeypatch, {f"GPU-{i}": {"util": 10 * i, "used": 0} for i in range(3)})
    metrics = Metrics()
    assert watch_gpus(["cuda:0", "cuda:1", "cuda:2"], metrics) is True

    def util(device):
        return metrics.registry.get_sample_value("sightstream_gpu_utilization_percent", {"device": device})

    assert (util("cuda:0"), util("cuda:1"), util("cuda:2")) == (20, 0, None)  # no third visible GPU
