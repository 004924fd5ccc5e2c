"""The daemon: one linear build of the stages, started together, torn down in reverse.

    RedisIngest ─┐
                 ├─► [Sampler] ─► Decoder ─► Batcher ─┐   (one chain per pipeline)
    Reclaimer  ──┘                                    ├─► batches ─► Worker[device] ───────┐
    /predict, jobs ─► AdhocBatcher ───────────────────┘                                    ├─► Publisher
                            └─► (text models) text batches ─► Worker[device, text] ────────┤   (or the
    (bad entries, skipped and stale frames go straight to the publisher) ──────────────────┘    caller)
    Heartbeat: re-claims the frames in flight so a slow daemon's work is not taken over.

Shutdown: the readers stop reading; once both readers of a pipeline have ended, STOP flows
down its chain; when every batcher has ended the workers get STOP, then the publisher. Every
frame already read is published, or stays pending in Redis for another daemon. Bounded by
`shutdown_timeout_s`.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from redis.crc import key_slot
from redis.exceptions import AuthenticationError, RedisClusterException, RedisError, ResponseError

from sightstream import keys, log
from sightstream.config import PipelineSettings, Settings
from sightstream.daemon import devices as device_list
from sightstream.daemon.backlog import keep_gauges, unowned_groups
from sightstream.daemon.consumer import ConsumerLease
from sightstream.daemon.model_pauses import ModelPauses
from sightstream.daemon.prompt_notices import follow_prompts
from sightstream.daemon.rates import Rates
from sightstream.daemon.snapshots import Snapshots
from sightstream.errors import ConfigError, ModelError, ModelNotAvailable, SightstreamError
from sightstream.jobs.run import InputViews
from sightstream.jobs.runner import JobRunner, input_spec
from sightstream.jobs.sources import SourceRefused, check_source
from sightstream.jobs.store import JobStore
from sightstream.metrics import Metrics
from sightstream.models.adapters import adapter_class, check_chained_prompt, check_prompt
from sightstream.models.catalogue import Catalogue, Entry
from sightstream.models.input_shape import InputShape
from sightstream.models.manager import ModelManager
from sightstream.prompts import PromptBook, PromptStore
from sightstream.redis_conn import close_client, make_client, out_of_memory, refused_for_good, safe_url
from sightstream.stages.adhoc import AdhocBatcher
from sightstream.stages.batcher import Batcher
from sightstream.stages.clock_skew import ClockSkews
from sightstream.stages.decoder import Decoder
from sightstream.stages.fair_queue import FairQueue
from sightstream.stages.flow import STOP, InFlight, RedisRetry, Stopped, wait_or_stop
from sightstream.stages.gpu_jpeg import nvjpeg_decoder
from sightstream.stages.heartbeat import Heartbeat
from sightstream.stages.pending import Admission
from sightstream.stages.publisher import Publisher
from sightstream.stages.queue_wait import QueueWait
from sightstream.stages.reclaimer import Reclaimer
from sightstream.stages.redis_ingest import RedisIngest
from sightstream.stages.sampler import Sampler
from sightstream.stages.source_leases import SourceLeases
from sightstream.stages.worker import Worker

_log = log.get(__name__)
OOM_RECENT_S = 10.0  # a write refused for want of memory this recently: not ready (retried every 5 s at most)
# Tasks whose frames may be decoded at a reduced scale: their results hold no pixel maps.
DRAFT_TASKS = frozenset({"detect", "classify", "caption", "vqa"})


@dataclass
class PipelineRun:
    """One pipeline's moving parts: its readers, the chain after them, and their tasks."""

    settings: PipelineSettings
    in_flight: InFlight
    read_q: asyncio.Queue
    ingest: RedisIngest
    reclaimer: Reclaimer
    chain: list[Any]  # [Sampler], Decoder, Batcher
    source_tasks: list[asyncio.Task] = field(default_factory=list)
    chain_tasks: list[asyncio.Task] = field(default_factory=list)

    async def drain(self) -> None:
        """Wait for both readers to stop, then let STOP flow down the chain."""
        await asyncio.gather(*self.source_tasks)
        await self.read_q.put(STOP)
        await asyncio.gather(*self.chain_tasks)


