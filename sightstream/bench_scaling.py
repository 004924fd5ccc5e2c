"""`sightstream bench --daemons N`: N daemon processes in one consumer group on one Redis,
against one daemon, on the same backlog. The model sleeps `--sleep-ms` per batch and releases
the GIL, as a GPU call does, so each daemon's capacity is known and the figure is the
pipeline's scaling: fps(N) / (N x fps(1)), goal >= 0.9.

Each daemon runs in its own process (spawned, as systemd starts them), with the devices of
`--devices` dealt out in turn (`cpu` by default; `cuda:0,cuda:1` for one GPU each).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from typing import Any

import redis

from sightstream.bench import NULL_MODEL, STREAM, batch_sizes, bench_settings, machine, make_frames
from sightstream.daemon.embedded_redis import EmbeddedRedis
from sightstream.errors import SightstreamError

READY_TIMEOUT_S = 60


def _daemon_process(settings_json: str, host: str, ready: Any, stop: Any, report: Any) -> None:
    """One daemon until `stop` is set; reports its CPU seconds."""
    from sightstream import log
    from sightstream.config import Settings
    from sightstream.daemon.daemon import Daemon

    log.configure("warning")

    async def main() -> None:
        daemon = Daemon(Settings.model_validate_json(settings_json), host=host)
        await daemon.start()
        ready.put(host)
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await daemon.stop()

    started = time.process_time()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the whole group: the bench stops us
        return
    report.put(time.process_time() - started)


def group_fps(url: str, count: int, devices: list[str], frames: list[bytes], n: int, batch: int,
              sleep_ms: float) -> dict[str, float]:
    """`count` daemons on a backlog of n frames: frames/s until every result is out."""
    models = {"bench": {"null": {**NULL_MODEL["bench"]["null"], "sleep_ms": sleep_ms}}}
    ctx = multiprocessing.get_context("spawn")
    ready, report, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    client = redis.Redis.from_url(url)
    results = f"results:bench:{STREAM}"
    client.delete(STREAM, results, f"deadletter:bench:{STREAM}")
    procs = []
    for i in range(count):
        settings = bench_settings(url, "bench/null", batch, devices[i % len(devices)], models)
        procs.append(ctx.Process(target=_daemon_process, daemon=True,
                                 args=(settings.model_dump_json(), f"bench{i}", ready, stop, report)))
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=READY_TIMEOUT_S)
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.xadd(STREAM, {"image": frames[i % len(frames)]})
        started = time.perf_counter()  # the daemons read while the backlog is being written
        pipe.execute()
        while client.xlen(results) < n:
            if (dead := client.xlen(f"deadletter:bench:{STREAM}")) > 0:
                first: Any = client.xrange(f"deadletter:bench:{STREAM}", count=1)
                raise SightstreamError(f"{dead} frames were dead-lettered: {first[0][1][b'error'].decode()}")
            if (gone := [p for p in procs if not p.is_alive()]):
                raise SightstreamError(f"a daemon of the bench exited (code {gone[0].exitcode}) before "
                                       "every result was out")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        stop.set()
        cpu = sum(report.get(timeout=READY_TIMEOUT_S) for _ in procs)
        return {"fps": n / elapsed, "results": client.xlen(results), "cpu_s": cpu}
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        client.close()


def run_scaling(args: argparse.Namespace) -> dict[str, Any]:
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else ["cpu"]
    frames = make_frames((40, 30))
    batch = batch_sizes(args.batch_sizes)[-1]
    n, count = args.frames, args.daemons
    figures: dict[str, Any] = {"mode": "scaling", "machine": machine(), "daemons": count,
                               "devices": devices, "batch_size": batch, "sleep_ms": args.sleep_ms,
                               "frames": n}
    print(f"bench: {count} daemons vs 1, a model sleeping {args.sleep_ms} ms per batch of {batch}, "
          f"{n} frames", flush=True)
    with EmbeddedRedis() as server:
        one = group_fps(server.url, 1, devices, frames, n, batch, args.sleep_ms)
        print(f"  1 daemon:  {one['fps']:.0f} frames/s", flush=True)
        many = group_fps(server.url, count, devices, frames, n, batch, args.sleep_ms)
        print(f"  {count} daemons: {many['fps']:.0f} frames/s", flush=True)
    figures |= {"one_fps": one["fps"], "many_fps": many["fps"],
                "scaling": many["fps"] / (count * one["fps"]),
                "results_one": one["results"], "results_many": many["results"]}
    print(f"  scaling: {figures['scaling']:.2f} of {count}x (goal >= 0.9)", flush=True)
    return figures
