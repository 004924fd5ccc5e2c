"""`sightstream bench`: the daemon against baselines measured in the same run.

A model run (the default), per batch size:
1. raw: the physical limit. The model's device step alone (`infer` of a staged adapter) on a
   batch already prepared at its input size, same device, same batch size.
2. raw, full frames: the whole model call (prepare, infer, finish) on full-size decoded frames.
3. daemon, throughput: N frames waiting in a private Redis; time until every result is out,
   with the daemon's CPU time per frame (the whole process, and its event loop alone).
4. daemon, latency: frames published at ~60% of that throughput; capture-to-result p50/p99.
Once: naive (a consumer that reads one entry, decodes it, infers, XADDs, XACKs, one at a
time), one JPEG decode full size vs DCT-scaled, and a job's video reader on an H.264 clip.

`--null`: the pipeline's own ceiling, with a model that does nothing, for 1 KB and 1280x720
JPEGs. `--daemons N`: N daemon processes in one group (bench_scaling.py).
Figures are ratios against the baselines, never absolute asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from PIL import Image

from sightstream.config import PipelineSettings, Settings
from sightstream.daemon.daemon import DRAFT_TASKS, Daemon
from sightstream.daemon.devices import nvml_handles
from sightstream.daemon.embedded_redis import EmbeddedRedis
from sightstream.models.adapter import input_shape, is_staged, predict
from sightstream.models.catalogue import Catalogue
from sightstream.models.input_shape import InputShape
from sightstream.models.manager import ModelManager
from sightstream.stages.decoder import decode_image

PHOTO = Path(__file__).parent / "data" / "astronaut.jpg"
STREAM = "frames:{bench}"
DISTINCT = 24  # distinct frames, cycled


def make_frames(size: tuple[int, int], n: int = DISTINCT, quality: int = 90) -> list[bytes]:
    """Camera-like JPEGs: the photo moving across a smooth scene with mild sensor noise, a face
    in each. (Pure noise would make JPEG decoding several times slower than real footage.)"""
    w, h = size
    photo = Image.open(PHOTO).convert("RGB").resize((h // 2, h // 2))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    scene = np.stack([60 + 120 * x / w, 80 + 100 * y / h, 140 - 60 * x / w], axis=-1)
    out = []
    for i in range(n):
        noisy = np.clip(scene + rng.normal(0, 4, scene.shape), 0, 255).astype(np.uint8)
        canvas = Image.fromarray(noisy)
        canvas.paste(photo, (int((w - h // 2) * i / max(1, n - 1)), h // 4))
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def time_decode(jpeg: bytes, target: InputShape | None, repeat: int = 30) -> float:
    decode_image(jpeg, 10**9, target)
    started = time.perf_counter()
    for _ in range(repeat):
        decode_image(jpeg, 10**9, target)
    return (time.perf_counter() - started) / repeat * 1000


def raw_figures(manager: ModelManager, model: str, frames: list[bytes], n: int, batch: int,
                device: str = "cpu") -> dict[str, Any]:
    """The model alone: its device step on prepared batches (the limit), and whole calls on
    full-size frames (what a script calling the model would get). `shape`: how the loaded
    model sizes frames, for the decode figure (dropped from the row)."""
    adapter: Any = manager.create(model)  # whole or staged
    adapter.load(device)
    try:
        arrays = [decode_image(f, 10**9)[0] for f in frames]
        batches = [[arrays[(i + j) % len(arrays)] for j in range(batch)]
                   for i in range(0, len(arrays), batch)]
        size = adapter.input_size
        at_input = [[fit(a, size) if size else a for a in b] for b in batches]
        if is_staged(adapter):
            prepared = [adapter.prepare(b, None, None) for b in at_input]
            device_step = lambda k: adapter.infer(prepared[k % len(prepared)])  # noqa: E731
        else:
            device_step = lambda k: predict(adapter, at_input[k % len(at_input)])  # noqa: E731
        whole = lambda k: predict(adapter, batches[k % len(batches)])  # noqa: E731
        return {"raw_fps": _calls_per_s(device_step, n, batch), "raw_full_fps": _calls_per_s(whole, n, batch),
                "shape": input_shape(adapter)}
    finally:
        adapter.unload()


def fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The image scaled to fit the model's input, keeping its aspect (what the daemon's DCT
    scaling and the adapter's letterbox make of a frame), so raw does no resizing."""
    h, w = image.shape[:2]
    scale = min(size[0] / w, size[1] / h)
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale))))


