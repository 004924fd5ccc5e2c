"""Per-source leases (tracking) on fakeredis (with lupa for the Lua), daemons simulated round by
round: streams are shared by count and by load, reach a stable split, and each is held once."""

from __future__ import annotations

import math

import fakeredis
import pytest

from sightstream import keys
from sightstream.stages.source_leases import SourceLeases

STREAMS = [f"frames:{{cam{i}}}" for i in range(8)]
ACTIVE = set(STREAMS[:4])  # cameras that send frames; the others are quiet


def daemon(server, name: str) -> SourceLeases:
    return SourceLeases(fakeredis.FakeAsyncRedis(server=server), "tracks", name)


async def rounds(server, daemons: list[SourceLeases], n: int, loaded: bool = True) -> list[tuple[str, str]]:
    """n rounds of every daemon in turn; returns the lease moves seen (stream, new owner).
    `loaded`: an active stream always has frames in flight while it is read; else never."""
    client = fakeredis.FakeAsyncRedis(server=server)
    moves = []
    before = await owners(client)
    for _ in range(n):
        for d in daemons:
            # A stream is busy while it is read (its frames in flight); one being handed over
            # is no longer read, so it drains.
            await d.settle(STREAMS, busy=lambda s, d=d: loaded and s in ACTIVE and s in d.held,
                           active=lambda s: s in ACTIVE)
        now = await owners(client)
        moves += [(s, now[s]) for s in STREAMS if now[s] != before[s]]
        before = now
    return moves


async def owners(client) -> dict[str, str | None]:
    values = [await client.get(keys.source_lease("tracks", s)) for s in STREAMS]
    return {s: v.decode() if v else None for s, v in zip(STREAMS, values)}


def check_split(daemons: list[SourceLeases]) -> None:
    held = [s for d in daemons for s in d.held]
    assert sorted(held) == sorted(STREAMS)  # each stream read by exactly one daemon
    share = math.ceil(len(STREAMS) / len(daemons))
    assert all(len(d.held) <= share for d in daemons)
    active = [len(ACTIVE & set(d.held)) for d in daemons]
    assert max(active) - min(active) <= 1, active


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "light"])
async def test_daemons_that_join_get_busy_streams_too_and_the_split_then_holds(loaded):
    server = fakeredis.FakeServer()
    first = daemon(server, "one:0")
    await rounds(server, [first], 3, loaded)
    assert sorted(first.held) == sorted(STREAMS)
    everyone = [first, daemon(server, "two:0"), daemon(server, "three:0")]
    await rounds(server, everyone, 30, loaded)
    check_split(everyone)
    assert await rounds(server, everyone, 30, loaded) == []  # stable: no stream moves back and forth
    c = fakeredis.FakeAsyncRedis(server=server)
    assert await owners(c) == {s: d._consumer for d in everyone for s in d.held}


async def test_a_daemon_that_leaves_gives_its_streams_to_the_others():
    server = fakeredis.FakeServer()
    everyone = [daemon(server, "one:0"), daemon(server, "two:0")]
    await rounds(server, everyone, 20)
    check_split(everyone)
    await everyone[1].release_all()
    await rounds(server, everyone[:1], 3)
    assert sorted(everyone[0].held) == sorted(STREAMS)


async def test_a_stream_handed_over_is_not_read_until_drained_and_then_belongs_to_the_other():
    server = fakeredis.FakeServer()
    one, two = daemon(server, "one:0"), daemon(server, "two:0")
    await rounds(server, [one], 2)
    draining = {"yes": True}
    await one.settle(STREAMS, busy=lambda s: draining["yes"], active=lambda s: s in ACTIVE)  # two not yet a member
    await two.settle(STREAMS, busy=lambda s: False, active=lambda s: False)  # joins: everything leased
    await one.settle(STREAMS, busy=lambda s: draining["yes"], active=lambda s: s in ACTIVE)
    assert one.handing is not None
    stream, to = one.handing
    assert to == "two:0" and stream not in one.held  # no longer read here
    c = fakeredis.FakeAsyncRedis(server=server)
    for _ in range(2):  # its frames still in flight: still ours, not handed yet
        await one.settle(STREAMS, busy=lambda s: draining["yes"], active=lambda s: s in ACTIVE)
        assert (await owners(c))[stream] == "one:0"
    draining["yes"] = False
    await one.settle(STREAMS, busy=lambda s: draining["yes"], active=lambda s: s in ACTIVE)
    assert (await owners(c))[stream] == "two:0" and one.handing is None
    assert stream in await two.settle(STREAMS, busy=lambda s: False, active=lambda s: False)


async def test_nothing_is_handed_to_a_daemon_that_stopped_speaking():
    """A daemon killed a moment ago is still listed until its key expires: a stream handed to
    it would go unread until its lease lapsed."""
    server = fakeredis.FakeServer()
    one = daemon(server, "one:0")
    await rounds(server, [one], 2)
    c = fakeredis.FakeAsyncRedis(server=server)
    await c.set(keys.source_member("tracks", "gone:0"), 0, px=one.ttl_ms // 2 - 100)  # its last word, a while ago
    for _ in range(5):
        await one.settle(STREAMS, busy=lambda s: False, active=lambda s: s in ACTIVE)
    assert one.handing is None and len(one.held) == 4  # its count share with two daemons, all busy ones kept
    assert ACTIVE <= set(one.held)
