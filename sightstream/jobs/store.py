"""Jobs in Redis: one hash per job (spec, status, counts, timings, checkpoint), an index for
listing, a set of the jobs still to run, and change notices on `sightstream:jobs`.

Every write the job's runner makes is fenced by its lease token in a Lua script: the script
checks that the lease still holds the token (and that the job is still running) before it
writes, so a daemon that paused and lost its lease, or a job cancelled meanwhile, writes
nothing. Results carry a sequence number; a result at or below the checkpoint's is refused,
so a resumed job never reports a frame twice.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sightstream import keys
from sightstream.errors import SightstreamError
from sightstream.redis_conn import Lua, Script, lua_xadd, refused_for_good

FINISHED = ("completed", "failed", "cancelled")
STATUSES = ("pending", "running", *FINISHED)

# KEYS: lease, job. ARGV: token, holder, now (ISO). {1}: running now; {0, status}: not to run.
START = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1, ''} end
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= 'pending' and status ~= 'running' then return {0, status or ''} end
redis.call('HINCRBY', KEYS[2], 'attempt', 1)
redis.call('HSET', KEYS[2], 'status', 'running', 'holder', ARGV[2])
redis.call('HDEL', KEYS[2], 'waiting')
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(f, 1, 8) == 'refused:' then redis.call('HDEL', KEYS[2], f) end
end
if (redis.call('HGET', KEYS[2], 'started_at') or '') == '' then
  redis.call('HSET', KEYS[2], 'started_at', ARGV[3])
end
return {1, 'running'}
"""

# KEYS: lease, job. ARGV: token, the daemon that cannot run it, why (a sentence). The daemons
# that refused it so far (refused:<consumer> fields); none if the lease is not the caller's or
# the job has ended. A `running` job whose lease the caller could take was left by a daemon
# gone (stopped, killed): it is `pending` again, waiting for one that can run it.
NOTE_WAITING = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {} end
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= 'pending' and status ~= 'running' then return {} end
redis.call('HSET', KEYS[2], 'status', 'pending', 'waiting', ARGV[2] .. ' cannot run it: ' .. ARGV[3],
           'refused:' .. ARGV[2], ARGV[3])
local refused = {}
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  if string.sub(f, 1, 8) == 'refused:' then table.insert(refused, string.sub(f, 9)) end
end
return refused
"""

# KEYS: lease, job. ARGV: token. The holder lets the job go (it stops, or hands a video input
# over): `pending` again if it was running, and the lease deleted. 0: the lease is not the
# caller's (lost, or taken): nothing is changed. A `running` job whose lease is free is then
# one whose daemon died: the others may take it over their share of video inputs.
LET_GO = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[2], 'status') == 'running' then
  redis.call('HSET', KEYS[2], 'status', 'pending', 'holder', '')
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: lease, job. ARGV: the caller's consumer name. Asked by a daemon that took its name over
# from a crashed process (its identity in the name's lease: daemon/consumer.py), in its first
# round: a `running` job whose holder is that name was the crashed process's, and its lease is
# deleted, to be taken now rather than once it lapses. 1: the lease is free now; 0: not such a job.
FREE_OWN = """
if redis.call('HGET', KEYS[2], 'status') ~= 'running' or redis.call('HGET', KEYS[2], 'holder') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: lease, job. A `running` job whose lease has lapsed (its daemon died) shows as `pending`
# until a daemon takes it; it showed `running`, frozen, while every daemon was at its limit.
# 1: it was such a job.
ORPHANED = """
if redis.call('HGET', KEYS[2], 'status') ~= 'running' or redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], 'status', 'pending', 'holder', '')
return 1
"""

