"""The jobs this daemon runs. Every daemon looks for jobs to run (on a notice that one was
submitted, and every `jobs.poll_s`): a job pending, or running with no live holder, is taken
by whichever daemon first sets its lease (`SET NX PX` with a random token). The lease is
renewed every third of its TTL; a daemon that dies stops renewing, and another takes the job
over within the TTL and resumes it from its checkpoint. A lease found lost (not renewed, or
held by another) stops the job here at once; its fenced writes would be refused anyway.

A pipeline's video inputs are jobs too, taken only by daemons whose config lists them, up to
a fair share each. A daemon that starts with a pipeline whose input no longer lists a URL
retires that URL's job.

A cancel notice stops the job on its holder at once; the holder's fenced writes also find the
job no longer running (within half a second) should a notice be lost.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sightstream import keys, log
from sightstream.channels import follow_channel
from sightstream.config import PipelineSettings, Settings
from sightstream.errors import ModelError
from sightstream.jobs.run import InputViews, JobFailed, JobRun, JobStopped, Limits
from sightstream.jobs.sources import Source, SourceRefused, check_source
from sightstream.jobs.store import Job, JobSpec, JobStore
from sightstream.jobs.summaries import JobSummaries
from sightstream.jobs.summary import SummaryFailed
from sightstream.leases import Lease
from sightstream.metrics import Metrics
from sightstream.prompts import PromptBook
from sightstream.stages.adhoc import AdhocBatcher
from sightstream.stages.flow import RedisRetry, backoff_s
from sightstream.stages.video_reader import VideoSourceError

_log = log.get(__name__)
LEFT_CHECK_S = 30.0  # a job this daemon cannot run is looked at again after this long
DAEMONS_EVERY_S = 10.0  # how often the daemons sharing the inputs are counted
MEMBER_TTL_MS = 25_000  # a daemon's video-member key, renewed at each count: gone 15-25 s after it dies
PRUNE_INDEX_EVERY_S = 600.0  # how often expired jobs' ids leave the index (JobStore.prune_index)
# After taking a dead daemon's video input over its share: no hand-back for this long, while
# the dead one still counts (its video-member key lapses in 25 s, counted again every 10 s)
ORPHAN_GRACE_S = 40.0
ORPHANS_EVERY_S = 5.0  # how often a daemon at its limit looks for running jobs whose lease lapsed


def input_spec(pipeline: PipelineSettings, url: str, cluster: bool) -> JobSpec:
    """A pipeline's video input as a job: its results in the pipeline's output for the source,
    named with the job's hash tag on a Redis Cluster (keys.video_input_source)."""
    source = keys.video_input_source(pipeline.name, url, cluster)
    return JobSpec(url, pipeline.model, pipeline.fps, pipeline=pipeline.name,
                   output=keys.result_stream(pipeline.output, pipeline.name, source),
                   deadletter=keys.deadletter_stream(pipeline.name, source))


