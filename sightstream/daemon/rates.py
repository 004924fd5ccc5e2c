"""Frames per second in and out of each pipeline, on this daemon, over the last `window_s`:
the Prometheus counters are sampled once a second, so a rate is a difference of two samples."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import CollectorRegistry

from sightstream.stages.flow import wait_or_stop


class Rates:
    def __init__(self, registry: CollectorRegistry, pipelines: list[str], window_s: float = 10.0) -> None:
        self._registry = registry
        self._pipelines = pipelines
        self._window_s = window_s
        # per pipeline: (monotonic time, frames in, results out), oldest first
        self._samples: dict[str, deque[tuple[float, float, float]]] = {
            name: deque(maxlen=int(window_s) + 2) for name in pipelines
        }

    def count(self, metric: str, pipeline: str) -> float:
        return self._registry.get_sample_value(metric, {"pipeline": pipeline}) or 0.0

    def sample(self) -> None:
        now = time.monotonic()
        for name in self._pipelines:
            self._samples[name].append((now, self.count("sightstream_frames_in_total", name),
                                        self.count("sightstream_frames_published_total", name)))

    def fps(self, pipeline: str) -> tuple[float, float]:
        """(frames read, results published) per second; zeros until two samples exist."""
        samples = self._samples.get(pipeline)
        if not samples or len(samples) < 2:
            return 0.0, 0.0
        (t0, in0, out0), (t1, in1, out1) = samples[0], samples[-1]
        span = t1 - t0
        return (round((in1 - in0) / span, 2), round((out1 - out0) / span, 2)) if span > 0 else (0.0, 0.0)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            await wait_or_stop(stop, 1.0)