# KEYS: lease, job, stream. ARGV: token, seq, position, maxlen, counter, field, value, ...
# 1: written; 0: at or below the checkpoint (already reported); -1: lease lost; -2: not running.
PUBLISH = f"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[2], 'status') ~= 'running' then return -2 end
if tonumber(ARGV[2]) <= tonumber(redis.call('HGET', KEYS[2], 'last_seq') or '0') then return 0 end
{lua_xadd("KEYS[3]", "ARGV[4]", 6)}
redis.call('HSET', KEYS[2], 'last_seq', ARGV[2], 'last_position', ARGV[3])
redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
return 1
"""

# KEYS: lease, job. ARGV: token, last ('1': the run's last write, also once it is cancelled),
# field, value, ... 1: written; -1: lease lost; -2: not running.
PROGRESS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local status = redis.call('HGET', KEYS[2], 'status')
if status ~= 'running' and not (ARGV[2] == '1' and status == 'cancelled') then return -2 end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
return 1
"""

# KEYS: lease, job, stream. ARGV: token, final ('1' | '0'), upto (the results' entry ID it
# covers up to), summary JSON, maxlen, field, value, ... A final summary is written once, and
# nothing after it; a periodic one only past the last one's `upto`. 1: written; 0: already
# written; -1, -2 as above.
SUMMARY = f"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[2], 'status') ~= 'running' then return -2 end
if redis.call('HGET', KEYS[2], 'summary_final') == '1' then return 0 end
if ARGV[2] ~= '1' then
  local function parts(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return tonumber(ms or '0'), tonumber(seq or '0')
  end
  local ms, seq = parts(ARGV[3])
  local last_ms, last_seq = parts(redis.call('HGET', KEYS[2], 'summary_upto') or '0-0')
  if ms < last_ms or (ms == last_ms and seq <= last_seq) then return 0 end
end
{lua_xadd("KEYS[3]", "ARGV[5]", 6)}
redis.call('HSET', KEYS[2], 'summary', ARGV[4], 'summary_upto', ARGV[3])
if ARGV[2] == '1' then redis.call('HSET', KEYS[2], 'summary_final', '1') end
redis.call('HINCRBY', KEYS[2], 'summaries', 1)
return 1
"""

# KEYS: lease, job, results, dead-letters. ARGV: token, status, now, error, ttl s (0: keep),
# channel, id.
FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[2], 'status') ~= 'running' then return -2 end
redis.call('HSET', KEYS[2], 'status', ARGV[2], 'finished_at', ARGV[3], 'error', ARGV[4])
if ARGV[5] ~= '0' then
  for i = 2, 4 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
end
redis.call('DEL', KEYS[1])
redis.pcall('PUBLISH', ARGV[6], 'done:' .. ARGV[7])
return 1
"""

# KEYS: job, results, dead-letters. ARGV: now, ttl s (0: keep), channel, id, why.
# The status before.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status ~= 'pending' and status ~= 'running' then return status end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'error', ARGV[5])
if ARGV[2] ~= '0' then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
end
redis.pcall('PUBLISH', ARGV[3], 'cancel:' .. ARGV[4])
return status
"""


# KEYS: job. ARGV: field, value, … The job's hash, written whole, unless it is there already
# (an Idempotency-Key's retry and the first try may both write one job): 1 if written here.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class KeyReused(SightstreamError):
    """An Idempotency-Key sent again with another request."""


CLAIM_WAIT_S = 2.0  # how long a retry waits for the job of the request that claimed its key


def new_id() -> str:
    """Sortable by creation time (milliseconds, hex), then random."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"


@dataclass
class JobSpec:
    """What a job was asked to do."""

    source: str
    model: str
    fps: float = 1.0
    prompt: str = ""
    max_frames: int | None = None
    max_seconds: float | None = None
    created_by: str = ""
    # A pipeline's video input (not a job a user submitted): results go to the pipeline's
    # output stream for the source, the prompt follows the pipeline's, and it never expires.
    pipeline: str = ""
    output: str = ""
    deadletter: str = ""  # a video input's dead-letter stream ("" in a hash written before it was kept)
    # {"model": text model, "prompt": instruction, "every_s": period or None}: write summaries
    summarize: dict[str, Any] | None = None

    @property
    def shown(self) -> str:
        """The source as results, stream names, logs and the API show it: without its user and
        password, which are for opening it alone."""
        return keys.public_url(self.source)


@dataclass
class Job:
    id: str
    spec: JobSpec
    status: str
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: str = ""
    attempt: int = 0
    holder: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    progress: dict[str, float | str | None] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    last_seq: int = 0
    last_position: str = ""  # a video's last published pts (s), or a stream's last entry ID
    origin: str = ""  # a live video's first pts (s), so a resumed read keeps its timeline
    summary: dict[str, Any] | None = None  # the latest summary written (jobs/summaries.py)
    summary_upto: str = ""  # the results' entry ID the latest summary covers up to
    summary_final: bool = False  # the final summary is written
    waiting: str = ""  # pending: why a daemon that saw it left it (it cannot run it there)

    @property
    def results_stream(self) -> str:
        return self.spec.output or keys.job_results(self.id)

    @property
    def deadletter_stream(self) -> str:
        spec = self.spec
        if spec.pipeline:
            return spec.deadletter or keys.deadletter_stream(spec.pipeline, spec.shown)
        return keys.job_deadletter(self.id)

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[Any, Any]) -> Job:
        h = {k.decode(): v.decode() for k, v in raw.items()}
        spec = JobSpec(h["source"], h["model"], float(h.get("fps") or 0), h.get("prompt", ""),
                       int(h["max_frames"]) if h.get("max_frames") else None,
                       float(h["max_seconds"]) if h.get("max_seconds") else None, h.get("created_by", ""),
                       h.get("pipeline", ""), h.get("output", ""), h.get("deadletter", ""),
                       json.loads(h["summarize"]) if h.get("summarize") else None)
        return cls(
            job_id, spec, h["status"], h["created_at"], h.get("started_at") or None,
            h.get("finished_at") or None, h.get("error", ""), int(h.get("attempt") or 0),
            h.get("holder", ""), json.loads(h.get("counts") or "{}") | _counters(h),
            json.loads(h.get("progress") or "{}"), json.loads(h.get("timings") or "{}"),
            int(h.get("last_seq") or 0), h.get("last_position", ""), h.get("origin", ""),
            json.loads(h["summary"]) if h.get("summary") else None, h.get("summary_upto", ""),
            h.get("summary_final") == "1", h.get("waiting", ""),
        )


