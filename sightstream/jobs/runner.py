"""The jobs this daemon runs. Every daemon looks for jobs to run (on a notice that one was
submitted, and every `jobs.poll_s`): a job pending, or running with no live holder, is taken
by whichever daemon first sets its lease (`SET NX PX` with a random token). The lease is
renewed every third of its TTL; a daemon that dies stops renewing, and another takes the job
over within the TTL and resumes it from its checkpoint. A lease found lost (not renewed, or
held by another) stops the job here at once; its fenced writes would be refused anyway.

A cancel notice stops the job on its holder at once; the holder's fenced writes also find the
job no longer running (within a progress interval) should a notice be lost.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import Executor

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import keys, log
from sightstream.config import Settings
from sightstream.jobs.run import JobRun, JobStopped
from sightstream.jobs.sources import SourceRefused, check_source
from sightstream.jobs.store import Job, JobSpec, JobStore
from sightstream.leases import Lease
from sightstream.metrics import Metrics
from sightstream.prompts import PromptBook
from sightstream.stages.adhoc import AdhocBatcher
from sightstream.stages.flow import backoff_s, worth_logging
from sightstream.stages.video_reader import VideoSourceError

_log = log.get(__name__)


class JobRunner:
    def __init__(self, store: JobStore, client: Redis, reader: Redis, adhoc: AdhocBatcher,
                 decode_pool: Executor, settings: Settings, holder: str, metrics: Metrics,
                 stop: asyncio.Event, prompts: PromptBook | None = None,
                 inputs: list[JobSpec] | None = None) -> None:
        self._store = store
        self._unregistered = list(inputs or [])  # pipelines' video inputs not yet in Redis
        self._prompts = prompts
        self._client, self._reader = client, reader
        self._adhoc = adhoc
        self._decode_pool = decode_pool
        self._settings = settings
        self._s = settings.jobs
        self._holder = holder
        self._metrics = metrics
        self._stop = stop
        self._wake = asyncio.Event()
        self.running: dict[str, asyncio.Task] = {}
        self._inputs: set[str] = set()  # of the running jobs: pipelines' video inputs
        self.finished = 0

    async def run(self) -> None:
        notices = asyncio.create_task(self._follow_notices(), name="job-notices")
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    await self._take_jobs()
                    failures = 0
                except (RedisError, OSError) as e:
                    failures += 1
                    self._metrics.redis_errors.labels("jobs").inc()
                    if worth_logging(failures):
                        _log.warning("jobs_unreachable", error=str(e), failures=failures)
                wait = backoff_s(failures) if failures else self._s.poll_s
                self._wake.clear()
                stop = asyncio.ensure_future(self._stop.wait())
                try:
                    await asyncio.wait([stop, asyncio.ensure_future(self._wake.wait())], timeout=wait,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stop.cancel()
        finally:
            notices.cancel()
            await self.stop_all()

    async def stop_all(self) -> None:
        """At shutdown: stop every job here and give its lease back, so another daemon
        resumes it at once rather than after the TTL."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel("sightstream is shutting down")
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _take_jobs(self) -> None:
        """Take free jobs: users' up to `max_concurrent` here; pipelines' video inputs up to a
        fair share (ceil(inputs / daemons)), giving one back per round when over it."""
        while self._unregistered:
            await self._store.ensure(self._unregistered[0])
            self._unregistered.pop(0)
        jobs = []
        for job_id in await self._store.active():
            job = await self._store.get(job_id)
            if job is None or job.status not in ("pending", "running"):
                await self._store.forget(job_id)  # expired, or finished elsewhere
            else:
                jobs.append(job)
        inputs = [j for j in jobs if j.spec.pipeline]
        share = math.ceil(len(inputs) / max(1, await self._daemons())) if inputs else 0
        held = {"user": sum(1 for j in self.running if j not in self._inputs),
                "input": sum(1 for j in self.running if j in self._inputs)}
        for job in jobs:
            kind = "input" if job.spec.pipeline else "user"
            limit = share if kind == "input" else self._s.max_concurrent
            if job.id in self.running or held[kind] >= limit or self._stop.is_set():
                continue
            lease = Lease(self._client, keys.job_lease(job.id), self._s.lease_ttl_ms)
            if await lease.acquire():
                held[kind] += 1
                if job.spec.pipeline:
                    self._inputs.add(job.id)
                self.running[job.id] = asyncio.create_task(self._run(job, lease), name=f"job-{job.id}")
                self._metrics.jobs_running.set(len(self.running))
        if held["input"] > share:
            surplus = next(j for j in reversed(list(self.running)) if j in self._inputs)
            _log.info("video_input_handed_over", job=surplus, share=share)
            self.running[surplus].cancel("handed over: more daemons share the video inputs now")

    async def _daemons(self) -> int:
        """Daemons sharing this Redis: each holds a consumer-name lease."""
        count = 0
        async for _ in self._client.scan_iter(match=keys.consumer_slot("*", "*"), count=1000):
            count += 1
        return count

    async def _run(self, job: Job, lease: Lease) -> None:
        keeping = asyncio.create_task(lease.keep(lambda why: self._lost(job.id, why), self._stop))
        try:
            started, status = await self._store.start(job.id, lease.token, self._holder)
            if not started:
                return  # cancelled or finished meanwhile
            fresh = await self._store.get(job.id)
            if fresh is None:
                return
            _log.info("job_started", job=job.id, source=fresh.spec.source, attempt=fresh.attempt,
                      resume_after=fresh.last_position or None)
            await self._execute(fresh, lease)
        except JobStopped as e:
            _log.info("job_stopped", job=job.id, reason=str(e))
        except (RedisError, OSError) as e:  # the lease lapses; it is taken again once Redis is back
            _log.warning("job_paused_redis_unreachable", job=job.id, error=str(e))
        finally:
            keeping.cancel()
            await lease.release()
            self.running.pop(job.id, None)
            self._inputs.discard(job.id)
            self._metrics.jobs_running.set(len(self.running))

    async def _execute(self, job: Job, lease: Lease) -> None:
        status, error = "completed", ""
        try:
            source = check_source(job.spec.source, self._s)
            book, pipeline = self._prompts, job.spec.pipeline
            prompt = (lambda: book.current(pipeline)) if book is not None and pipeline else None
            run = JobRun(job, source, self._store, lease.token, self._client, self._reader, self._adhoc,
                         self._decode_pool, self._s, self._settings.decode, prompt)
            await run.run()
        except (VideoSourceError, SourceRefused) as e:
            status, error = "failed", str(e)
        except (JobStopped, RedisError, OSError, asyncio.CancelledError):
            raise
        except Exception as e:  # a bug: the job says so rather than hanging "running"
            _log.exception("job_crashed", job=job.id)
            status, error = "failed", f"internal error: {e!r}"
        if await self._store.finish(job, lease.token, status, error):
            self.finished += 1
            self._metrics.jobs_finished.labels(status).inc()
            _log.info("job_finished", job=job.id, status=status, error=error or None)

    def _lost(self, job_id: str, why: str) -> None:
        _log.warning("job_lease_lost", job=job_id, reason=why)
        self._metrics.leases_lost.labels("job").inc()
        if (task := self.running.get(job_id)) is not None:
            task.cancel(f"lease lost: {why}")

    async def _follow_notices(self) -> None:
        failures = 0
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.JOBS_CHANNEL)
                self._wake.set()  # jobs submitted while unsubscribed
                failures = 0
                while not self._stop.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    kind, _, job_id = message["data"].decode().partition(":")
                    if kind == "new":
                        self._wake.set()
                    elif kind == "cancel" and (task := self.running.get(job_id)) is not None:
                        task.cancel("cancelled")
            except (RedisError, OSError):
                failures += 1
                try:
                    await asyncio.wait_for(self._stop.wait(), backoff_s(failures))
                except TimeoutError:
                    pass
            finally:
                await pubsub.aclose()