class JobRunner:
    def __init__(self, store: JobStore, client: Redis, reader: Redis, adhoc: AdhocBatcher,
                 decode_pool: Executor, settings: Settings, holder: Callable[[], str], metrics: Metrics,
                 stop: asyncio.Event, prompts: PromptBook | None, create: Callable[[str], Any],
                 views: InputViews | None = None, inherited: bool = False) -> None:
        self._store = store
        self._client, self._reader = client, reader
        self._adhoc = adhoc
        self._decode_pool = decode_pool
        self._settings = settings
        self._s = settings.jobs
        self._holder_name = holder  # the consumer name: a new one if its lease was lost
        # The name was taken over from a crashed process (daemon/consumer.py): the jobs it ran
        # are freed in the first round, not waited out (see FREE_OWN)
        self._inherited = inherited
        self._metrics = metrics
        self._stop = stop
        self._prompts = prompts
        self._create = create  # a new, unloaded adapter for a model id (summaries' budgets)
        self._views = views  # told of a pipeline's video inputs' frames and results
        # This config's video inputs, by job id; registered in Redis on the first round.
        self._pipelines = {p.name: p for p in settings.pipelines}
        self._inputs = {keys.input_job_id(p.name, url): input_spec(p, url, settings.redis_cluster)
                        for p in settings.pipelines for url in p.videos}
        self._registered = False
        self._wake = asyncio.Event()
        self._daemons: tuple[float, dict[str, int]] = (0.0, {})  # (when counted, how many per pipeline)
        self._orphans_until = 0.0  # no input handed back before this: see ORPHAN_GRACE_S
        self._orphans_at = 0.0  # when running jobs were last looked at for a lapsed lease
        self._paused: dict[str, tuple[float, int]] = {}  # job -> (not before, pauses in a row)
        # job -> (when looked at, why not here, its attempt then: one run since makes it moot)
        self._cannot: dict[str, tuple[float, str | None, int]] = {}
        self.running: dict[str, asyncio.Task] = {}
        self.finished = 0

    async def run(self) -> None:
        notices = asyncio.create_task(self._follow_notices(), name="job-notices")
        waker = asyncio.create_task(self._wake_on_stop(), name="job-waker")
        retry = RedisRetry("jobs", self._metrics, self._stop)
        pruned_at = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    await self._take_jobs()
                    if time.monotonic() - pruned_at >= PRUNE_INDEX_EVERY_S:
                        await self._store.prune_index()
                        pruned_at = time.monotonic()
                    retry.succeeded()
                except (RedisError, OSError) as e:
                    retry.note(e)
                self._wake.clear()
                try:  # a new job's notice, or the stop, wakes this early
                    wait = backoff_s(retry.failures) if retry.failures else self._s.poll_s
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
        finally:
            notices.cancel()
            waker.cancel()
            await self.stop_all()
            await self._leave_inputs()

    async def _leave_inputs(self) -> None:
        """At shutdown: the others share the video inputs without this daemon at their next count."""
        members = [keys.video_member(spec.pipeline, self._holder_name())
                   for spec in self._inputs.values() if spec.pipeline]
        for key in sorted(set(members)):  # one key at a time: on a cluster they lie in other slots
            try:
                await self._client.delete(key)
            except (RedisError, OSError):
                return  # it lapses by itself

    async def _wake_on_stop(self) -> None:
        await self._stop.wait()
        self._wake.set()

    async def stop_all(self) -> None:
        """At shutdown: stop every job here and give its lease back, so another daemon
        resumes it at once rather than after the TTL."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel("sightstream is shutting down")
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _take_jobs(self) -> None:
        """Take free jobs: users' up to `max_concurrent` here; this config's video inputs up
        to a fair share of each pipeline's (ceil(its inputs / the daemons listing them)),
        giving one back per round when over it. A running input whose lease is free (its
        daemon died) is taken over its share: the dead daemon counts for a while yet, and
        every live one is at its share."""
        if not self._registered:
            await self._register_inputs()
        ids = await self._store.active()
        if await self._restore_lost_inputs(ids):
            ids = await self._store.active()
        self._cannot = {job_id: seen for job_id, seen in self._cannot.items() if job_id in ids}
        jobs = []
        me = self._holder_name()
        for job_id, job in zip(ids, await self._store.get_many(ids)):
            if job is None or job.status not in ("pending", "running"):
                await self._store.forget(job_id)  # expired, or finished elsewhere
            elif not job.spec.pipeline or job_id in self._inputs:  # another config's inputs: not ours
                jobs.append(job)
        # Jobs this daemon's name ran before a restart (kill -9, then systemd) come first, now:
        # they waited out their lease, and newer jobs took the slots meanwhile.
        if self._inherited:  # the first round only: later, a job `running` under this name
            self._inherited = False  # may be a renamed live daemon's, or just taken by another
            own = [j for j in jobs if j.status == "running" and j.holder == me and j.id not in self.running]
            for job in own:
                if await self._store.free_own(job.id, me):
                    _log.info("job_resumed_after_restart", job=job.id, attempt=job.attempt)
            jobs = own + [j for j in jobs if j not in own]
        # Video inputs: a fair share of each pipeline's, among the daemons that list them
        inputs = Counter(j.spec.pipeline for j in jobs if j.spec.pipeline)
        members = await self._input_daemons() if inputs else {}
        share = {p: math.ceil(n / members.get(p, 1)) for p, n in inputs.items()}
        orphans_looked_for = time.monotonic() - self._orphans_at >= ORPHANS_EVERY_S
        if orphans_looked_for:
            self._orphans_at = time.monotonic()
        users = sum(1 for j in self.running if j not in self._inputs)  # users' jobs held here
        held = Counter(self._inputs[j].pipeline for j in self.running if j in self._inputs)  # inputs
        now = time.monotonic()
        for job in jobs:
            kind = "input" if job.spec.pipeline else "user"
            limit = share[job.spec.pipeline] if kind == "input" else self._s.max_concurrent
            over = (held[job.spec.pipeline] if kind == "input" else users) >= limit
            if (over and kind == "user" and job.status == "running" and job.id not in self.running
                    and orphans_looked_for):
                await self._store.mark_orphaned(job.id)  # if its daemon died: it is not running
            if (job.id in self.running or (over and not (kind == "input" and job.status == "running"))
                    or self._stop.is_set() or self._paused.get(job.id, (0.0, 0))[0] > now):
                continue
            seen = self._cannot.get(job.id)
            if (job.status == "pending" and seen is not None and seen[1] is not None
                    and seen[2] == job.attempt and now - seen[0] < LEFT_CHECK_S):
                continue  # left to the others a moment ago, and not run since (its daemon may be gone now)
            lease = Lease(self._client, keys.job_lease(job.id), self._s.lease_ttl_ms)
            if await lease.acquire():
                if await self._left_to_others(job, lease.token):  # e.g. a file input not on this disk
                    await lease.release()
                    continue
                if kind == "input":
                    held[job.spec.pipeline] += 1
                else:
                    users += 1
                if over:
                    self._orphans_until = now + ORPHAN_GRACE_S
                    _log.info("video_input_taken_over", job=job.id, share=limit,
                              why="its daemon is gone (its lease lapsed)")
                self.running[job.id] = asyncio.create_task(self._run(job, lease), name=f"job-{job.id}")
                self._metrics.jobs_running.set(len(self.running))
        over_share = [p for p in share if held[p] > share[p]]
        if over_share and now >= self._orphans_until:  # one a round
            surplus = next(j for j in reversed(list(self.running))
                           if j in self._inputs and self._inputs[j].pipeline == over_share[0])
            _log.info("video_input_handed_over", job=surplus, share=share[over_share[0]])
            self.running[surplus].cancel("handed over: more daemons share the video inputs now")

    async def _restore_lost_inputs(self, active: list[str]) -> bool:
        """Inputs whose job is gone from Redis (restarted without persistence) are registered
        again, so a camera input does not stop for good. True: some were."""
        idle = [job_id for job_id in self._inputs if job_id not in active]
        if not idle:
            return False
        gone = [job_id for job_id, job in zip(idle, await self._store.get_many(idle)) if job is None]
        for job_id in gone:
            spec = self._inputs[job_id]
            await self._store.ensure(spec)
            _log.warning("video_input_restored", pipeline=spec.pipeline, source=spec.shown,
                         why="its job was gone from Redis (restarted without persistence?)")
        return bool(gone)

    async def _register_inputs(self) -> None:
        """This config's video inputs as jobs (a failed one is tried again: the config may
        have been mended); inputs of our pipelines that the config no longer lists are retired."""
        for spec in self._inputs.values():
            await self._store.ensure(spec)
        for job_id, job in zip(ids := await self._store.active(), await self._store.get_many(ids)):
            if job and job.spec.pipeline in self._pipelines and job_id not in self._inputs:
                await self._store.retire(job_id, f"no longer in pipeline {job.spec.pipeline}'s input")
                _log.info("video_input_retired", pipeline=job.spec.pipeline, source=job.spec.shown)
        self._registered = True

    async def _left_to_others(self, job: Job, token: str) -> bool:
        """Whether to leave `job` (whose lease this daemon just took) to the other daemons:
        this one cannot run it (its config lacks the model or its weights, or does not allow
        the source: a rolling config change, or a fleet where only some hosts have a model or a
        folder). Taken, it would fail here, or hang. The job says why (`waiting`; a `running`
        job whose daemon is gone is `pending` again: none runs it now). Once every
        daemon on the Redis has said it cannot, it is run here anyway: it fails, saying why,
        rather than waiting for nobody."""
        why = await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._refusal, job.spec)
        self._cannot[job.id] = (time.monotonic(), why, job.attempt)
        if why is None:
            return False
        refused = await self._store.note_waiting(job.id, token, self._holder_name(), why)
        everyone = await self._daemons_now()
        if everyone <= refused:
            return False
        _log.info("job_left_to_others", job=job.id, reason=why)
        return True

    def _refusal(self, spec: JobSpec) -> str | None:
        """Why this daemon cannot run a job of `spec`, or None (in a thread: it looks at the disk)."""
        try:
            self._check_runs_here(spec)
        except (SourceRefused, ModelError) as e:
            return str(e)
        return None

    def _check_runs_here(self, spec: JobSpec) -> Source:
        """The job's source, once its models are found here too. Raises SourceRefused or
        ModelError (in a thread: it looks at the disk)."""
        source = check_source(spec.source, self._s, bool(spec.pipeline))
        if not spec.pipeline:  # a pipeline's model was checked at start; its file may be on its way
            self._create(spec.model)
        if spec.summarize:
            self._create(spec.summarize["model"])
        return source

    async def _daemons_now(self) -> set[str]:
        """The consumer names of the daemons on this Redis now (each holds a consumer-name lease)."""
        prefix = keys.consumer_slot("", "")[:-1]
        return {key.decode()[len(prefix):] async for key in
                self._client.scan_iter(match=keys.consumer_slot("*", "*"), count=1000)}

    async def _input_daemons(self) -> dict[str, int]:
        """How many daemons share each pipeline's video inputs: those whose config lists inputs
        of it (each keeps a video-member key per such pipeline), counted every 10 s. Counting
        every daemon on the Redis gave a share too small where some serve other pipelines:
        inputs waited, `pending`, for daemons that would never take them."""
        if time.monotonic() - self._daemons[0] > DAEMONS_EVERY_S:
            counts = {}
            for pipeline in sorted({spec.pipeline for spec in self._inputs.values() if spec.pipeline}):
                mine = keys.video_member(pipeline, self._holder_name())
                await self._client.set(mine, "1", px=MEMBER_TTL_MS)
                found = [key async for key in
                         self._client.scan_iter(match=keys.video_member(pipeline, "*"), count=1000)]
                counts[pipeline] = max(1, len(found))
            self._daemons = (time.monotonic(), counts)
        return self._daemons[1]

    async def _run(self, job: Job, lease: Lease) -> None:
        renewals = RedisRetry("job_lease", self._metrics, self._stop, job=job.id)
        lost: list[str] = []  # why, once: the renewal and a fenced write may both find it lost

        def lease_lost(why: str) -> None:
            if not lost:
                lost.append(why)
                _log.warning("job_lease_lost", job=job.id, reason=why)
                self._metrics.leases_lost.labels("job").inc()

        def renewal_lost(why: str) -> None:
            lease_lost(why)
            if (task := self.running.get(job.id)) is not None:
                task.cancel(f"lease lost: {why}")

        keeping = asyncio.create_task(lease.keep(renewal_lost, self._stop, on_error=renewals.note))
        try:
            started, status = await self._store.start(job.id, lease.token, self._holder_name())
            if not started:
                return  # cancelled or finished meanwhile
            fresh = await self._store.get(job.id)
            if fresh is None:
                return
            _log.info("job_started", job=job.id, source=fresh.spec.shown, attempt=fresh.attempt,
                      resume_after=fresh.last_position or None)
            await self._execute(fresh, lease)
            self._paused.pop(job.id, None)
        except JobStopped as e:
            if e.lease_lost:  # a fenced write found it before the renewal did: the usual case
                lease_lost(str(e))
            else:
                _log.info("job_stopped", job=job.id, reason=str(e))
        except (RedisError, OSError) as e:  # taken again once Redis is back, after a back-off
            pauses = self._paused.get(job.id, (0.0, 0))[1] + 1
            self._paused[job.id] = (time.monotonic() + backoff_s(pauses, cap=30.0), pauses)
            self._metrics.redis_errors.labels("job").inc()
            _log.warning("job_paused_redis_error", job=job.id, error=str(e), pauses=pauses)
        finally:
            keeping.cancel()
            try:  # pending again if it was running: only a dead daemon leaves a running job unleased
                await self._store.let_go(job.id, lease.token)
            except (RedisError, OSError) as e:  # the lease expires by itself
                _log.warning("job_let_go_failed", job=job.id, error=str(e))
            self.running.pop(job.id, None)
            self._metrics.jobs_running.set(len(self.running))

    async def _execute(self, job: Job, lease: Lease) -> None:
        status, error = "completed", ""
        try:
            loop = asyncio.get_running_loop()  # the file checks touch the disk
            source = await loop.run_in_executor(self._decode_pool, self._check_runs_here, job.spec)
            summaries = self._summaries(job, lease.token)
            run = self._job_run(job, source, lease.token)
            periodic = None
            if summaries is not None and summaries.every_s:
                periodic = asyncio.create_task(summaries.periodic(), name=f"job-summaries-{job.id}")
            elif summaries is not None and not (job.spec.max_seconds or job.spec.max_frames):
                # a video that turns out to be live HLS would never give its summary
                periodic = asyncio.create_task(summaries.once_live(lambda: run.is_live),
                                               name=f"job-summaries-{job.id}")
            try:
                await run.run()
            finally:
                if periodic is not None:
                    assert summaries is not None
                    summaries.end()
                    periodic.cancel()
                    await asyncio.gather(periodic, return_exceptions=True)
            if summaries is not None:  # the whole job's, once it read its source to the end
                await summaries.write(final=True)
        except (VideoSourceError, SourceRefused, JobFailed, ModelError) as e:
            status, error = "failed", str(e)
        except SummaryFailed as e:
            status, error = "failed", f"summary: {e}"
        except (JobStopped, RedisError, OSError, asyncio.CancelledError):
            raise
        except Exception as e:  # a bug: the job says so rather than hanging "running"
            _log.exception("job_crashed", job=job.id)
            status, error = "failed", f"internal error: {e!r}"
        if await self._store.finish(job, lease.token, status, error):
            self.finished += 1
            self._metrics.jobs_finished.labels(status).inc()
            _log.info("job_finished", job=job.id, status=status, error=error or None)

    def _summaries(self, job: Job, token: str) -> JobSummaries | None:
        if not job.spec.summarize:
            return None
        return JobSummaries(job, self._store, token, self._client, self._adhoc, self._create,
                            self._s.result_maxlen)

    def _job_run(self, job: Job, source: Source, token: str) -> JobRun:
        pipeline: PipelineSettings | None = self._pipelines.get(job.spec.pipeline)
        prompt, limits, views = None, None, None
        if pipeline is not None:  # a video input: the pipeline's prompt, batching and views apply
            book, name = self._prompts, pipeline.name
            prompt = (lambda: book.current(name)) if book is not None else None
            limits = Limits(pipeline.batch_size, pipeline.batch_timeout_ms, pipeline.result_maxlen)
            views = self._views
        return JobRun(job, source, self._store, token, self._client, self._reader, self._adhoc,
                      self._decode_pool, self._s, self._settings.decode, self._metrics, prompt, limits,
                      views)

    async def _follow_notices(self) -> None:
        async def caught_up() -> None:
            self._wake.set()  # jobs submitted while unsubscribed

        async def notice(data: bytes) -> None:
            kind, _, job_id = data.decode().partition(":")
            if kind == "new":
                self._wake.set()
            elif kind == "cancel" and (task := self.running.get(job_id)) is not None:
                task.cancel("cancelled")

        retry = RedisRetry("job_notices", self._metrics, self._stop)
        await follow_channel(self._client, keys.JOBS_CHANNEL, retry, self._stop, caught_up=caught_up,
                             on_message=notice)
