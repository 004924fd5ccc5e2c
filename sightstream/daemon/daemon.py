"""The daemon: one linear build of the stages, started together, torn down in reverse.

    RedisIngest ─► [Sampler] ─► Decoder ─► Batcher ─┐   (one chain per pipeline)
                                                    ├─► batches ─► Worker[device] ─┐
                                                    ┘                              ├─► Publisher
    (bad entries, skipped and stale frames go straight to the publisher) ──────────┘

Shutdown: ingest stops reading; the STOP sentinel flows down each chain; when every batcher
has ended the workers get STOP, then the publisher, so every frame already read is either
published or left pending in Redis for another daemon. Bounded by `shutdown_timeout_s`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.exceptions import RedisError

from sightstream import keys, log
from sightstream.config import PipelineSettings, Settings
from sightstream.daemon import devices as device_list
from sightstream.daemon.consumer import ConsumerLease
from sightstream.errors import ConfigError, ModelError
from sightstream.metrics import Metrics
from sightstream.models.catalogue import Catalogue
from sightstream.models.manager import ModelManager
from sightstream.redis_conn import make_client
from sightstream.stages.batcher import Batcher
from sightstream.stages.decoder import Decoder
from sightstream.stages.flow import STOP, Credits, backoff_s, worth_logging
from sightstream.stages.publisher import Publisher
from sightstream.stages.redis_ingest import RedisIngest
from sightstream.stages.sampler import Sampler
from sightstream.stages.worker import Worker

_log = log.get(__name__)


class Daemon:
    def __init__(self, settings: Settings, *, host: str | None = None, discover_s: float = 2.0) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.catalogue = Catalogue(settings.models)
        self.manager = ModelManager(self.catalogue)
        self.devices = device_list.resolve(settings.devices)
        self.stop_event = asyncio.Event()
        self.ready = False
        self.consumer = ""
        self._host = host
        self._discover_s = discover_s
        self._check_models()
        self.client = make_client(settings.redis_url)
        self.reader = make_client(settings.redis_url, blocking_reads=True)
        self.ingests: dict[str, RedisIngest] = {}
        self.credits: dict[str, Credits] = {}
        self.workers: list[Worker] = []
        self.publisher: Publisher | None = None
        self._chains: list[asyncio.Task] = []
        self._batchers: list[asyncio.Task] = []
        self._worker_tasks: list[asyncio.Task] = []
        self._publisher_task: asyncio.Task | None = None
        self._lease_task: asyncio.Task | None = None
        self._lease: ConsumerLease | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self._closed = False

    def _check_models(self) -> None:
        """Every pipeline's model must be known and on this machine: fail at start, not per frame."""
        for p in self.settings.pipelines:
            try:
                self.catalogue.get(p.model).resolve()
            except ModelError as e:
                raise ConfigError(f"invalid setting pipelines[{p.name}].model: {e}") from None

    async def start(self) -> None:
        if not await self._wait_for_redis():
            return  # stopped before Redis ever answered
        self._lease = ConsumerLease(self.client, self.settings.consumer_slots, self._host)
        self.consumer = await self._lease.acquire()
        self._lease_task = asyncio.create_task(self._lease.keep(self.stop_event), name="lease")
        threads = self.settings.decode.threads or (os.cpu_count() or 2)
        self._decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")

        outcomes: asyncio.Queue = asyncio.Queue(1024)
        batches: asyncio.Queue = asyncio.Queue(max(2, 2 * len(self.devices)))
        self.publisher = Publisher(
            self.client, outcomes, self.metrics,
            {p.name: p.result_maxlen for p in self.settings.pipelines},
        )
        self.workers = [
            Worker(d, self.manager, batches, outcomes, self.metrics) for d in self.devices
        ]
        self._batches, self._outcomes = batches, outcomes
        stages: list[Any] = []
        for p in self.settings.pipelines:
            stages += self._build_chain(p, batches, outcomes, threads)
        # Join the groups before reporting ready, so producers' first frames are already ours.
        for ingest in self.ingests.values():
            try:
                await ingest.discover()
            except (RedisError, OSError) as e:  # the ingest loop retries
                _log.warning("first_discovery_failed", error=str(e))
        for stage in stages:
            task = asyncio.create_task(stage.run(), name=type(stage).__name__)
            (self._batchers if isinstance(stage, Batcher) else self._chains).append(task)

        self._publisher_task = asyncio.create_task(self.publisher.run(), name="publisher")
        self._worker_tasks = [
            asyncio.create_task(w.run(), name=f"worker-{w.device}") for w in self.workers
        ]
        self.ready = True
        _log.info("daemon_started", consumer=self.consumer, devices=self.devices,
                  pipelines=[p.name for p in self.settings.pipelines])

    def _build_chain(
        self, p: PipelineSettings, batches: asyncio.Queue, outcomes: asyncio.Queue, threads: int
    ) -> list[Any]:
        """One pipeline's stages, in flow order; started by the caller."""
        size = p.max_in_flight
        credits = self.credits[p.name] = Credits(size)
        read_q: asyncio.Queue = asyncio.Queue(size)
        decode_q: asyncio.Queue = asyncio.Queue(size) if p.fps > 0 else read_q
        batch_q: asyncio.Queue = asyncio.Queue(size)
        exclude = [keys.output_glob(q.output, q.name) for q in self.settings.pipelines]
        ingest = self.ingests[p.name] = RedisIngest(
            p, self.client, self.reader, self.consumer, read_q, outcomes, credits, self.metrics,
            self.stop_event, exclude, self._discover_s,
        )
        assert self._decode_pool is not None
        stages: list[Any] = [ingest]
        if p.fps > 0:
            stages.append(Sampler(p.fps, self.client, read_q, decode_q, outcomes, self.metrics))
        stages.append(
            Decoder(
                decode_q, batch_q, outcomes, self._decode_pool, self.metrics,
                self.settings.decode.max_pixels,
                self._decode_target(p.model),
                p.max_age_ms, concurrency=threads,
            )
        )
        stages.append(Batcher(p, batch_q, batches, self.metrics))
        return stages

    def _decode_target(self, model: str) -> Callable[[], tuple[int, int] | None]:
        """What size the decoder may scale large JPEGs down to: the model's input, if fixed."""
        if not self.settings.decode.draft:
            return lambda: None
        return lambda: self.manager.input_size(model)

    async def _wait_for_redis(self) -> bool:
        """An unreachable Redis at start is retried with back-off, not fatal. False: stopped."""
        attempt = 0
        while not self.stop_event.is_set():
            try:
                await self.client.ping()
                return True
            except (RedisError, OSError) as e:
                attempt += 1
                if worth_logging(attempt):
                    _log.warning("redis_unreachable_at_start", url=self.settings.redis_url,
                                 error=str(e), attempt=attempt)
                try:
                    await asyncio.wait_for(self.stop_event.wait(), backoff_s(attempt))
                except TimeoutError:
                    pass
        return False

    async def stop(self) -> None:
        """Graceful drain, bounded by shutdown_timeout_s; then cancel what is left."""
        if self._closed:
            return
        self._closed = True
        self.stop_event.set()
        self.ready = False
        try:
            await asyncio.wait_for(self._drain(), self.settings.shutdown_timeout_s)
            _log.info("daemon_drained")
        except TimeoutError:
            _log.warning("shutdown_timeout_cancelling", timeout_s=self.settings.shutdown_timeout_s)
        for task in self._all_tasks():
            if not task.done():
                task.cancel("sightstream is shutting down")
        await asyncio.gather(*self._all_tasks(), return_exceptions=True)
        for w in self.workers:
            w.close()
        if self._decode_pool:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self._lease:
            await self._lease.release()
        self.manager.unload_all()
        # The pools were passed in explicitly, so redis-py would leave them open.
        await self.client.aclose(close_connection_pool=True)
        await self.reader.aclose(close_connection_pool=True)

    async def _drain(self) -> None:
        await asyncio.gather(*self._chains, *self._batchers)
        if self._worker_tasks:
            await self._batches.put(STOP)
            await asyncio.gather(*self._worker_tasks)
        if self._publisher_task:
            await self._outcomes.put(STOP)
            await self._publisher_task

    def _all_tasks(self) -> list[asyncio.Task]:
        extra = [t for t in (self._publisher_task, self._lease_task) if t]
        return [*self._chains, *self._batchers, *self._worker_tasks, *extra]

    def failed(self) -> BaseException | None:
        """An exception that ended a stage early (a bug): the service exits rather than idle."""
        for task in self._all_tasks():
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    async def redis_ok(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.ping(), 1.0))
        except (TimeoutError, RedisError, OSError):
            return False

    def pipelines(self) -> list[dict[str, Any]]:
        return [
            {"name": p.name, "model": p.model, "fps": p.fps, "input": p.input,
             "streams": list(self.ingests[p.name].streams) if p.name in self.ingests else [],
             "in_flight": self.credits[p.name].in_flight if p.name in self.credits else 0}
            for p in self.settings.pipelines
        ]
