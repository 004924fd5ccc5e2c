"""Versioned prompts, shared by every daemon through Redis.

A pipeline's prompt starts as the configured `prompt`, version 1, written to Redis by the first
daemon that starts. A daemon that starts with another configured prompt than the one last
applied (the config was edited) makes it a new version, `set_by` "config", unless that text
was applied from a config before (a daemon restarted on the old config during a rolling change
would undo it); while the config's prompt stays the same, changes made over HTTP outlive
restarts. (Each daemon used its own
config's text as version 1 until the first change: two configs, two texts under one version.)

Each change (a new text, or a rollback to an earlier version's text) is a new version, written
with its history entry by one Lua script, which also refuses a change based on a stale version
(If-Match) and publishes a notice on `sightstream:prompts`. Every daemon keeps the current
prompts in a `PromptBook`: updated from those notices within milliseconds, re-read in full
after its subscription reconnects, and polled every few seconds in case a notice was lost. A
batch takes its prompt (text and version) from the book when it closes, and results record
that version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from sightstream import keys, log
from sightstream.errors import SightstreamError
from sightstream.redis_conn import Script

_log = log.get(__name__)


def _seed(configured: str) -> str:
    """Lua writing version 1, the configured text (`configured`: the Lua expression for it),
    where the pipeline has no prompt in Redis yet; `current` is its version after."""
    return f"""
local current = tonumber(redis.call('HGET', KEYS[1], 'version'))
local seeded = not current
if seeded then
  current = 1
  redis.call('RPUSH', KEYS[2], cjson.encode({{version = 1, text = {configured}, set_by = 'config'}}))
  redis.call('HSET', KEYS[1], 'version', 1, 'text', {configured}, 'updated_at', '', 'set_by', 'config',
             'configured', {configured})
end
"""


# KEYS: current hash, history list. ARGV: mode (set | rollback), text or version, expected
# version ('' for any), updated_at, set_by, configured text, channel, pipeline.
# Returns {status, version, record}: ok (the new version and its JSON record), or same (a set
# of the current text: no new version, as PUT is idempotent), conflict, unknown or lost (a
# version whose text went with Redis's data), with the current version.
CHANGE = _seed("ARGV[6]") + """
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= current then
  return {'conflict', current, ''}
end
if ARGV[1] == 'set' and redis.call('HGET', KEYS[1], 'text') == ARGV[2] then
  local now = redis.call('HGETALL', KEYS[1])
  local same = {}
  for i = 1, #now, 2 do same[now[i]] = now[i + 1] end
  return {'same', current, cjson.encode(same)}
end
local text = ARGV[2]
local record = {}
if ARGV[1] == 'rollback' then
  local old = redis.call('LINDEX', KEYS[2], tonumber(ARGV[2]) - 1)
  if not old then
    return {'unknown', current, ''}
  end
  if cjson.decode(old).lost then
    return {'lost', current, ''}
  end
  text = cjson.decode(old).text
  record.rolled_back_from = tonumber(ARGV[2])
end
local version = current + 1
record.version = version
record.text = text
record.updated_at = ARGV[4]
record.set_by = ARGV[5]
local encoded = cjson.encode(record)
redis.call('RPUSH', KEYS[2], encoded)
redis.call('HSET', KEYS[1], 'version', version, 'text', text, 'updated_at', ARGV[4],
           'set_by', ARGV[5], 'rolled_back_from', record.rolled_back_from or '')
