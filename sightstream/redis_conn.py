"""Redis clients as this project wants them everywhere: a blocking pool, bounded retries with jittered
back-off, hiredis (picked up by redis-py when installed), and a separate client for blocking
reads whose socket timeout stays above BLOCK."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TimeoutError,
    TryAgainError,
)

from sightstream import keys, log

_log = log.get(__name__)

BLOCK_MS = 1000  # XREADGROUP BLOCK: short, so a stop or a new stream is noticed quickly
# What a Redis going away (a restart, a failover, still loading its data) raises, as against a
# refused command: the command-line producer and consumer wait these out once Redis has answered.
OUTAGES = (ConnectionError, TimeoutError, ClusterDownError, TryAgainError, RedisClusterException)


def safe_url(url: str) -> str:
    """The Redis URL with its password masked, written before the host or in the query (the
    query's secret values as keys.mask_query_secrets finds them), for logs, errors and /health.
    Nothing else of it changes; its user stays. Video URLs are shown by keys.public_url."""
    scheme, sep, rest = url.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        userinfo, at, host = authority.rpartition("@")
        if at and ":" in userinfo:
            authority = f"{userinfo.split(':', 1)[0]}:***@{host}"
        url = f"{scheme}{sep}{authority}{slash}{path}"
    return keys.mask_query_secrets(url)


def make_client(
    url: str, *, blocking_reads: bool = False, max_connections: int = 32, cluster: bool = False
) -> Redis:
    """A client that returns bytes (frames are binary). For blocking reads, the socket timeout
    sits above BLOCK, else redis-py would time out and retry a healthy BLOCK call.

    `cluster`: a Redis Cluster client (any node's URL; it finds the others). It has no
    blocking pool: connections per node are capped higher instead, since running out raises
    at once rather than waiting."""
    socket_timeout = BLOCK_MS / 1000 + 5 if blocking_reads else 5
    if cluster:
        client: Any = _cluster_class().from_url(
            url, max_connections=4 * max_connections, socket_timeout=socket_timeout,
            socket_connect_timeout=2, health_check_interval=30, decode_responses=False,
            retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=3),
        )
        return client  # the same commands as Redis for everything sightstream sends
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2,
        health_check_interval=30,
        decode_responses=False,
    )
    retry = Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=3,
                  supported_errors=(ConnectionError, TimeoutError))
    return Redis(connection_pool=pool, retry=retry)


def _outage(error: BaseException) -> ConnectionError | None:
    """The cluster client's ways of saying a node or the cluster cannot be reached now, as the
    ConnectionError a plain client raises; None for anything else (a bug, a refused command).
    - RedisClusterException "cannot be connected" / slots not covered: no node answers well;
    - AttributeError or TypeError raised inside redis-py's connection or asyncio's transports:
      a connection torn down under a call (redis-py issues 4287, 3546), not a bug of ours."""
    if isinstance(error, SlotNotCoveredError) or (
            isinstance(error, RedisClusterException) and "cannot be connected" in str(error)
            and "Cluster mode is not enabled" not in str(error)):  # that one is a setting's error
        return ConnectionError(str(error))
    if isinstance(error, (AttributeError, TypeError)):
        tb, last = error.__traceback__, None
        while tb is not None:
            last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
        if last is not None and last.endswith(_TRANSPORT_FILES):
            return ConnectionError(f"the connection broke during the call ({error})")
    return None


# Where a torn-down connection's AttributeError or TypeError is raised: redis-py's connection
# and asyncio's transports. Raised anywhere else (parsing a reply, our code), it is a bug.
_TRANSPORT_FILES = ("/redis/asyncio/connection.py", "/asyncio/streams.py", "/asyncio/selector_events.py",
                    "/asyncio/sslproto.py", "/asyncio/transports.py")


class PartialOutage(ConnectionError):
    """A cluster pipeline some of whose nodes could not run their commands: raised as the
    ConnectionError a plain client raises, with every reply (`replies`), since what the other
    nodes did is done (an XREADGROUP's entries are pending with this consumer now)."""

    def __init__(self, error: BaseException, replies: list[Any]) -> None:
        super().__init__(str(error))
        self.replies = replies


def _unavailable(reply: Any) -> bool:
    """A pipeline reply that says the cluster could not run the command now (a plain client
    raises these), unlike a command Redis refused (WRONGTYPE, OOM: left in its place)."""
    return isinstance(reply, RedisError) and (not isinstance(reply, ResponseError)
                                              or isinstance(reply, (ClusterDownError, TryAgainError)))


async def _plainly(call: Awaitable[Any]) -> Any:
    """`await call`, an outage raised as the plain client's ConnectionError (see _outage)."""
    try:
        return await call
    except Exception as e:
        if (outage := _outage(e)) is not None:
            raise outage from e
        raise


@functools.cache
def _cluster_class() -> Any:
    """A Redis Cluster client that fails as the plain one does, so that every loop's handling
    of an unreachable Redis (retries, back-off) holds on a cluster too (see _outage): a
    pipeline executed with raise_on_error=False raises a node's connection error or
    CLUSTERDOWN, rather than leaving it among the replies, where refused commands belong."""
    from redis.asyncio.cluster import ClusterPipeline, RedisCluster

    class Pipeline(ClusterPipeline):
        async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
            replies = await _plainly(super().execute(raise_on_error, allow_redirections))
            if (down := next((r for r in replies if _unavailable(r)), None)) is not None:
                raise PartialOutage(down, replies)
            return replies

    class Cluster(RedisCluster):
        async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            return await _plainly(super().execute_command(*args, **kwargs))

        def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
            if shard_hint:
                raise RedisClusterException("shard_hint is deprecated in cluster mode")
            return Pipeline(self, transaction)  # type: ignore[abstract]

    return Cluster


def sync_client(url: str, *, cluster: bool = False, **options: Any) -> Any:
    """A synchronous client for the CLI tools (publish, tail): plain, or for a Redis Cluster."""
    import redis

    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


async def why_unreachable(url: str) -> str | None:
    """None when Redis at `url` answers a PING, else why not (refused, timed out, wrong password)."""
    client = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        await client.ping()
        return None
    except (RedisError, OSError) as e:
        return str(e) or type(e).__name__
    finally:
        await client.aclose()


def lua_xadd(stream: str, maxlen: str, first: int) -> str:
    """A Lua statement: XADD the field/value pairs ARGV[first:] to `stream`, capped at
    MAXLEN ~ `maxlen` unless that is '0' (both are Lua expressions, e.g. KEYS[2], ARGV[3])."""
    return (f"if {maxlen} == '0' then\n  redis.call('XADD', {stream}, '*', unpack(ARGV, {first}))\n"
            f"else\n  redis.call('XADD', {stream}, 'MAXLEN', '~', {maxlen}, '*', unpack(ARGV, {first}))\nend")


def refused_for_good(error: BaseException) -> bool:
    """Redis refuses the command itself, whatever its keys: not allowed to this user (ACL:
    NOPERM) or not there (`rename-command … ""`). Trying again changes nothing."""
    if isinstance(error, NoPermissionError):
        return True
    return isinstance(error, ResponseError) and str(error).lower().startswith(("unknown command", "noperm"))


def out_of_memory(error: BaseException) -> bool:
    """Redis at `maxmemory` refusing a write (OOM): it passes once memory is freed. (redis-py
    takes the OOM code off a plain reply, not off a script's or a pipeline's.)"""
    return isinstance(error, OutOfMemoryError) or (
        isinstance(error, ResponseError) and "used memory > 'maxmemory'" in str(error))


class Lua:
    """A Lua script sent by its SHA in pipelines. redis-py's Script objects make every
    pipelined round ask SCRIPT EXISTS first, one more round trip each time; here the script is
    loaded only when Redis answers NOSCRIPT (a restarted Redis), and the caller retries.

    Where Redis refuses SCRIPT LOAD (renamed away, a common hardening, or not in the user's
    ACL while EVAL is), the script is sent whole with each call (EVAL) from then on."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.by_source = False

    def queue(self, pipe: Any, keys: list[Any], args: list[Any]) -> None:
        # execute_command: a cluster pipeline refuses `evalsha()` by name, not the command
        if self.by_source:
            pipe.execute_command("EVAL", self.source, len(keys), *keys, *args)
        else:
            pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self, client: Redis) -> None:
        if self.by_source:
            return
        try:
            await client.script_load(self.source)  # on a cluster: on every primary
        except ResponseError as e:
            if not refused_for_good(e):
                raise
            self.by_source = True
            _log.warning("redis_script_load_refused", error=str(e),
                         consequence="each call of this script sends it whole (EVAL)")


class Script(Lua):
    """A script called on its own, as redis-py's `register_script` makes one, falling back to
    EVAL as Lua does."""

    def __init__(self, client: Redis, source: str) -> None:
        super().__init__(source)
        self._client = client

    async def __call__(self, keys: list[Any] | tuple = (), args: list[Any] | tuple = ()) -> Any:
        if not self.by_source:
            try:
                return await self._client.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self.load(self._client)
        if self.by_source:
            return await self._client.eval(self.source, len(keys), *keys, *args)
        return await self._client.evalsha(self.sha, len(keys), *keys, *args)


async def close_client(client: Any) -> None:
    """Close a client made by make_client and its connections (its pool was passed in
    explicitly, so redis-py would leave it open; a cluster client owns its connections)."""
    if hasattr(client, "nodes_manager"):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)


def same_slot(*keys: str) -> bool:
    """Whether the keys hash to one Redis Cluster slot (a script may then touch them all)."""
    from redis.crc import key_slot

    return len({key_slot(k.encode()) for k in keys}) == 1


async def run_pipelined(
    client: Redis, fill: Callable[[Any], None], *scripts: Lua, raise_on_error: bool = True
) -> list:
    """Fill a non-transactional pipeline and execute it, loading the scripts once if Redis lost
    them. The commands must be safe to send twice (ours are: pending-gated, or marker-gated).

    With `raise_on_error=False`, a command that Redis refused (WRONGTYPE, OOM) leaves its
    ResponseError in its place in the replies instead of failing the whole round; connection
    errors still raise."""
    for attempt in (1, 2):
        async with client.pipeline(transaction=False) as pipe:
            fill(pipe)
            try:
                replies = await pipe.execute(raise_on_error=raise_on_error)
            except NoScriptError:
                if attempt == 2:
                    raise
            else:
                if not any(isinstance(r, NoScriptError) for r in replies):
                    return replies
                if attempt == 2:
                    raise next(r for r in replies if isinstance(r, NoScriptError))
        for script in scripts:
            await script.load(client)
    raise AssertionError("unreachable")