def _calls_per_s(call: Any, n: int, batch: int) -> float:
    call(0)  # warm up
    calls = max(1, n // batch)
    started = time.perf_counter()
    for k in range(calls):
        call(k)
    return calls * batch / (time.perf_counter() - started)


def naive_fps(url: str, manager: ModelManager, model: str, frames: list[bytes], n: int,
              device: str = "cpu") -> float:
    """What users write by hand: one entry at a time, no batching, no overlap."""
    client = redis.Redis.from_url(url)
    key = "frames:{naive}"
    client.delete(key, "results:naive")
    client.xgroup_create(key, "naive", id="0", mkstream=True)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(key, {"image": frames[i % len(frames)]})
    pipe.execute()
    adapter = manager.create(model)
    adapter.load(device)
    predict(adapter, [decode_image(frames[0], 10**9)[0]])
    started = time.perf_counter()
    for _ in range(n):
        reply: Any = client.xreadgroup("naive", "c", {key: ">"}, count=1)
        ((_, [(entry_id, fields)]),) = reply
        image = np.asarray(Image.open(io.BytesIO(fields[b"image"])).convert("RGB"))
        (pred,) = predict(adapter, [image])
        client.xadd("results:naive", {"frame_id": entry_id, "result": json.dumps(pred.result)})
        client.xack(key, "naive", entry_id)
    elapsed = time.perf_counter() - started
    client.close()
    adapter.unload()
    return n / elapsed


class GpuSampler:
    """GPU utilisation and memory in use, sampled every 0.1 s while a figure is measured, when
    the devices include GPUs and NVML is there (nvidia-ml-py: `import pynvml`); else nothing."""

    def __init__(self, devices: list[str]) -> None:
        self._devices = devices
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handles = list(nvml_handles(pynvml, self._devices).values())
        except Exception:  # noqa: BLE001 - no NVML, no driver: no GPU figures
            return self
        if handles:
            self._thread = threading.Thread(target=self._sample, args=(pynvml, handles), daemon=True)
            self._thread.start()
        return self

    def _sample(self, nvml: Any, handles: list[Any]) -> None:
        while not self._stop.wait(0.1):
            for h in handles:
                used = nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
                self._samples.append((float(nvml.nvmlDeviceGetUtilizationRates(h).gpu), used))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def figures(self) -> dict[str, float]:
        if not self._samples:
            return {}
        return {"gpu_util_pct": statistics.mean(u for u, _ in self._samples),
                "gpu_mem_mb": max(m for _, m in self._samples)}


def bench_settings(url: str, model: str, batch: int, device: str = "cpu",
                   models: dict[str, Any] | None = None) -> Settings:
    pipeline = PipelineSettings(name="bench", input=[STREAM], model=model, batch_size=batch,
                                result_maxlen=0, max_in_flight=max(64, 4 * batch))
    return Settings(redis_url=url, devices=[device], pipelines=[pipeline], control={"port": 0},
                    models=models or {}, log_level="warning")


async def daemon_figures(
    settings: Settings, frames: list[bytes], n: int, latency: bool = True
) -> dict[str, float]:
    """Throughput on a backlog of n frames (and its CPU cost), then latency at 60% of it."""
    url = settings.redis_url
    client = redis.Redis.from_url(url)
    results = f"results:bench:{STREAM}"
    client.delete(STREAM, results)
    daemon = Daemon(settings, host="bench")
    await daemon.start()
    try:
        # warm up: load the model, fill the caches
        client.xadd(STREAM, {"image": frames[0]})
        while client.xlen(results) < 1:
            await asyncio.sleep(0.05)
        # throughput: a backlog of n frames
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.xadd(STREAM, {"image": frames[i % len(frames)]})
        pipe.execute()
        decode_before = _histogram_sum(daemon, "sightstream_decode_seconds")
        infer_before = _histogram_sum(daemon, "sightstream_inference_seconds")
        with GpuSampler(list(settings.devices)) as gpu:
            started, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()
            while await daemon.client.xlen(results) < n + 1:  # async: the loop's CPU is measured
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
        # Process CPU: the loop, decode threads, the device thread and the bench's polling;
        # thread CPU of this thread: the event loop's own share.
        cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
        fps = n / elapsed
        figures = {
            "daemon_fps": fps,
            "daemon_cpu_ms_per_frame": cpu / n * 1000,
            "daemon_loop_cpu_ms_per_frame": loop_cpu / n * 1000,
            # Where the daemon's time goes, per frame (decode runs in parallel threads, so the
            # two can add up to more than the wall time per frame).
            "daemon_decode_ms_per_frame":
                (_histogram_sum(daemon, "sightstream_decode_seconds") - decode_before) / n * 1000,
            "daemon_infer_ms_per_frame":
                (_histogram_sum(daemon, "sightstream_inference_seconds") - infer_before) / n * 1000,
            "daemon_wall_ms_per_frame": 1000 / fps,
        } | gpu.figures()
        if not latency:
            return figures
        # latency: a paced producer at ~60% of that throughput, ts = capture time
        rate = max(1.0, 0.6 * fps)
        m = max(20, min(n, int(rate * 10)))
        before = client.xlen(results)
        t0 = time.perf_counter()
        for i in range(m):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            client.xadd(STREAM, {"image": frames[i % len(frames)], "ts": str(time.time_ns() // 1_000_000)})
        while client.xlen(results) < before + m:
            await asyncio.sleep(0.01)
        published: Any = client.xrange(results)
        latencies = sorted(int(f[b"latency_ms"]) for _, f in published[before:])
    finally:
        await daemon.stop()
        client.close()
    return figures | {
        "latency_rate_fps": rate,
        "latency_p50_ms": statistics.median(latencies),
        "latency_p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def make_clip(path: Path, size: tuple[int, int], seconds: int = 20, fps: int = 25) -> Path:
    """An H.264 clip as cameras send them: a keyframe every second, the scene of make_frames."""
    import av

    frames = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in make_frames(size, 25)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={
            "preset": "ultrafast", "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(seconds * fps):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


async def video_figures(path: Path, fps: float) -> dict[str, float]:
    """One read of the clip at `fps`, decoding every frame, then keyframes only."""
    from sightstream.stages.video_reader import ReaderOptions, VideoSource

    out: dict[str, float] = {}
    for name, keyframes in (("all", False), ("keyframes", True)):
        source = VideoSource(str(path), ReaderOptions(fps=fps, keyframes_only=keyframes))
        started = time.perf_counter()
        kept = 0
        async for _ in source.frames():
            kept += 1
        out[f"video_{name}_s"] = time.perf_counter() - started
        out[f"video_{name}_decoded"] = source.stats.decoded
        out[f"video_{name}_kept"] = kept
    return out


def _histogram_sum(daemon: Daemon, name: str) -> float:
    return sum(
        s.value for metric in daemon.metrics.registry.collect() if metric.name == name
        for s in metric.samples if s.name == f"{name}_sum"
    )


NULL_MODEL = {"bench": {"null": {"backend": "torch", "task": "detect",
                                  "adapter": "sightstream.models.adapters.null:NullModel"}}}
NULL_SIZES = {"1kb": ((40, 30), 4000), "1280x720": ((1280, 720), 600)}  # frames, backlog


def batch_sizes(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b.strip()]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_model(args: argparse.Namespace) -> dict[str, Any]:
    w, h = (int(v) for v in args.size.lower().split("x"))
    model = args.model or PipelineSettings().model
    n, device = args.frames, args.device
    frames = make_frames((w, h))
    models = getattr(args, "models", None) or {}  # the config's entries (--config)
    manager = ModelManager(Catalogue(models))
    drafts = not args.no_draft and manager.catalogue.get(model).task in DRAFT_TASKS  # as the daemon does
    figures: dict[str, Any] = {
        "mode": "model", "machine": machine(), "device": device, "model": model, "frames": n,
        "size": f"{w}x{h}", "decode_full_ms": time_decode(frames[0], None), "decode_draft_ms": None,
        "batches": {},
    }
    print(f"bench: {model} on {device}, {n} frames of {w}x{h} JPEG", flush=True)
    with EmbeddedRedis() as server:
        figures["naive_fps"] = naive_fps(server.url, manager, model, frames, max(30, n // 3), device)
        print(f"  naive consumer: {figures['naive_fps']:.1f} frames/s", flush=True)
        for batch in batch_sizes(args.batch_sizes):
            row = raw_figures(manager, model, frames, n, batch, device)
            shape = row.pop("shape")
            if drafts and shape is not None and figures["decode_draft_ms"] is None:
                figures["decode_draft_ms"] = time_decode(frames[0], shape)  # as the loaded model sizes frames
            settings = bench_settings(server.url, model, batch, device, models)
            row |= asyncio.run(daemon_figures(settings, frames, n))
            row["daemon_vs_raw"] = row["daemon_fps"] / row["raw_fps"]
            row["daemon_vs_raw_full"] = row["daemon_fps"] / row["raw_full_fps"]
            row["daemon_vs_naive"] = row["daemon_fps"] / figures["naive_fps"]
            figures["batches"][str(batch)] = row
            print(report_batch(batch, row), flush=True)
            gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", (w, h))
        figures.update(asyncio.run(video_figures(clip, 0.5)))
    return figures


def run_null(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's own ceiling: a model that does nothing, small and camera-sized JPEGs."""
    figures: dict[str, Any] = {"mode": "null", "machine": machine(), "sizes": {}}
    with EmbeddedRedis() as server:
        for name, (size, n) in NULL_SIZES.items():
            frames = make_frames(size)
            rows: dict[str, Any] = {"jpeg_bytes": int(statistics.mean(len(f) for f in frames))}
            for batch in batch_sizes(args.batch_sizes):
                settings = bench_settings(server.url, "bench/null", batch, models=NULL_MODEL)
                rows[str(batch)] = asyncio.run(daemon_figures(settings, frames, n, latency=False))
                print(report_null(name, batch, rows[str(batch)]), flush=True)
            figures["sizes"][name] = rows
    return figures


def report_batch(batch: int, f: dict[str, Any]) -> str:
    return "\n".join([
        f"  batch {batch}:",
        f"    raw (device step on prepared batches): {f['raw_fps']:.1f} frames/s; "
        f"whole calls on full frames: {f['raw_full_fps']:.1f} frames/s",
        f"    daemon end to end: {f['daemon_fps']:.1f} frames/s, CPU {f['daemon_cpu_ms_per_frame']:.2f} "
        f"ms/frame (event loop {f['daemon_loop_cpu_ms_per_frame']:.3f})",
        f"    daemon latency at {f['latency_rate_fps']:.0f} frames/s: p50 {f['latency_p50_ms']:.0f} ms, "
        f"p99 {f['latency_p99_ms']:.0f} ms",
        f"    daemon time per frame: {f['daemon_wall_ms_per_frame']:.1f} ms wall; inference "
        f"{f['daemon_infer_ms_per_frame']:.1f} ms, decode {f['daemon_decode_ms_per_frame']:.1f} ms "
        "(in parallel)",
        f"    daemon / raw {f['daemon_vs_raw']:.2f}, / raw full frames {f['daemon_vs_raw_full']:.2f}, "
        f"/ naive {f['daemon_vs_naive']:.2f}",
        *([f"    GPU: {f['gpu_util_pct']:.0f}% busy, {f['gpu_mem_mb']:.0f} MB in use"]
          if "gpu_util_pct" in f else []),
    ])


def report_null(name: str, batch: int, f: dict[str, Any]) -> str:
    return (f"  null model, {name} JPEGs, batch {batch}: {f['daemon_fps']:.0f} frames/s, daemon CPU "
            f"{f['daemon_cpu_ms_per_frame']:.3f} ms/frame, event loop "
            f"{f['daemon_loop_cpu_ms_per_frame']:.3f} ms/frame")


def report_once(f: dict[str, Any]) -> str:
    return "\n".join([
        f"  JPEG decode of one {f['size']} frame: full {f['decode_full_ms']:.1f} ms"
        + (f", DCT-scaled to the model input {f['decode_draft_ms']:.1f} ms" if f["decode_draft_ms"] else ""),
        f"  video at 0.5 fps of a 20 s {f['size']} H.264 clip (a keyframe a second): every frame decoded "
        f"{f['video_all_decoded']} in {f['video_all_s']:.2f} s, keyframes only "
        f"{f['video_keyframes_decoded']} in {f['video_keyframes_s']:.2f} s "
        f"({f['video_all_s'] / f['video_keyframes_s']:.1f}x less time); "
        f"{f['video_keyframes_kept']} frames kept",
    ])


def main(args: argparse.Namespace) -> int:
    from sightstream import log

    log.configure("warning")
    # SIGTERM as Ctrl-C: the private Redis and the daemons' processes are stopped on the way
    # out (a plain SIGTERM left them running)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.daemons:
        from sightstream.bench_scaling import run_scaling

        figures = run_scaling(args)
    elif args.null:
        figures = run_null(args)
    else:
        figures = run_model(args)
        print(report_once(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0