redis.pcall('PUBLISH', ARGV[7], ARGV[8])
return {'ok', version, encoded}
"""

# KEYS: current hash, history list. ARGV: the configured text, updated_at, channel, pipeline.
# `configured` in the hash: the config's text as last applied. A hash written before the field
# existed takes this config's as applied, changing nothing: that version ignored config edits
# once the prompt had been changed, so its current prompt may be one set over HTTP since, newer
# than the config's. Neither does a config whose text is the current one make a version.
# A config text applied before (`config_seen:<sha1>` fields) is not applied again: during a
# rolling change, a daemon restarted on the old config (for any reason) made the old text the
# newest version for the whole group, undoing the change. {older, version}: such a text.
# Returns {seeded | same | changed | older, the current version}.
APPLY_CONFIG = _seed("ARGV[1]") + """
local seen = 'config_seen:' .. redis.sha1hex(ARGV[1])
if seeded then
  redis.call('HSET', KEYS[1], seen, '1')
  return {'seeded', 1}
end
local configured = redis.call('HGET', KEYS[1], 'configured')
if not configured or configured == ARGV[1] or redis.call('HGET', KEYS[1], 'text') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'configured', ARGV[1], seen, '1')
  return {'same', current}
end
if redis.call('HEXISTS', KEYS[1], seen) == 1 then
  return {'older', current}
end
local version = current + 1
redis.call('RPUSH', KEYS[2], cjson.encode({version = version, text = ARGV[1], updated_at = ARGV[2],
                                           set_by = 'config'}))
redis.call('HSET', KEYS[1], 'version', version, 'text', ARGV[1], 'updated_at', ARGV[2], 'set_by', 'config',
           'rolled_back_from', '', 'configured', ARGV[1], seen, '1')
redis.pcall('PUBLISH', ARGV[3], ARGV[4])
return {'changed', version}
"""


# KEYS: current hash, history list. ARGV: version, text, updated_at, configured text, channel,
# pipeline. A daemon's own copy of a prompt, written back where Redis lost it (a restart
# without persistence): the version number goes on from where it was, so a (pipeline, version)
# pair still names one text. The versions before it are in the history as lost (no text).
# A prompt already there is kept, unless it is older than this copy and was itself only
# restored, or only seeded from a config since (then this, the newer, wins: daemons that
# missed the last change, or started after the loss, do not take the version back).
# Returns {restored | kept, the current version}.
RESTORE = """
local version = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'version'))
if current then
  local set_by = redis.call('HGET', KEYS[1], 'set_by')
  local seeded = current == 1 and set_by == 'config' and redis.call('HGET', KEYS[1], 'updated_at') == ''
  if current >= version or not (set_by == 'restored' or seeded) then
    return {'kept', current}
  end