class Daemon:
    def __init__(self, settings: Settings, *, host: str | None = None, discover_s: float = 2.0) -> None:
        self.settings = settings
        self.metrics = Metrics(pipelines=[p.name for p in settings.pipelines])
        try:
            self.catalogue = Catalogue(settings.models)
        except ModelError as e:  # e.g. a backend and task no adapter serves: refused at start
            raise ConfigError(f"invalid setting models: {e}") from None
        self.devices = device_list.resolve(settings.devices)
        self.manager = ModelManager(self.catalogue, device_list.memory_budgets_mb(
            self.devices, settings.manager.max_memory_mb, settings.manager.gpu_memory_fraction),
            metrics=self.metrics, load_timeout_s=settings.manager.load_timeout_s)
        self.metrics.start_devices(self.devices)
        for device in self.devices:
            self.metrics.model_memory_mb.labels(device).set_function(partial(self.manager.used_mb, device))
        device_list.watch_gpus(self.devices, self.metrics)
        self.stop_event = asyncio.Event()
        self.ready = False
        self._host = host
        self._discover_s = discover_s
        self._check_models()
        self._warn_unread_options()
        device = settings.decode.device
        self._jpegs = nvjpeg_decoder(device) if device != "cpu" else None  # ConfigError if it cannot
        self.client = make_client(settings.redis_url, cluster=settings.redis_cluster)
        self.reader = make_client(settings.redis_url, blocking_reads=True, cluster=settings.redis_cluster)
        self.prompts = PromptStore(self.client, {p.name: p.prompt for p in settings.pipelines})
        self.prompt_book = PromptBook(self.prompts, [p.name for p in settings.pipelines])
        self.rates = Rates(self.metrics.registry, [p.name for p in settings.pipelines])
        self.jobs = JobStore(self.client, settings.jobs.ttl_s)
        self.job_runner: JobRunner | None = None
        self._jobs_task: asyncio.Task | None = None
        self.runs: dict[str, PipelineRun] = {}
        self.workers: list[Worker] = []  # frames, one per device
        self.pauses: ModelPauses | None = None  # pipelines whose model cannot be loaded
        self.text_workers: list[Worker] = []  # text models' calls, one per device
        self.publisher: Publisher | None = None
        self._worker_tasks: list[asyncio.Task] = []
        self._text_worker_tasks: list[asyncio.Task] = []
        self._service_tasks: list[asyncio.Task] = []  # lease, heartbeat
        self._publisher_task: asyncio.Task | None = None
        self._lease: ConsumerLease | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self._host_pool: ThreadPoolExecutor | None = None
        self.adhoc: AdhocBatcher | None = None  # /predict uploads and jobs
        self.snapshots = Snapshots(settings.control.page_sources)  # the live page's latest frames
        self.clock_skews = ClockSkews()  # producers' clocks, as their frames' ts show them
        # the live page's drawings: one thread of their own, never the decoders'
        self.page_pool = ThreadPoolExecutor(1, thread_name_prefix="page")
        self._closed = False

    def _check_models(self) -> None:
        """Every pipeline's model must be known and on this machine, and a chain must make
        sense: fail at start, not per frame."""
        by_name = {p.name: p for p in self.settings.pipelines}
        for p in self.settings.pipelines:
            try:
                entry = self.catalogue.get(p.model)
                takes_detections = getattr(adapter_class(entry.adapter), "uses_context", False)
                self.manager.create(p.model)  # its weights are here, its options make sense
            except ModelNotAvailable as e:
                if not entry.file_missing():
                    raise ConfigError(f"invalid setting pipelines[{p.name}].model: {e}") from None
                # A rollout's gap (removed, then copied) must not stop the daemon for good (systemd
                # does not restart exit 2): the pipeline waits for the file, saying so; the others run.
                _log.error("model_file_missing", pipeline=p.name, model=p.model, error=str(e),
                           why="the pipeline waits for it: it reads nothing until its model loads")
            except ModelError as e:
                raise ConfigError(f"invalid setting pipelines[{p.name}].model: {e}") from None
            if entry.task == "generate":
                raise ConfigError(f"invalid setting pipelines[{p.name}].model: {p.model} writes text from "
                                  "text and cannot read frames (it writes jobs' summaries)")
            for url in p.videos:
                try:
                    check_source(url, self.settings.jobs, trusted=True, on_disk=False)
                except SourceRefused as e:
                    raise ConfigError(f"invalid setting pipelines[{p.name}].input: "
                                      f"{keys.public_url(url)}: {e}") from None
                spec = input_spec(p, url, self.settings.redis_cluster)
                if self.settings.redis_cluster and key_slot(spec.output.encode()) != key_slot(
                        keys.job(keys.input_job_id(p.name, url)).encode()):
                    raise ConfigError(
                        f"invalid setting pipelines[{p.name}].output: on Redis Cluster a video input's "
                        f"results must share its job's slot, and {spec.output} does not: keep {{source}} in "
                        "the output template, before any other {...}")
            if not p.prompt_from:
                self._check_prompt(p, entry)
                continue
            if not takes_detections:
                raise ConfigError(f"invalid setting pipelines[{p.name}].prompt_from: {p.model} is "
                                  "not prompted by detections (SAM2 is)")
            try:
                check_chained_prompt(entry.adapter, entry.task, p.prompt)
            except ModelError as e:
                raise ConfigError(f"invalid setting pipelines[{p.name}].prompt: {e}") from None
            up = by_name.get(p.prompt_from)
            up_task = self.catalogue.get(up.model).task if up else "detect"
            if up and up_task not in ("detect", "track"):
                raise ConfigError(f"invalid setting pipelines[{p.name}].prompt_from: pipeline "
                                  f"{up.name} does not detect (its model {up.model} does {up_task})")

    def _warn_unread_options(self) -> None:
        """Options in the config's model entries that their adapter never reads: most likely
        misspelt, and the default then stays in force unsaid. Said, not refused: a plug-in may
        read its own options only when it loads."""
        for family, variants in self.settings.models.items():
            for variant in variants:
                model_id = f"{family}/{variant}"
                try:
                    unread = self.manager.unread_options(model_id)
                except ModelError:
                    continue  # not on this machine, or refused: said where it is used
                for name, near in unread.items():
                    _log.warning("model_option_unread", model=model_id, option=name,
                                 hint=f"did you mean {near}?" if near else "its adapter reads no such option")

    @staticmethod
    def _check_prompt(p: PipelineSettings, entry: Entry) -> None:
        """A configured prompt the model cannot use stops the start, as PUT refuses it. An empty
        one where the model needs one is allowed (it may be set over HTTP), and said."""
        try:
            check_prompt(entry.adapter, entry.task, p.prompt)
        except ModelError as e:
            if p.prompt.strip():
                raise ConfigError(f"invalid setting pipelines[{p.name}].prompt: {p.model} cannot use it: "
                                  f"{e}") from None
            if getattr(adapter_class(entry.adapter), "takes_prompt", False):
                _log.warning("pipeline_prompt_empty", pipeline=p.name, model=p.model, why=str(e),
                             hint=f"no results until a prompt is set: PUT /pipelines/{p.name}/prompt")

    async def start(self) -> None:
        if not await self._wait_for_redis():
            return  # stopped before Redis ever answered
        self._lease = ConsumerLease(self.client, self.settings.consumer_slots, self._host,
                                    on_lost=self.metrics.leases_lost.labels("consumer").inc)
        try:  # a cluster node can hang after the seed answered: retried as the ping is
            await RedisRetry("start", self.metrics, self.stop_event).call(self._acquire_lease)
        except Stopped:
            return
        threads = self.settings.decode.threads or (os.cpu_count() or 2)
        self._decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        # prepare and finish of staged adapters: their own threads, so a device's next batch
        # is not prepared behind chunks of decoding
        self._host_pool = ThreadPoolExecutor(2 * len(self.devices), thread_name_prefix="host")

        self._outcomes: asyncio.Queue = asyncio.Queue(1024)
        # let in by device time, not first come: a slow model capped the other pipelines
        self._batches: asyncio.Queue = FairQueue(max(2, 2 * len(self.devices)))
        self.publisher = Publisher(
            self.client, self._outcomes, self.metrics,
            {p.name: p.result_maxlen for p in self.settings.pipelines},
            {p.name: p.max_deliveries for p in self.settings.pipelines},
            stop=self.stop_event, ttl_ms={p.name: p.result_ttl_s * 1000 for p in self.settings.pipelines},
            on_published=self.snapshots.record,
            on_dead_lettered=self.snapshots.dead_lettered,
        )
        self.pauses = ModelPauses({p.name: p.model for p in self.settings.pipelines}, self.manager.is_loaded,
                                  self._in_flight_of, self.worker_for, self._read_own_again, self.stop_event)
        self.workers = [
            Worker(d, self.manager, self._batches, self._outcomes, self.metrics,
                   self.settings.inference_timeout_s, cpu=self._host_pool,
                   depth=self.settings.batches_per_device, on_unloadable=self.pauses.pause)
            for d in self.devices
        ]
        # A text model's call takes minutes on a CPU: it runs beside the frames, not before them.
        self._text_batches: asyncio.Queue = asyncio.Queue(len(self.devices))
        self.text_workers = [
            Worker(d, self.manager, self._text_batches, self._outcomes, self.metrics,
                   self.settings.inference_timeout_s, cpu=self._host_pool, depth=1, kind="text")
            for d in self.devices
        ]
        try:
            await self.prompt_book.catch_up()  # the config's, then the stored prompts, before the first batch
        except (RedisError, OSError) as e:  # the notice follower retries
            _log.warning("first_prompt_read_failed", error=str(e))
        self.adhoc = AdhocBatcher(
            self._batches,
            pinned=[w.own for w in self.workers] if len(self.devices) > 1 else None,
            stateful=lambda model: self.catalogue.get(model).task == "track",
            text=self._text_batches, writes_text=self._writes_text)
        for p in self.settings.pipelines:
            self.runs[p.name] = self._build(p, threads)
            # its model first: a broken one found by frames re-read cost each a delivery per start
            self.pauses.loading(p.name, p.model, self.devices[0])
        # Join the groups before reporting ready, so producers' first frames are already ours.
        for run in self.runs.values():
            try:
                await run.ingest.discover()
            except (RedisError, OSError) as e:  # the ingest loop retries
                _log.warning("first_discovery_failed", error=str(e))
        await self._say_unowned_groups()
        for run in self.runs.values():
            run.source_tasks = [asyncio.create_task(s.run(), name=type(s).__name__)
                                for s in (run.ingest, run.reclaimer)]
            run.chain_tasks = [asyncio.create_task(s.run(), name=type(s).__name__) for s in run.chain]
        heartbeat = Heartbeat(self.client, self._consumer_name,
                              {name: run.in_flight for name, run in self.runs.items()},
                              self.metrics, self.stop_event, self.settings.reclaim_min_idle_ms)
        self._service_tasks = [
            asyncio.create_task(run.ingest.leases.keep(self.stop_event, self.metrics),
                                name=f"source-leases-{name}")
            for name, run in self.runs.items() if run.ingest.leases
        ] + [
            asyncio.create_task(self._lease.keep(self.stop_event, self.metrics), name="lease"),
            asyncio.create_task(heartbeat.run(), name="heartbeat"),
            asyncio.create_task(self.rates.run(self.stop_event), name="rates"),
            asyncio.create_task(follow_prompts(self.client, self.prompt_book, self.metrics, self.stop_event,
                                               self.settings.prompt_poll_s), name="prompt-notices"),
            asyncio.create_task(self._unload_idle_models(), name="idle-unload"),
            asyncio.create_task(keep_gauges(
                self.client, {name: (lambda run=run: run.ingest.found) for name, run in self.runs.items()},
                self.metrics, self.stop_event), name="backlog-gauges"),
        ]
        self._publisher_task = asyncio.create_task(self.publisher.run(), name="publisher")
        views = InputViews(self.snapshots.frames_read, self.publisher.seen, self.publisher.dead_lettered,
                           lambda name: flow.paused if (flow := self._in_flight_of(name)) else None)
        self.job_runner = JobRunner(self.jobs, self.client, self.reader, self.adhoc, self._decode_pool,
                                    self.settings, self._consumer_name, self.metrics, self.stop_event,
                                    self.prompt_book, self.manager.create, views,
                                    inherited=bool(self._lease and self._lease.inherited))
        self._jobs_task = asyncio.create_task(self.job_runner.run(), name="jobs")
        self._worker_tasks = [asyncio.create_task(w.run(), name=f"worker-{w.device}") for w in self.workers]
        self._text_worker_tasks = [asyncio.create_task(w.run(), name=f"worker-text-{w.device}")
                                   for w in self.text_workers]
        self.ready = True
        _log.info("daemon_started", consumer=self.consumer, devices=self.devices,
                  pipelines=[p.name for p in self.settings.pipelines])

    async def _say_unowned_groups(self) -> None:
        """Once, at start: groups on this daemon's streams that no pipeline of its config owns.
        A removed or renamed pipeline's group stays in Redis with its pending frames and a lag
        that grows, and nothing else would ever mention it."""
        streams = sorted({s for run in self.runs.values() for s in run.ingest.found})
        owned = {keys.group(p.name) for p in self.settings.pipelines}
        try:
            found = await unowned_groups(self.client, streams, owned)
        except (RedisError, OSError):
            return  # Redis is not up yet: said by the loops that wait for it
        if found:
            _log.warning("groups_without_pipeline", groups=found,
                         why="no pipeline of this config reads them (removed or renamed? or another "
                             "config's on this Redis): they keep their frames pending; docs/operations.md "
                             "says how to remove or move them")

    def _build(self, p: PipelineSettings, threads: int) -> PipelineRun:
        """One pipeline's stages, in flow order; started by the caller."""
        size = p.max_in_flight
        in_flight = InFlight(size)
        # Read when scraped, from the registry itself: no counter to keep in step.
        self.metrics.in_flight.labels(p.name).set_function(lambda: in_flight.in_flight)
        self.metrics.pipeline_paused.labels(p.name).set_function(
            lambda: float(in_flight.paused is not None and not in_flight.loading))
        read_q: asyncio.Queue = asyncio.Queue(size)
        decode_q: asyncio.Queue = asyncio.Queue(size) if p.fps > 0 else read_q
        batch_q: asyncio.Queue = asyncio.Queue(size)
        # live mode: what a read admits under overload (stages/queue_wait.py)
        waits = QueueWait(p.batch_size, p.max_age_ms) if p.max_age_ms else None
        admission = Admission(p, in_flight, read_q, self._outcomes, self.metrics, self.client,
                              self.stop_event, on_read=self.snapshots.frames_read, waits=waits,
                              skews=self.clock_skews)
        common = (p, self.client, self._consumer_name, admission, in_flight, self.metrics, self.stop_event)
        stateful = self.catalogue.get(p.model).task == "track"
        leases = SourceLeases(self.client, p.name, self.consumer,
                              ttl_ms=max(5000, int(5000 * self._discover_s)),
                              on_lost=self.metrics.leases_lost.labels("source").inc) if stateful else None
        ingest = RedisIngest(
            *common, reader=self.reader, discover_s=self._discover_s, leases=leases,
            cluster=self.settings.redis_cluster,
            # Never read results back as frames (this config's, and any under the default
            # prefix: another deployment's); a chained pipeline reads its upstream's.
            exclude_globs=[keys.output_glob(q.output, q.name) for q in self.settings.pipelines
                           if q.name != p.prompt_from] + ([] if p.prompt_from else [keys.RESULTS_GLOB]),
        )
        reclaimer = Reclaimer(*common, streams=lambda: ingest.streams,
                              min_idle_ms=self.settings.reclaim_min_idle_ms)
        assert self._decode_pool is not None
        chain: list[Any] = []
        if p.fps > 0:
            chain.append(Sampler(p.fps, self.client, read_q, decode_q, self._outcomes, self.metrics,
                                 self.stop_event))
        chain.append(
            Decoder(decode_q, batch_q, self._outcomes, self._decode_pool, self.metrics,
                    self.settings.decode.max_pixels, lambda: self.decode_target(p.model), p.max_age_ms,
                    concurrency=threads, jpegs=self._jpegs,
                    keep_snapshot=self.settings.control.page_sources > 0)
        )
        # A stateful model's sources each stay on one device (the worker's own queue).
        pinned = [w.own for w in self.workers] if stateful and len(self.workers) > 1 else None
        chain.append(Batcher(p, batch_q, self._batches, pinned,
                             prompt=lambda: self.prompt_book.current(p.name), waits=waits))
        return PipelineRun(p, in_flight, read_q, ingest, reclaimer, chain)

    async def _unload_idle_models(self) -> None:
        idle_s = self.settings.manager.idle_unload_s
        if not idle_s:
            return
        while not await wait_or_stop(self.stop_event, min(30.0, idle_s / 2)):
            self.manager.cleanup(idle_s)

    @property
    def consumer(self) -> str:
        """This daemon's consumer name (`host:slot`); a new one if the lease was lost."""
        return self._lease.name if self._lease else ""

    def _in_flight_of(self, pipeline: str) -> InFlight | None:
        run = self.runs.get(pipeline)
        return run.in_flight if run else None

    def _read_own_again(self, pipeline: str) -> None:
        if (run := self.runs.get(pipeline)) is not None:
            run.ingest.read_own_again()

    def _consumer_name(self) -> str:
        return self.consumer

    @property
    def decode_pool(self) -> Executor:
        """The shared decode executor (started with the daemon)."""
        if self._decode_pool is None:
            raise RuntimeError("the daemon has not started")
        return self._decode_pool

    def decode_target(self, model: str) -> InputShape | None:
        """How `model` sizes a frame, so a large JPEG may be decoded down towards it (DCT
        scaling). For the tasks whose results carry no pixel maps (boxes and the result's size
        are mapped back to the frame's pixels); masks and depth maps come out at the size of the
        image the model was given, so those models get frames at full size."""
        if not self.settings.decode.draft or self.catalogue.get(model).task not in DRAFT_TASKS:
            return None
        return self.manager.decode_shape(model)

    def _writes_text(self, model: str) -> bool:
        return self.catalogue.get(model).task == "generate"

    def worker_for(self, device: str, model: str) -> Worker:
        """The worker that runs `model` on `device` (it loads there too)."""
        workers = self.text_workers if self._writes_text(model) else self.workers
        for worker in workers:
            if worker.device == device:
                return worker
        raise ModelError(f"no worker owns device {device!r}; devices: {', '.join(self.devices)}")

    async def _acquire_lease(self) -> str:
        """The consumer lease; Redis refusing it (ACLs, a read-only replica) is not retried."""
        assert self._lease is not None
        try:
            return await self._lease.acquire()
        except ResponseError as e:
            if out_of_memory(e):  # it passes once memory is freed: waited out (it was exit 1)
                raise
            raise SightstreamError(f"redis refused this daemon's consumer lease: {e}") from None

    async def _wait_for_redis(self) -> bool:
        """An unreachable Redis at start is retried with back-off, not fatal. False: stopped."""
        url = safe_url(self.settings.redis_url)
        retry = RedisRetry("start", self.metrics, self.stop_event, url=url)
        try:
            await retry.call(self.client.ping)
            cluster = (await retry.call(lambda: self._info("cluster"))).get("cluster_enabled")
            await retry.call(self._check_scripting)
            memory = await retry.call(lambda: self._info("memory"))
        except Stopped:
            return False
        except RedisClusterException as e:  # redis_cluster = true, and the server is not one
            raise ConfigError(f"invalid setting redis_cluster: {url} is not a Redis Cluster node "
                              f"({e})") from None
        if cluster and not self.settings.redis_cluster:
            raise ConfigError(f"{url} is a Redis Cluster node: set redis_cluster = true")
        policy = memory.get("maxmemory_policy")
        if memory.get("maxmemory") and policy not in (None, "noeviction"):
            lost = "keys with a TTL: consumer and job leases, sampling keys, results with result_ttl_s" \
                if str(policy).startswith("volatile") else \
                "frames not yet read, consumer groups, results, prompts, jobs and leases"
            _log.warning("redis_evicts_keys", maxmemory_policy=policy, maxmemory=memory.get("maxmemory"),
                         consequence=f"at maxmemory Redis deletes {lost}, without a word",
                         hint="set maxmemory-policy noeviction (docs/operations.md, 'The Redis it needs')")
        return True

    async def _info(self, section: str) -> dict[str, Any]:
        """INFO's section, or nothing where this daemon's Redis user may not ask (`-@dangerous`
        takes INFO away: the start waited for ever, saying only "workers are not up")."""
        try:
            return dict(await self.client.info(section))
        except ResponseError as e:
            if refused_for_good(e):
                return {}
            raise

    async def _check_scripting(self) -> None:
        """Results are written with their acknowledgement by a Lua script: a Redis user without
        scripting (`-@scripting`) left every frame pending, for ever, while ready said 200."""
        try:
            await self.client.eval("return 1", 0)
        except ResponseError as e:
            if refused_for_good(e):
                raise ConfigError(
                    f"redis refuses Lua scripts (EVAL) to this daemon's user ({e}): each result is "
                    "written with its frame's acknowledgement by a script; allow +@scripting "
                    "(docs/operations.md, 'The Redis it needs')") from None
            raise

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
        if self.adhoc:
            self.adhoc.answer_the_rest()
        for w in self.workers + self.text_workers:
            w.close()
        for pool in (self._decode_pool, self._host_pool, self.page_pool):
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)
        # Leases expire by themselves: releasing them only speeds up a takeover, so a Redis
        # that does not answer gets a second, not a connect timeout per lease.
        try:
            await asyncio.wait_for(self._release_leases(), 2.0)
        except TimeoutError:
            _log.warning("leases_left_to_expire")
        self.manager.unload_all()
        await close_client(self.client)
        await close_client(self.reader)

    async def _release_leases(self) -> None:
        for run in self.runs.values():
            if run.ingest.leases:
                await run.ingest.leases.release_all()
        if self._lease:
            await self._lease.release()

    async def _drain(self) -> None:
        await asyncio.gather(*(run.drain() for run in self.runs.values()))
        if self._jobs_task:  # jobs stop (and give their leases back) before batching ends
            await self._jobs_task
        if self.adhoc:
            await self.adhoc.close()
        if self._worker_tasks:  # each queue's workers pass STOP on to each other
            await self._batches.put(STOP)
            await asyncio.gather(*self._worker_tasks)
        if self._publisher_task:
            await self._outcomes.put(STOP)
            await self._publisher_task
        # Text calls publish nothing (their callers are answered), so the frames' results are
        # out before a summary call that may take minutes is waited for (its queue may be full
        # behind it): a /predict of text may yet be answered, within shutdown_timeout_s.
        if self._text_worker_tasks:
            await self._text_batches.put(STOP)
            await asyncio.gather(*self._text_worker_tasks)

    def _all_tasks(self) -> list[asyncio.Task]:
        tasks = [t for run in self.runs.values() for t in (*run.source_tasks, *run.chain_tasks)]
        tasks += self._worker_tasks + self._text_worker_tasks + self._service_tasks
        tasks += list(self.pauses.tasks.values()) if self.pauses else []
        tasks += [self._jobs_task] if self._jobs_task else []
        return tasks + ([self._publisher_task] if self._publisher_task else [])

    def failed(self) -> BaseException | None:
        """An exception that ended a stage early (a bug): the service exits rather than idle.
        Its notes name the stage (the task)."""
        for task in self._all_tasks():
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                note = f"in the stage {task.get_name()}"
                if note not in getattr(error, "__notes__", ()):
                    error.add_note(note)
                return error
        return None

    async def redis_ok(self) -> bool:
        return await self.redis_problem() is None

    async def redis_problem(self) -> str | None:
        """Why Redis cannot be used now, or None: it answers; on a cluster, the node asked also
        sees the cluster whole (a node of a failed cluster still answers PING, while no frame
        of the lost slots can move)."""
        cluster = self.settings.redis_cluster
        down = "the Redis Cluster is down or unreachable" if cluster else "redis is unreachable"
        try:
            if cluster:
                info = await asyncio.wait_for(self.client.execute_command("CLUSTER INFO"), 1.0)
                if info.get("cluster_state") != "ok":  # redis-py parses it into a dict
                    return down
            elif not await asyncio.wait_for(self.client.ping(), 1.0):
                return down
        except AuthenticationError as e:  # a wrong or rotated password: not a network fault
            return f"redis refused this daemon's credentials (redis_url): {e}"
        except TimeoutError:
            return f"{down}: no answer within 1 s"
        except (RedisError, OSError) as e:  # what went wrong: a TLS certificate said only "unreachable"
            return f"{down}: {str(e) or type(e).__name__}"
        # at maxmemory Redis answers but takes no write: no result gets written
        if self.metrics.redis_out_of_memory_within(OOM_RECENT_S):
            return "redis is out of memory (maxmemory): it refuses writes, results wait"
        return None

    def pipelines(self) -> list[dict[str, Any]]:
        out = []
        for p in self.settings.pipelines:
            run = self.runs.get(p.name)
            out.append({
                "name": p.name, "model": p.model, "fps": p.fps, "input": p.shown_input,
                "streams": list(run.ingest.streams) if run else [],
                "in_flight": run.in_flight.in_flight if run else 0,
                "paused": run.in_flight.paused if run else None,
                "reclaimed": run.reclaimer.reclaimed if run else 0,
            })
        return out
