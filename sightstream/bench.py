"""`sightstream bench`: the daemon against two baselines measured in the same run.

1. decode: one frame's JPEG decode, full size vs DCT-scaled (Pillow `draft`) to the model input.
2. raw: the model alone on pre-decoded frames, in one process, at the same batch size.
3. naive: a consumer that reads one entry, decodes it, infers, XADDs, XACKs, one at a time.
4. daemon, throughput: N frames waiting in a private Redis; time until every result is out.
5. daemon, latency: frames published at ~60% of that throughput; capture-to-result p50/p99.
6. video: a job's reader sampling an H.264 clip at a low fps, decoding keyframes only vs
   every frame (frames decoded, seconds spent).
Figures are ratios against the baselines, never absolute asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from PIL import Image

from sightstream.config import PipelineSettings, Settings
from sightstream.daemon.daemon import Daemon
from sightstream.daemon.embedded_redis import EmbeddedRedis
from sightstream.models.adapter import predict
from sightstream.models.catalogue import Catalogue
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


def time_decode(jpeg: bytes, target: tuple[int, int] | None, repeat: int = 30) -> float:
    decode_image(jpeg, 10**9, target)
    started = time.perf_counter()
    for _ in range(repeat):
        decode_image(jpeg, 10**9, target)
    return (time.perf_counter() - started) / repeat * 1000


def raw_fps(model: str, frames: list[bytes], n: int, batch: int) -> float:
    adapter = ModelManager(Catalogue()).create(model)
    adapter.load("cpu")
    arrays = [decode_image(f, 10**9)[0] for f in frames]
    predict(adapter, arrays[:batch])  # warm up
    started = time.perf_counter()
    done = 0
    while done < n:
        k = min(batch, n - done)
        predict(adapter, [arrays[(done + j) % len(arrays)] for j in range(k)])
        done += k
    return n / (time.perf_counter() - started)


def naive_fps(url: str, model: str, frames: list[bytes], n: int) -> float:
    """What users write by hand: one entry at a time, no batching, no overlap."""
    client = redis.Redis.from_url(url)
    key = "frames:{naive}"
    client.delete(key, "results:naive")
    client.xgroup_create(key, "naive", id="0", mkstream=True)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(key, {"image": frames[i % len(frames)]})
    pipe.execute()
    adapter = ModelManager(Catalogue()).create(model)
    adapter.load("cpu")
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
    return n / elapsed


async def daemon_figures(
    url: str, model: str, frames: list[bytes], n: int, batch: int
) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    results = f"results:bench:{STREAM}"
    client.delete(STREAM, results)
    pipeline = PipelineSettings(name="bench", input=[STREAM], model=model, batch_size=batch,
                                result_maxlen=0, max_in_flight=max(64, 4 * batch))
    settings = Settings(redis_url=url, devices=["cpu"], pipelines=[pipeline], control={"port": 0})
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
        started = time.perf_counter()
        while client.xlen(results) < n + 1:
            await asyncio.sleep(0.01)
        fps = n / (time.perf_counter() - started)
        decode_s = _histogram_sum(daemon, "sightstream_decode_seconds")
        infer_s = _histogram_sum(daemon, "sightstream_inference_seconds")
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
    return {
        "daemon_fps": fps,
        # Where the daemon's time goes, per frame (decode runs in parallel threads, so the two
        # can add up to more than the wall time per frame).
        "daemon_decode_ms_per_frame": decode_s / (n + 1) * 1000,
        "daemon_infer_ms_per_frame": infer_s / (n + 1) * 1000,
        "daemon_wall_ms_per_frame": 1000 / fps,
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    w, h = (int(v) for v in args.size.lower().split("x"))
    model = args.model or PipelineSettings().model
    n, batch = args.frames, args.batch_size
    frames = make_frames((w, h))
    target = ModelManager(Catalogue()).input_size(model)
    figures: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": model, "frames": n, "size": f"{w}x{h}", "batch_size": batch,
        "decode_full_ms": time_decode(frames[0], None),
        "decode_draft_ms": time_decode(frames[0], target) if not args.no_draft else None,
    }
    print(f"bench: {model}, {n} frames of {w}x{h} JPEG, batch {batch}", flush=True)
    figures["raw_fps"] = raw_fps(model, frames, n, batch)
    print(f"  raw model on pre-decoded frames: {figures['raw_fps']:.1f} frames/s", flush=True)
    with EmbeddedRedis() as server:
        figures["naive_fps"] = naive_fps(server.url, model, frames, max(30, n // 3))
        print(f"  naive consumer:                  {figures['naive_fps']:.1f} frames/s", flush=True)
        figures.update(asyncio.run(daemon_figures(server.url, model, frames, n, batch)))
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", (w, h))
        figures.update(asyncio.run(video_figures(clip, 0.5)))
    figures["daemon_vs_raw"] = figures["daemon_fps"] / figures["raw_fps"]
    figures["daemon_vs_naive"] = figures["daemon_fps"] / figures["naive_fps"]
    return figures


def report(f: dict[str, Any]) -> str:
    lines = [
        f"  daemon end to end:               {f['daemon_fps']:.1f} frames/s",
        f"  daemon latency at {f['latency_rate_fps']:.0f} frames/s:     p50 {f['latency_p50_ms']:.0f} ms, "
        f"p99 {f['latency_p99_ms']:.0f} ms",
        f"  daemon time per frame: {f['daemon_wall_ms_per_frame']:.1f} ms wall; inference "
        f"{f['daemon_infer_ms_per_frame']:.1f} ms, "
        f"decode {f['daemon_decode_ms_per_frame']:.1f} ms (in parallel)",
        f"  daemon / raw:   {f['daemon_vs_raw']:.2f}",
        f"  daemon / naive: {f['daemon_vs_naive']:.2f}",
        f"  JPEG decode of one {f['size']} frame: full {f['decode_full_ms']:.1f} ms"
        + (f", DCT-scaled to the model input {f['decode_draft_ms']:.1f} ms" if f["decode_draft_ms"] else ""),
        f"  video at 0.5 fps of a 20 s {f['size']} H.264 clip (a keyframe a second): every frame decoded "
        f"{f['video_all_decoded']} in {f['video_all_s']:.2f} s, keyframes only "
        f"{f['video_keyframes_decoded']} in {f['video_keyframes_s']:.2f} s "
        f"({f['video_all_s'] / f['video_keyframes_s']:.1f}x less time); "
        f"{f['video_keyframes_kept']} frames kept",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from sightstream import log

    log.configure("warning")
    figures = run(args)
    print(report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0
