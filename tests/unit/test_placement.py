"""Per-source placement for stateful models on several devices: the batcher sends each
source's frames to one worker's own queue, and a worker serves its own queue first, drains it
at STOP, and loses no batch when both queues have one."""

from __future__ import annotations

import asyncio

import pytest

from sightstream.config import PipelineSettings
from sightstream.frames import Batch, Frame
from sightstream.metrics import Metrics
from sightstream.stages.batcher import Batcher
from sightstream.stages.flow import STOP
from sightstream.stages.worker import Worker
from tests.conftest import wait_for


def frame(source: str, n: int) -> Frame:
    return Frame("p", source, f"{n}-0", {}, n)


async def test_a_source_always_goes_to_the_same_worker_queue():
    inq: asyncio.Queue = asyncio.Queue()
    pinned = [asyncio.Queue(), asyncio.Queue(), asyncio.Queue()]
    batcher = Batcher(PipelineSettings(name="p", batch_size=4, batch_timeout_ms=0), inq,
                      asyncio.Queue(), pinned)
    sources = [f"frames:{{cam{i}}}" for i in range(6)]
    for n in range(24):
        inq.put_nowait(frame(sources[n % 6], n))
    inq.put_nowait(STOP)
    await batcher.run()
    seen: dict[str, set[int]] = {}
    for k, q in enumerate(pinned):
        while not q.empty():
            for f in q.get_nowait().frames:
                seen.setdefault(f.source, set()).add(k)
    assert set(seen) == set(sources) and all(len(ks) == 1 for ks in seen.values())
    assert len({k for ks in seen.values() for k in ks}) > 1  # and sources are spread


async def test_a_worker_serves_its_own_queue_first_and_drains_it_at_stop(monkeypatch):
    shared: asyncio.Queue = asyncio.Queue()
    worker = Worker("cpu", None, shared, asyncio.Queue(), Metrics())  # type: ignore[arg-type]
    done: list[str] = []

    def named(name: str) -> Batch:
        return Batch(name, "m", "o", 0, [])  # the pipeline field names it here

    async def process(batch, *_):
        done.append(batch.pipeline)
        await asyncio.sleep(0)
        return []

    monkeypatch.setattr(worker, "process", process)
    shared.put_nowait(named("shared-1"))
    worker.own.put_nowait(named("own-1"))
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: len(done) == 2, 1, "the first two batches")
    assert done == ["own-1", "shared-1"]
    worker.own.put_nowait(named("own-2"))  # both queues fill while the worker waits on both
    shared.put_nowait(named("shared-2"))
    await wait_for(lambda: len(done) == 4, 1, "the next two batches")
    worker.own.put_nowait(named("own-3"))
    shared.put_nowait(STOP)
    await asyncio.wait_for(task, 1)
    assert sorted(done) == ["own-1", "own-2", "own-3", "shared-1", "shared-2"]
    assert shared.get_nowait() is STOP  # passed on to sibling workers
    worker.close()


def test_auto_devices_count_gpus_that_torch_sees_without_onnxruntime_gpu(monkeypatch):
    from sightstream.daemon import devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "_onnxruntime_has_cuda", lambda: False)
    monkeypatch.setattr(devices, "_torch_has_cuda", lambda: True)
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: type("R", (), {
        "stdout": "GPU 0: NVIDIA H100 (UUID: GPU-a1)\nGPU 1: NVIDIA H100 (UUID: GPU-b2)\n"})())
    assert devices.resolve("auto") == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # one GPU of two: one worker, cuda:0
    assert devices.resolve("auto") == ["cuda:0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # none
    assert devices.resolve("auto") == ["cpu"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(devices, "_torch_has_cuda", lambda: False)
    assert devices.resolve("auto") == ["cpu"]


def test_a_gpu_named_in_the_config_must_be_one_this_process_can_use(monkeypatch):
    """devices = ["cuda:0"] on a host without one started, and its worker ran on the CPU under
    the GPU's name (the bench's figures too)."""
    from sightstream.daemon import devices
    from sightstream.errors import ConfigError

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "_onnxruntime_has_cuda", lambda: False)
    monkeypatch.setattr(devices, "_torch_has_cuda", lambda: False)
    assert devices.resolve(["cpu"]) == ["cpu"]
    with pytest.raises(ConfigError, match=r"^invalid setting devices: cuda:0 is not a GPU this process can use: "
                                          r"neither a CUDA build of torch nor onnxruntime-gpu is installed"):
        devices.resolve(["cuda:0"])
    monkeypatch.setattr(devices, "_torch_has_cuda", lambda: True)
    monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: type("R", (), {
        "stdout": "GPU 0: NVIDIA H100 (UUID: GPU-a1)\nGPU 1: NVIDIA H100 (UUID: GPU-b2)\n"})())
    assert devices.resolve(["cuda:1", "cuda:0"]) == ["cuda:1", "cuda:0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ConfigError, match=r"cuda:1 is not a GPU this process can use: 1 visible "
                                          r"\(CUDA_VISIBLE_DEVICES='1'\)"):
        devices.resolve(["cuda:0", "cuda:1"])


@pytest.mark.parametrize("visible,order", [
    (None, [0, 1, 2]),
    ("", []),
    ("-1", []),
    ("2,0", [2, 0]),
    ("1,7,0", [1]),  # CUDA stops at the first entry that names no GPU
    ("0,0,1", [0]),  # or names one twice
    ("GPU-c3,GPU-a", [2, 0]),  # UUIDs, or unambiguous prefixes of them
    ("GPU-", []),  # a prefix of every UUID names none
    ("MIG-5f2e,MIG-9a1b", [None]),  # a process sees one MIG instance; NVML has no index for it
])
def test_cuda_visible_devices_map_cuda_s_numbers_to_nvml_s(visible, order):
    from sightstream.daemon.devices import cuda_order

    assert cuda_order(["GPU-a1", "GPU-b2", "GPU-c3"], visible) == order


def test_auto_devices_do_not_import_torch():
    """torch's CUDA build is told from its version.py: an ONNX-only daemon does not pay for
    importing torch (seconds, hundreds of MB)."""
    import subprocess
    import sys

    code = ("import sys; from sightstream.daemon.devices import resolve, _torch_has_cuda; "
            "print(resolve('auto'), _torch_has_cuda(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["['cpu']", "False", "False"], out.stderr  # this torch is a CPU build


def test_without_nvidia_smi_torch_counts_the_gpus(monkeypatch):
    """A Jetson has a CUDA torch and no nvidia-smi: its cuda:0 must not be refused."""
    from sightstream.daemon import devices
    from sightstream.errors import ConfigError

    monkeypatch.setattr(devices, "_onnxruntime_has_cuda", lambda: False)
    monkeypatch.setattr(devices, "_torch_has_cuda", lambda: True)
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    monkeypatch.setattr(devices, "_torch_gpus", lambda: devices.Gpus(1, "1 visible to torch", "not asked"))
    assert devices.resolve(["cuda:0"]) == ["cuda:0"]
    with pytest.raises(ConfigError, match="cuda:1 is not a GPU this process can use: 1 visible to torch"):
        devices.resolve(["cuda:1"])