end
redis.call('DEL', KEYS[2])
local lost = {}
for v = 1, version - 1 do
  lost[#lost + 1] = cjson.encode({version = v, text = '', lost = true})
  if #lost == 1000 then  -- RPUSH many at a time: a long history is restored in a moment
    redis.call('RPUSH', KEYS[2], unpack(lost))
    lost = {}
  end
end
if #lost > 0 then
  redis.call('RPUSH', KEYS[2], unpack(lost))
end
redis.call('RPUSH', KEYS[2], cjson.encode({version = version, text = ARGV[2], updated_at = ARGV[3],
                                           set_by = 'restored'}))
redis.call('HSET', KEYS[1], 'version', version, 'text', ARGV[2], 'updated_at', ARGV[3],
           'set_by', 'restored', 'configured', ARGV[4], 'rolled_back_from', '')
redis.pcall('PUBLISH', ARGV[5], ARGV[6])
return {'restored', version}
"""


@dataclass(frozen=True, slots=True)
class Prompt:
    """What a model is told, and which version of the pipeline's prompt that is."""

    text: str
    version: int


@dataclass(frozen=True, slots=True)
class PromptVersion:
    text: str
    version: int
    updated_at: str | None = None  # ISO 8601, UTC; None: the configured prompt, never changed
    set_by: str = ""  # the token's name, "config" for version 1, "" when no name is known
    rolled_back_from: int | None = None
    lost: bool = False  # its text went with Redis's data (RESTORE)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> PromptVersion:
        return cls(str(data.get("text", "")), int(data["version"]), data.get("updated_at") or None,
                   str(data.get("set_by", "")), data.get("rolled_back_from") or None, bool(data.get("lost")))


class VersionConflict(SightstreamError):
    def __init__(self, current: int) -> None:
        super().__init__(f"the prompt is at version {current}: someone else changed it")
        self.current = current


class UnknownVersion(SightstreamError):
    def __init__(self, version: int, current: int, lost: bool = False) -> None:
        super().__init__(f"version {version}'s text was lost with Redis's data (a restart without "
                         "persistence)" if lost else f"there is no version {version}; versions run from 1 "
                         f"to {current}")
        self.current = current


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PromptStore:
    """Reads and changes the prompts in Redis. `configured`: each pipeline's version 1."""

    def __init__(self, client: Redis, configured: dict[str, str]) -> None:
        self._client = client
        self.configured = configured
        self._change = Script(client, CHANGE)
        self._apply = Script(client, APPLY_CONFIG)
        self._restore = Script(client, RESTORE)

    async def apply_config(self, pipelines: list[str]) -> None:
        """Write each pipeline's configured prompt as version 1 if it has none yet, or as a new
        version if the config's prompt changed since it was last applied."""
        for name in pipelines:
            text = self.configured.get(name, "")
            status, version = await self._apply(
                keys=[keys.prompt_current(name), keys.prompt_history(name)],
                args=[text, _now(), keys.PROMPT_CHANNEL, name])
            if status == b"changed":
                _log.info("prompt_config_applied", pipeline=name, version=int(version),
                          why="the config's prompt differs from the one last applied")
            elif status == b"older":
                _log.warning("prompt_config_not_applied", pipeline=name, version=int(version),
                             why="this config's prompt was applied before, and another since (a daemon "
                             "on an older config?): the current version stays",
                             hint=f"to use it again: PUT /pipelines/{name}/prompt, or roll back to "
                             "its version")

    async def get(self, pipeline: str) -> PromptVersion:
        data = await self._client.hgetall(keys.prompt_current(pipeline))
        return self._current(pipeline, data)

    async def get_many(self, pipelines: list[str]) -> dict[str, PromptVersion | None]:
        """Each pipeline's current prompt; None where Redis has none (it lost its data)."""
        async with self._client.pipeline(transaction=False) as pipe:
            for name in pipelines:
                pipe.hgetall(keys.prompt_current(name))
            replies = await pipe.execute()
        return {name: self._current(name, data) if data else None for name, data in zip(pipelines, replies)}

    async def restore(self, pipeline: str, prompt: Prompt) -> PromptVersion:
        """Write `prompt` back where Redis has none; the prompt Redis holds after."""
        status, version = await self._restore(
            keys=[keys.prompt_current(pipeline), keys.prompt_history(pipeline)],
            args=[prompt.version, prompt.text, _now(), self.configured.get(pipeline, ""),
                  keys.PROMPT_CHANNEL, pipeline])
        if status == b"restored":
            _log.warning("prompt_restored", pipeline=pipeline, version=int(version),
                         why="Redis had lost it (a restart without persistence? a maxmemory-policy "
                             "that evicts keys?): written back from this daemon's copy, the versions "
                             "before it lost")
        return await self.get(pipeline)

    def _current(self, pipeline: str, data: dict[Any, Any]) -> PromptVersion:
        if not data:
            return PromptVersion(self.configured.get(pipeline, ""), 1, set_by="config")
        fields = {k.decode(): v.decode() for k, v in data.items()}
        return PromptVersion.from_record(fields)

    async def history(self, pipeline: str, limit: int | None = None,
                      before: int | None = None) -> tuple[list[PromptVersion], int | None]:
        """Versions newest first: at most `limit` of them, those under version `before` if
        given; and the `before` that gives the next older page (None: no older ones)."""
        key = keys.prompt_history(pipeline)
        total = await self._client.llen(key)
        if not total:
            return [await self.get(pipeline)], None
        end = min(total, before - 1) if before is not None else total  # version k is at index k - 1
        start = max(0, end - limit) if limit is not None else 0
        records = await self._client.lrange(key, start, end - 1) if end > 0 else []
        versions = [PromptVersion.from_record(json.loads(r)) for r in reversed(records)]
        return versions, (start + 1 if start else None)

    async def version(self, pipeline: str, version: int) -> PromptVersion | None:
        """One version, or None if there is no such version."""
        if version < 1:
            return None
        record = await self._client.lindex(keys.prompt_history(pipeline), version - 1)
        if record is None:
            current = await self.get(pipeline)  # never changed: version 1 is not written yet
            return current if current.version == version else None
        return PromptVersion.from_record(json.loads(record))

    async def set(self, pipeline: str, text: str, *, expected: int | None = None,
                  set_by: str = "") -> PromptVersion:
        """A new version with `text`. Raises VersionConflict when `expected` is not current."""
        return await self._run(pipeline, "set", text, expected, set_by)

    async def rollback(self, pipeline: str, version: int, *, expected: int | None = None,
                       set_by: str = "") -> PromptVersion:
        """A new version with the text `version` had (history stays append-only)."""
        return await self._run(pipeline, "rollback", str(version), expected, set_by)

    async def _run(self, pipeline: str, mode: str, value: str, expected: int | None,
                   set_by: str) -> PromptVersion:
        status, version, record = await self._change(
            keys=[keys.prompt_current(pipeline), keys.prompt_history(pipeline)],
            args=[mode, value, "" if expected is None else expected, _now(), set_by,
                  self.configured.get(pipeline, ""), keys.PROMPT_CHANNEL, pipeline],
        )
        if status == b"conflict":
            raise VersionConflict(int(version))
        if status in (b"unknown", b"lost"):
            raise UnknownVersion(int(value), int(version), lost=status == b"lost")
        # The version this call wrote (not a re-read: another change may already follow it).
        return PromptVersion.from_record(json.loads(record))


class PromptBook:
    """This daemon's copy of its pipelines' current prompts, for batches to read without a
    round trip. daemon/prompt_notices.py keeps it current."""

    def __init__(self, store: PromptStore, pipelines: list[str]) -> None:
        self._store = store
        self.pipelines = pipelines
        self._current = {name: Prompt(text, 1) for name, text in store.configured.items()}
        self.refreshes = 0
        self._applied = False  # this daemon's config prompts written (once: at its start, or
        # when Redis first answers; not at every reconnect, where a config that lost would win)

    async def catch_up(self) -> None:
        """The config's prompts applied (the first time Redis answers), then every prompt re-read."""
        if not self._applied:
            await self._store.apply_config(self.pipelines)
            self._applied = True
        await self.refresh()

    def current(self, pipeline: str) -> Prompt:
        return self._current.get(pipeline) or Prompt("", 1)

    async def refresh(self, pipelines: list[str] | None = None) -> None:
        found = await self._store.get_many(pipelines or self.pipelines)
        for name, p in found.items():
            known = self._current.get(name)
            seeded = p is not None and p.version == 1 and p.set_by == "config" and p.updated_at is None
            if p is None or (known is not None and p.version < known.version and (
                    p.set_by == "restored" or seeded)):
                # Redis lost it (or a copy older than ours, or a config's, came back first):
                # ours goes back, so its version keeps naming one text
                p = await self._store.restore(name, self.current(name))
            if known is not None and p.version < known.version:  # kept: set again since
                _log.warning("prompt_version_went_back", pipeline=name, version=p.version, was=known.version,
                             why="Redis lost the prompt and it was set again since (over HTTP, or by an "
                                 "edited config) before this daemon could write its copy back")
            if known != (new := Prompt(p.text, p.version)):
                _log.info("prompt_changed", pipeline=name, version=p.version)
                self._current[name] = new
        self.refreshes += 1