def _counters(h: dict[str, str]) -> dict[str, int]:
    """Counts the fenced publish script increments itself."""
    return {name: int(h.get(name) or 0) for name in ("processed", "dead_lettered", "summaries")}


def _claimed(value: bytes | str, digest: str) -> str:
    """The job id a submission key holds for a request of this `digest`. Raises KeyReused when
    the key came with another request."""
    text = value.decode() if isinstance(value, bytes) else str(value)
    job_id, _, claimed_digest = text.partition(" ")
    if claimed_digest != digest:
        raise KeyReused("was sent with another request (another body, or another token): use a "
                        "new key per job")
    return job_id


def _flat(fields: dict[str, Any]) -> list[Any]:
    """A hash's or an entry's fields as a script takes them: field, value, field, value, ..."""
    return [item for kv in fields.items() for item in kv]


class JobStore:
    def __init__(self, client: Redis, ttl_s: float) -> None:
        self._client = client
        self.ttl_s = max(1, round(ttl_s))  # whole seconds for EXPIRE; 0 would delete at once
        self._create = Script(client, CREATE)
        self._start = Script(client, START)
        self.publish_script = Lua(PUBLISH)  # sent in pipelined rounds (run_pipelined)
        self._progress = Script(client, PROGRESS)
        self._finish = Script(client, FINISH)
        self._cancel = Script(client, CANCEL)
        self._summary = Script(client, SUMMARY)
        self._note_waiting = Script(client, NOTE_WAITING)
        self._let_go = Script(client, LET_GO)
        self._free_own = Script(client, FREE_OWN)
        self._orphaned = Script(client, ORPHANED)

    async def create(self, spec: JobSpec) -> Job:
        job, _ = await self._write(spec, new_id())
        return job

    async def _write(self, spec: JobSpec, job_id: str) -> tuple[Job, bool]:
        """The job `job_id`: written now (True), or as another request already wrote it."""
        created = now_iso()
        fields: dict[Any, Any] = {
            "source": spec.source, "model": spec.model, "fps": spec.fps, "prompt": spec.prompt,
            "max_frames": spec.max_frames or "", "max_seconds": spec.max_seconds or "",
            "created_by": spec.created_by, "status": "pending", "created_at": created, "attempt": 0,
            "summarize": json.dumps(spec.summarize) if spec.summarize else "",
        }
        if not await self._create(keys=[keys.job(job_id)], args=_flat(fields)):
            job = await self.get(job_id)
            if job is not None:
                return job, False
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.JOBS_INDEX, {job_id: 0})
            pipe.sadd(keys.JOBS_ACTIVE, job_id)
            await pipe.execute()
        # Not in the pipeline: a cluster pipeline refuses PUBLISH (it goes to no key's node).
        try:
            await self._client.publish(keys.JOBS_CHANNEL, f"new:{job_id}")
        except ResponseError as e:
            # a Redis user without the channel: the job is made, and daemons find it by their
            # poll (a 503 here had clients submit it twice)
            if not refused_for_good(e):
                raise
        return Job(job_id, spec, "pending", created), True

    async def replayed(self, key: str, digest: str) -> Job | None:
        """The job an earlier try of this request (its Idempotency-Key `key`, its `digest`)
        made, if it is there. Raises KeyReused when the key came with another request."""
        held = await self._client.get(keys.job_submission(key))
        return None if held is None else await self.get(_claimed(held, digest))

    async def create_once(self, spec: JobSpec, key: str, digest: str) -> tuple[Job, bool]:
        """The job submitted under a client's Idempotency-Key `key`: made now (True), or the one
        an earlier try of the same request made (False), so a client may retry a submission
        whose answer it lost. The first try claims the key with the job's id; a retry waits
        for that job, and past CLAIM_WAIT_S writes it itself, under the same id (the first try
        died, or is slow: either way one job). Raises KeyReused (see replayed)."""
        name = keys.job_submission(key)
        while True:
            job_id = new_id()
            if await self._client.set(name, f"{job_id} {digest}", nx=True, ex=self.ttl_s):
                return await self._write(spec, job_id)
            if (held := await self._client.get(name)) is not None:
                break  # else it expired just now: claim it
        earlier = _claimed(held, digest)
        waited = 0.0
        while waited < CLAIM_WAIT_S:
            if (job := await self.get(earlier)) is not None:
                return job, False
            await asyncio.sleep(0.05)
            waited += 0.05
        return await self._write(spec, earlier)

    async def ensure(self, spec: JobSpec) -> str:
        """A pipeline's video input as a job, created once (its id comes from the pipeline and
        the URL, so every daemon of the group names the same job); its spec follows the config."""
        job_id = keys.input_job_id(spec.pipeline, spec.source)
        key = keys.job(job_id)
        created = await self._client.hsetnx(key, "created_at", now_iso())
        fields: dict[Any, Any] = {
            "source": spec.source, "model": spec.model, "fps": spec.fps, "prompt": "",
            "max_frames": "", "max_seconds": "", "created_by": "config", "pipeline": spec.pipeline,
            "output": spec.output, "deadletter": spec.deadletter,
        }
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping=fields)
            if created:  # not in the jobs index: GET /pipelines/{name} lists them
                pipe.hset(key, mapping={"status": "pending", "attempt": 0})
            await pipe.execute()
        status = await self._client.hget(key, "status")
        if status in (b"failed", b"cancelled"):  # the config may have been mended: try again
            await self._client.hset(key, mapping={"status": "pending", "error": "", "finished_at": ""})
            status = b"pending"
        if status in (b"pending", b"running"):
            await self._client.sadd(keys.JOBS_ACTIVE, job_id)
        return job_id

    async def get(self, job_id: str) -> Job | None:
        raw = await self._client.hgetall(keys.job(job_id))
        return Job.from_hash(job_id, raw) if raw else None

    async def get_many(self, job_ids: list[str]) -> list[Job | None]:
        async with self._client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(keys.job(job_id))
            rows = await pipe.execute()
        return [Job.from_hash(job_id, raw) if raw else None for job_id, raw in zip(job_ids, rows)]

    async def prune_index(self, page: int = 500, most_pages: int = 20) -> int:
        """Drop ids of expired jobs from the index, oldest first (job ids sort by time), until
        a page holds none (listing drops them too, but only those it pages through: a daemon
        nobody lists kept every id for ever). Returns how many it dropped."""
        dropped, start = 0, "-"
        for _ in range(most_pages):
            members: Any = await self._client.zrangebylex(keys.JOBS_INDEX, start, "+", start=0, num=page)
            ids = [i.decode() for i in members]
            if not ids:
                break
            async with self._client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.exists(keys.job(job_id))
                alive = await pipe.execute()
            gone = await self._forget_gone(ids, alive)
            dropped += gone
            if gone < len(ids) or len(ids) < page:
                break  # reached jobs that are still kept (or the end)
            start = f"({ids[-1]}"
        return dropped

    async def _forget_gone(self, ids: list[str], found: list[Any]) -> int:
        """Drop from the index the ids whose job is gone (`found` empty for it); how many."""
        gone = [job_id for job_id, there in zip(ids, found) if not there]
        if gone:
            await self._client.zrem(keys.JOBS_INDEX, *gone)
        return len(gone)

    async def page(self, status: str | None, limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
        """Newest first. Returns the page and the cursor of the next one (None: no more).
        Jobs whose keys expired are dropped from the index on the way."""
        found: list[Job] = []
        start = f"({cursor}" if cursor else "+"
        while len(found) < limit:
            members: Any = await self._client.zrevrangebylex(keys.JOBS_INDEX, start, "-", start=0,
                                                             num=max(limit, 50))
            ids = [i.decode() for i in members]
            if not ids:
                return found, None
            async with self._client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(keys.job(job_id))
                rows = await pipe.execute()
            await self._forget_gone(ids, rows)
            for job_id, raw in zip(ids, rows):
                if raw and (status is None or raw.get(b"status", b"").decode() == status):
                    found.append(Job.from_hash(job_id, raw))
                    if len(found) == limit:
                        return found, job_id
            start = f"({ids[-1]}"
        return found, None

    async def cancel(self, job_id: str) -> str:
        """The status the job had: '' when there is no such job; a finished status when it
        was already over (nothing changed); pending or running when it is now cancelled."""
        return await self._end(job_id, keys.job_results(job_id), keys.job_deadletter(job_id), self.ttl_s,
                               "cancelled by a DELETE request")

    async def retire(self, job_id: str, why: str) -> str:
        """Cancel a pipeline's video input the config no longer lists (its results stay)."""
        job = await self.get(job_id)
        if job is None:
            return ""
        return await self._end(job_id, job.results_stream, job.deadletter_stream, 0, why)

    async def _end(self, job_id: str, results: str, deadletters: str, ttl_s: int, why: str) -> str:
        before = await self._cancel(keys=[keys.job(job_id), results, deadletters],
                                    args=[now_iso(), ttl_s, keys.JOBS_CHANNEL, job_id, why])
        if before in (b"pending", b"running"):
            await self._client.srem(keys.JOBS_ACTIVE, job_id)
        return before.decode() if isinstance(before, bytes) else str(before)

    # Fenced writes of the job's holder (the lease's token).

    async def note_waiting(self, job_id: str, token: str, consumer: str, why: str) -> set[str]:
        """Say on a job whose lease is `token`'s that `consumer` cannot run it, and why (the
        daemon that starts it clears it); a `running` job left by a daemon gone is `pending`
        again. Returns every daemon that said so (none if the job has ended)."""
        refused = await self._note_waiting(keys=[keys.job_lease(job_id), keys.job(job_id)],
                                           args=[token, consumer, why])
        return {r.decode() if isinstance(r, bytes) else str(r) for r in refused}

    async def let_go(self, job_id: str, token: str) -> None:
        """The holder (`token`) gives the job up: see LET_GO."""
        await self._let_go(keys=[keys.job_lease(job_id), keys.job(job_id)], args=[token])

    async def free_own(self, job_id: str, consumer: str) -> bool:
        """A job `consumer`'s previous process ran: its lease freed (see FREE_OWN)."""
        return await self._free_own(keys=[keys.job_lease(job_id), keys.job(job_id)], args=[consumer]) == 1

    async def mark_orphaned(self, job_id: str) -> bool:
        """A `running` job whose lease lapsed is `pending` again (see ORPHANED)."""
        return await self._orphaned(keys=[keys.job_lease(job_id), keys.job(job_id)]) == 1

    async def start(self, job_id: str, token: str, holder: str) -> tuple[bool, str]:
        ok, status = await self._start(keys=[keys.job_lease(job_id), keys.job(job_id)],
                                       args=[token, holder, now_iso()])
        return ok == 1, status.decode() if isinstance(status, bytes) else str(status)

    def queue_publish(self, pipe: Any, job_id: str, token: str, seq: int, position: str, stream: str,
                      maxlen: int, counter: str, fields: dict[str, Any]) -> None:
        """Queue one fenced result (or dead-letter entry) on a pipeline (see PUBLISH)."""
        self.publish_script.queue(pipe, [keys.job_lease(job_id), keys.job(job_id), stream],
                                  [token, seq, position, maxlen, counter, *_flat(fields)])

    async def progress(self, job_id: str, token: str, fields: dict[str, Any], last: bool = False) -> int:
        """Write progress fields while the job runs and its lease is `token`'s; `last`: the run's
        final counts, also written once the job was cancelled (as a cancel stops it mid-way)."""
        return int(await self._progress(keys=[keys.job_lease(job_id), keys.job(job_id)],
                                        args=[token, "1" if last else "0", *_flat(fields)]))

    async def finish(self, job: Job, token: str, status: str, error: str = "") -> bool:
        """End the job. A user's job expires `ttl_s` later with its results; a pipeline's
        video input stays (a VOD is not read again when daemons restart)."""
        done = await self._finish(
            keys=[keys.job_lease(job.id), keys.job(job.id), job.results_stream, job.deadletter_stream],
            args=[token, status, now_iso(), error, 0 if job.spec.pipeline else self.ttl_s,
                  keys.JOBS_CHANNEL, job.id])
        if done == 1:
            await self._client.srem(keys.JOBS_ACTIVE, job.id)
        return done == 1

    async def write_summary(self, job: Job, token: str, final: bool, upto: str, summary: dict[str, Any],
                            maxlen: int, fields: dict[str, Any]) -> int:
        """Write a summary to the job's results stream and hash in one fenced step (SUMMARY)."""
        return int(await self._summary(
            keys=[keys.job_lease(job.id), keys.job(job.id), job.results_stream],
            args=[token, "1" if final else "0", upto or "0-0", json.dumps(summary), maxlen, *_flat(fields)]))

    async def active(self) -> list[str]:
        members: Any = await self._client.smembers(keys.JOBS_ACTIVE)
        return sorted(i.decode() for i in members)

    async def forget(self, job_id: str) -> None:
        """Drop a job from the set still to run (its keys expired, or it finished elsewhere)."""
        await self._client.srem(keys.JOBS_ACTIVE, job_id)
