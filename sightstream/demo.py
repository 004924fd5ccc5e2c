"""`sightstream demo`: everything on this machine, no set-up.

It uses the configured Redis if one answers; with `redis_url` at its default and nothing
answering there, it starts an embedded one (another `redis_url` that cannot be used is an
error: the user meant that Redis). It runs the daemon with the first pipeline's model (or
the default one); makes a short sample video; publishes it as a camera would (real time);
prints each result as it arrives and a summary; then stops everything it started (with
`keep`, it goes on publishing the video again and again, so the live page has something to
show, until Ctrl-C). Its keys
(`demo-frames:{sightstream-demo}` and what derives from it) are its own, so it never consumes
a user's streams on a shared Redis, and a user's pipeline reading `frames:*` does not read its
frames.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import redis

from sightstream import keys
from sightstream.config import PipelineSettings, Settings
from sightstream.daemon.embedded_redis import EmbeddedRedis, free_port
from sightstream.publish import make_sample_video, publish
from sightstream.redis_conn import safe_url, why_unreachable
from sightstream.service import serve
from sightstream.tail import summarize, tail

DEMO_STREAM = "demo-frames:{sightstream-demo}"  # not matched by users' `frames:*`
DEMO_PIPELINE = "demo"


KEPT_FRAMES = 1000  # with `keep`: the demo's stream holds at most about this many frames


async def run_demo(settings: Settings, seconds: float = 6.0, say: Callable[[str], None] = print,
                   keep: bool = False) -> int:
    embedded = None
    shown = safe_url(settings.redis_url)
    if (problem := await why_unreachable(settings.redis_url)) is None:
        say(f"Redis: using {shown}")
    elif settings.redis_url != Settings.model_fields["redis_url"].default:
        say(f"Redis: {shown} cannot be used ({problem.rstrip('.')}). Start it, or leave redis_url at its "
            "default for the demo to start a Redis of its own.")
        return 1
    else:
        embedded = EmbeddedRedis().start()
        say(f"Redis: nothing answers at {shown}; started an embedded redis-server on port {embedded.port}")
    url = embedded.url if embedded else settings.redis_url
    configured = "pipelines" in settings.model_fields_set and bool(settings.pipelines)
    pipeline = PipelineSettings(name=DEMO_PIPELINE, input=[DEMO_STREAM], model=settings.pipelines[0].model
                                if configured else PipelineSettings().model)
    results_key = keys.result_stream(pipeline.output, pipeline.name, DEMO_STREAM)
    deadletter_key = keys.deadletter_stream(pipeline.name, DEMO_STREAM)
    host, port = settings.control.host, settings.control.port
    if port == 0 or not _port_free(host, port):  # 0: any free port, which the demo must know
        port = free_port()
    settings = settings.model_copy(update={
        "redis_url": url, "pipelines": [pipeline],
        "control": settings.control.model_copy(update={"port": port}),
    })
    sync = redis.Redis.from_url(url)
    sync.delete(DEMO_STREAM, results_key, deadletter_key)  # the demo's own keys: start clean

    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, stop))
    try:
        with tempfile.TemporaryDirectory(prefix="sightstream-demo-") as tmp:
            say(f"Model: {pipeline.model} " + ("(the config's first pipeline's)" if configured
                                                 else "(the built-in default)"))
            video = await asyncio.to_thread(make_sample_video, Path(tmp) / "sample.mp4", seconds)
            say(f"Video: made {video.name}, {seconds:.0f} s of 1280x720 at 10 fps")
            await _wait_ready(settings.control.host, port, server)
            say(f"Daemon: up; control plane on http://{settings.control.host}:{port} "
                f"(try /health and /metrics)")
            say(f"Publishing to {DEMO_STREAM}; results in {results_key}:\n")
            rows: list[dict] = []
            tailer = asyncio.create_task(asyncio.to_thread(
                tail, url, results_key, start="0", timeout_s=20, as_json=True,
                count=int(seconds * 10), emit=lambda line: _show(line, rows, say),
            ))
            started = time.monotonic()
            sent = await asyncio.to_thread(publish, url, str(video), DEMO_STREAM, progress=False,
                                           stopping=stop.is_set)
            await tailer
            elapsed = time.monotonic() - started
            dead = sync.xlen(deadletter_key)
            _summary(sent, rows, dead, elapsed, say)
            if keep:
                say(f"\nStill running: open http://{settings.control.host}:{port}/ to watch the sample "
                    "video go round again and again. Ctrl-C stops everything.")
                while not stop.is_set():  # set by the daemon's signal handlers on Ctrl-C
                    again = asyncio.ensure_future(asyncio.to_thread(
                        publish, url, str(video), DEMO_STREAM, progress=False, maxlen=KEPT_FRAMES,
                        stopping=stop.is_set))
                    await asyncio.wait((again, server), return_when=asyncio.FIRST_COMPLETED)
                    try:
                        await again  # a round of a few seconds at most
                    except redis.RedisError:
                        if not await _stopping(stop, embedded):
                            raise
        return 0 if rows and len(rows) + dead == sent else 1
    finally:
        stop.set()
        await server
        try:
            sync.delete(DEMO_STREAM, results_key, deadletter_key)
        except redis.RedisError:
            if embedded is None:
                raise  # an embedded Redis ended with the Ctrl-C, and its keys with it
        sync.close()
        if embedded:
            embedded.close()
        say("Stopped the daemon" + (" and the embedded Redis." if embedded else "."))


async def _stopping(stop: asyncio.Event, embedded: EmbeddedRedis | None) -> bool:
    """After a Redis error: is it the Ctrl-C? It reaches the embedded Redis (in our process
    group) as it reaches us, and Redis quits at once while the daemon drains."""
    if embedded is None:
        return False
    try:
        await asyncio.wait_for(stop.wait(), 2)
    except TimeoutError:
        return False
    return True


def _show(line: str, rows: list[dict], say: Callable[[str], None]) -> None:
    entry = json.loads(line)
    entry["_seen"] = time.monotonic()
    rows.append(entry)
    meta = entry.get("meta") or {}  # tail --json gives result and meta parsed
    say(f"  frame {meta.get('index', '?'):>3}  {summarize(entry)}")
    if len(rows) % 10 == 0:  # a running rate, over the last ten results
        window = rows[-10:]
        span = window[-1]["_seen"] - window[0]["_seen"]
        rate = f"{9 / span:.1f} results/s" if span > 0 else "-"
        latencies = sorted(int(r["latency_ms"]) for r in window)
        say(f"  -- {len(rows)} results so far, {rate}, median latency {latencies[4]} ms")


def _summary(sent: int, rows: list[dict], dead: int, elapsed: float, say: Callable[[str], None]) -> None:
    latencies = sorted(int(r["latency_ms"]) for r in rows)
    labels: Counter[str] = Counter()
    for r in rows:
        labels.update(d["label"] for d in r["result"].get("detections", []))
    say("")
    say(f"Summary: {sent} frames published, {len(rows)} results, {dead} dead-lettered, "
        f"{len(rows) / elapsed:.1f} results/s over {elapsed:.1f} s")
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        say(f"Latency (capture to result): p50 {statistics.median(latencies):.0f} ms, p99 {p99} ms")
    found = ", ".join(f"{n} x {label}" for label, n in labels.most_common()) or "nothing"
    with_any = sum(1 for r in rows if r["result"].get("detections"))
    say(f"Detected: {found} (in {with_any} of {len(rows)} frames)")


async def _wait_ready(host: str, port: int, server: asyncio.Task, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if server.done():
                server.result()  # raises what stopped it
                raise RuntimeError("the daemon stopped during start-up")
            try:
                async with http.get(f"http://{host}:{port}/health/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("the daemon did not become ready within a minute")


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
