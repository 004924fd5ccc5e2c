"""The cluster client fails as the plain one does: what redis-py's cluster client says of a
node it cannot reach becomes a ConnectionError, and a read that some nodes answered keeps
what they gave."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError, RedisClusterException

from sightstream.redis_conn import PartialOutage, _outage
from sightstream.stages.redis_ingest import RedisIngest


def raised_in(filename: str, error: BaseException) -> BaseException:
    """`error` as if raised by code in `filename`."""
    code = compile("raise error", filename, "exec")
    try:
        exec(code, {"error": error})
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("unreachable")


def test_what_an_unreachable_cluster_says_is_a_connection_error_and_nothing_else_is():
    down = RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node: "
                                 "Error 111 connecting to 127.0.0.1:7101")
    assert isinstance(_outage(down), ConnectionError)
    plain = RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node: "
                                  "Cluster mode is not enabled on this node")
    assert _outage(plain) is None  # a setting's error: said at start, not retried
    torn = raised_in("/venv/lib/python3.11/site-packages/redis/asyncio/connection.py",
                     AttributeError("'NoneType' object has no attribute 'writelines'"))
    assert isinstance(_outage(torn), ConnectionError)
    parsing = raised_in("/venv/lib/python3.11/site-packages/redis/_parsers/helpers.py", TypeError("bad reply"))
    assert _outage(parsing) is None  # a bug where replies are read: not retried for ever
    assert _outage(raised_in("/srv/sightstream/stages/publisher.py", AttributeError("x"))) is None


class _Pipe:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def __aenter__(self) -> _Pipe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def xreadgroup(self, *args: object, **kwargs: object) -> None:
        pass

    async def execute(self, raise_on_error: bool = True) -> list:
        raise self.error


async def test_a_read_some_nodes_answered_keeps_their_entries():
    """A node down mid-read: the entries the other nodes delivered are pending with this
    consumer already. Thrown away with the error, they waited reclaim_min_idle_ms (30 s),
    out of order, or were dropped as stale."""
    got = [(b"frames:{a}", [(b"1-0", {b"image": b"x"})])]
    outage = PartialOutage(ConnectionError("Error 111 connecting to 127.0.0.1:7103"), [got, ConnectionError()])
    admitted: list[tuple[str, list]] = []

    class Admission:
        async def admit(self, stream: str, entries: list) -> int:
            admitted.append((stream, entries))
            return len(entries)

    ingest = RedisIngest.__new__(RedisIngest)
    ingest._client = type("Client", (), {"pipeline": lambda self, transaction: _Pipe(outage)})()
    ingest._group, ingest._consumer_name, ingest._admission = "people", lambda: "host:0", Admission()
    with pytest.raises(PartialOutage):
        await ingest._read_by_slot(["frames:{a}", "frames:{b}"], 8)
    assert admitted == [("frames:{a}", [(b"1-0", {b"image": b"x"})])]
