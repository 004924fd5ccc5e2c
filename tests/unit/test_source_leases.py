"""Per-source leases (tracking) on fakeredis (with lupa for the Lua), daemons simulated round by
round: streams are shared by count and by load (frames per second), reach a stable split, and
each is held once."""

from __future__ import annotations

import math

import fakeredis
import pytest

from sightstream import keys
from sightstream.stages.source_leases import GAP_SHARE, Member, SourceLeases

STREAMS = [f"frames:{{cam{i}}}" for i in range(8)]
ACTIVE = set(STREAMS[:4])  # cameras that send frames; the others are quiet
RATE = 10.0  # frames per second of each active camera


def rate_of(stream: str) -> float:
    return RATE if stream in ACTIVE else 0.0


class Daemon:
    """A daemon's leases and what its reader would say of each stream: a stream it holds gives
    its frames per second (`rates`) once it has been read for a round; it is busy (frames in
    flight) while it is read and gives a frame a second or more, if `loaded`."""

    def __init__(self, server, name: str, loaded: bool = True, rates=rate_of, flicker: bool = False) -> None:
        self.leases = SourceLeases(fakeredis.FakeAsyncRedis(server=server), "tracks", name)
        self.loaded = loaded
        self.rates = rates
        # a model faster than the cameras: a busy stream has nothing in flight every other round
        self.flicker = flicker
        self.read_for: dict[str, int] = {}  # stream -> rounds it has been read here

    def fps(self, stream: str) -> float:
        return self.rates(stream) if self.read_for.get(stream, 0) >= 1 else 0.0

    def busy(self, stream: str) -> bool:
        if self.flicker and self.leases._rounds % 2:
            return False
        return self.loaded and self.fps(stream) >= 1 and stream in self.leases.held

    async def round(self, streams: list[str] = STREAMS) -> list[str]:
        taken = await self.leases.settle(streams, self.busy, self.fps)
        self.read_for = {s: self.read_for.get(s, 0) + 1 for s in self.leases.held}
        return taken


async def rounds(server, daemons: list[Daemon], n: int) -> list[tuple[str, str | None]]:
    """n rounds of every daemon in turn; returns the lease moves seen (stream, new owner)."""
    client = fakeredis.FakeAsyncRedis(server=server)
    moves = []
    before = await owners(client)
    for _ in range(n):
        for d in daemons:
            await d.round()
        now = await owners(client)
        moves += [(s, now[s]) for s in STREAMS if now[s] != before[s]]
        before = now
    return moves


async def owners(client) -> dict[str, str | None]:
    values = [await client.get(keys.source_lease("tracks", s)) for s in STREAMS]
    return {s: v.decode() if v else None for s, v in zip(STREAMS, values)}


def check_split(daemons: list[Daemon]) -> None:
    held = [s for d in daemons for s in d.leases.held]
    assert sorted(held) == sorted(STREAMS)  # each stream read by exactly one daemon
    share = math.ceil(len(STREAMS) / len(daemons))
    assert all(len(d.leases.held) <= share for d in daemons)
    active = [len(ACTIVE & set(d.leases.held)) for d in daemons]
    assert max(active) - min(active) <= 1, active


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "light"])
async def test_daemons_that_join_get_busy_streams_too_and_the_split_then_holds(loaded):
    server = fakeredis.FakeServer()
    first = Daemon(server, "one:0", loaded)
    await rounds(server, [first], 3)
    assert sorted(first.leases.held) == sorted(STREAMS)
    everyone = [first, Daemon(server, "two:0", loaded), Daemon(server, "three:0", loaded)]
    await rounds(server, everyone, 40)
    check_split(everyone)
    assert await rounds(server, everyone, 60) == []  # stable: no stream moves back and forth
    c = fakeredis.FakeAsyncRedis(server=server)
    assert await owners(c) == {s: d.leases._consumer for d in everyone for s in d.leases.held}


async def test_a_stream_handed_to_a_daemon_at_its_share_is_not_given_straight_back():
    """The receiver, over its count share once it adopts the stream, gave back the stream it
    had just adopted (not busy, not fed yet): the giver took it back, and handed it again."""
    server = fakeredis.FakeServer()
    streams = STREAMS[:6]  # 4 busy, 2 quiet
    one, two = Daemon(server, "one:0"), Daemon(server, "two:0")
    c = fakeredis.FakeAsyncRedis(server=server)
    for stream in streams:  # one reads the busy ones, two the quiet ones: a split by count only
        await c.set(keys.source_lease("tracks", stream), "one:0" if stream in ACTIVE else "two:0")
    one.leases._rounds = two.leases._rounds = 1  # both have run a while
    one.leases.held, two.leases.held = [s for s in streams if s in ACTIVE], [s for s in streams if s not in ACTIVE]
    moves = []
    for _ in range(40):
        for d in (one, two):
            await d.round(streams)
        moves.append(await owners(c))
    active = [len(ACTIVE & set(d.leases.held)) for d in (one, two)]
    assert active == [2, 2] and sorted(one.leases.held + two.leases.held) == sorted(streams)
    assert moves[-1] == moves[-15]  # settled: nothing bounces


async def test_a_daemon_that_leaves_gives_its_streams_to_the_others():
    server = fakeredis.FakeServer()
    everyone = [Daemon(server, "one:0"), Daemon(server, "two:0")]
    await rounds(server, everyone, 20)
    check_split(everyone)
    await everyone[1].leases.release_all()
    await rounds(server, everyone[:1], 3)
    assert sorted(everyone[0].leases.held) == sorted(STREAMS)


async def test_a_stream_handed_over_is_not_read_until_drained_and_then_belongs_to_the_other():
    server = fakeredis.FakeServer()
    one, two = Daemon(server, "one:0"), Daemon(server, "two:0")
    await rounds(server, [one], 2)
    draining = {"yes": True}
    await two.round()  # joins: everything is leased
    await one.leases.settle(STREAMS, busy=lambda s: draining["yes"], fps=rate_of)
    assert one.leases.handing is not None
    stream, to = one.leases.handing
    assert to == "two:0" and stream not in one.leases.held  # no longer read here
    c = fakeredis.FakeAsyncRedis(server=server)
    for _ in range(2):  # its frames still in flight: still ours, not handed yet
        await two.round()
        await one.leases.settle(STREAMS, busy=lambda s: draining["yes"], fps=rate_of)
        assert (await owners(c))[stream] == "one:0"
    draining["yes"] = False
    await two.round()
    await one.leases.settle(STREAMS, busy=lambda s: draining["yes"], fps=rate_of)
    assert (await owners(c))[stream] == "two:0" and one.leases.handing is None
    assert stream in await two.round()


async def test_a_handover_to_a_daemon_that_stopped_meanwhile_is_dropped():
    server = fakeredis.FakeServer()
    one, two = Daemon(server, "one:0"), Daemon(server, "two:0")
    await rounds(server, [one], 2)
    await two.round()
    await one.leases.settle(STREAMS, busy=lambda s: True, fps=rate_of)
    stream, _ = one.leases.handing or (None, None)
    assert stream is not None
    await two.leases.release_all()  # it stops before the frames here are done
    await one.leases.settle(STREAMS, busy=lambda s: False, fps=rate_of)
    c = fakeredis.FakeAsyncRedis(server=server)
    assert one.leases.handing is None and stream in one.leases.held  # read here again
    assert (await owners(c))[stream] == "one:0"


@pytest.mark.parametrize(("word", "ttl"), [("1", 10_000), ("v2:0:10000", 10_000), ("v3:0.00:10000", 4_000)],
                         ids=["version 1", "version 2 (counts streams)", "silent a while"])
async def test_nothing_is_handed_to_a_daemon_that_would_not_take_it(word, ttl):
    """A daemon of version 1 adopts a stream leased to it only while under its share; one of
    version 2 balances by stream counts (the two would hand streams back and forth); one killed
    a moment ago is listed until its key expires (this one's key was renewed over half its TTL
    ago). A stream handed to any of them would go unread, or bounce."""
    server = fakeredis.FakeServer()
    one = Daemon(server, "one:0")
    await rounds(server, [one], 2)
    c = fakeredis.FakeAsyncRedis(server=server)
    for _ in range(5):
        await c.set(keys.source_member("tracks", "other:0"), word, px=ttl)
        await one.round()
    assert one.leases.handing is None and ACTIVE <= set(one.leases.held)


@pytest.mark.parametrize(("value", "load", "takes"), [
    ("v3:12.50:10000", 12.5, True), ("v3:nan:10000", 0.0, False), ("v3:-1:10000", 0.0, False),
    ("v3:12.5", 0.0, False), ("v2:3:10000", 0.0, False), ("1", 0.0, False)])
def test_a_member_s_word_is_read_as_its_load_or_as_one_handed_nothing(value, load, takes):
    assert Member.read("other:0", value, 9_000) == Member("other:0", load, takes)


async def test_busy_cameras_are_shared_out_not_slow_ones():
    """By count of active streams, the joining daemon took the two cameras that send a frame
    now and then (given back by count: nothing of theirs in flight), the first kept both busy
    ones (30 frames/s), and two active streams each looked even. By frames per second, each
    gets a busy camera."""
    busy, slow = {STREAMS[0], STREAMS[1]}, {STREAMS[2], STREAMS[3]}
    streams = STREAMS[:4]

    def rates(stream: str) -> float:
        return 15.0 if stream in busy else 0.5 if stream in slow else 0.0

    server = fakeredis.FakeServer()
    one = Daemon(server, "one:0", rates=rates)
    for _ in range(3):
        await one.round(streams)
    two = Daemon(server, "two:0", rates=rates)
    for _ in range(40):
        for d in (one, two):
            await d.round(streams)
    assert sorted(one.leases.held + two.leases.held) == sorted(streams)
    assert [len(busy & set(d.leases.held)) for d in (one, two)] == [1, 1]


async def test_unequal_cameras_settle_near_even_and_stay_put():
    """Three daemons, eight cameras from 1 to 30 frames/s: the loads end within the hysteresis
    (no daemon more than a quarter of its load above the least loaded), and then nothing moves."""
    fps = dict(zip(STREAMS, [30.0, 25.0, 12.0, 10.0, 8.0, 5.0, 2.0, 1.0]))
    server = fakeredis.FakeServer()
    first = Daemon(server, "one:0", rates=fps.__getitem__)
    await rounds(server, [first], 3)
    everyone = [first] + [Daemon(server, f"{n}:0", rates=fps.__getitem__) for n in ("two", "three")]
    await rounds(server, everyone, 60)
    assert sorted(s for d in everyone for s in d.leases.held) == sorted(STREAMS)
    assert await rounds(server, everyone, 60) == []
    loads = sorted(sum(fps[s] for s in d.leases.held) for d in everyone)
    assert loads[-1] - loads[0] <= GAP_SHARE * loads[-1], loads


async def test_daemons_joining_one_after_another_settle_without_streams_bouncing():
    """The re-check saw cameras go vm:0 -> vm:1 -> vm:0 -> vm:2 for a minute: a receiver over its
    count share gave a busy stream back by count (a model faster than the cameras leaves one
    with nothing in flight now and then), and the giver took it again. Only idle streams go
    back by count now; active ones move by load alone."""
    fps = dict(zip(STREAMS, [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 0.0, 0.0]))
    server = fakeredis.FakeServer()
    everyone = [Daemon(server, "one:0", rates=fps.__getitem__, flicker=True)]
    await rounds(server, everyone, 3)  # it takes them all
    moves = []
    for name in ("two:0", "three:0"):
        everyone.append(Daemon(server, name, rates=fps.__getitem__, flicker=True))
        moves += await rounds(server, everyone, 3)
    moves += await rounds(server, everyone, 40)
    active = [m for m in moves if fps[m[0]]]
    assert len(active) <= 5, active  # at most one move per busy camera but the first one kept
    assert all(sum(1 for m in active if m[0] == s) <= 1 for s in STREAMS), active  # none moved twice
    assert await rounds(server, everyone, 60) == []
    loads = sorted(sum(fps[s] for s in d.leases.held) for d in everyone)
    assert loads[-1] - loads[0] <= max(GAP_SHARE * loads[-1], 6.0), loads  # 6: a camera too big to move


async def test_a_daemon_that_comes_back_is_handed_one_stream_at_a_time():
    """Two daemons saw it at 0 frames/s and handed it a stream each at once (18 against 2 and
    4): it handed one on as soon as its load showed. One giver at a time per taker now."""
    fps = dict(zip(STREAMS, [10.0, 2.0, 8.0, 4.0, 0.0, 0.0, 0.0, 0.0]))
    streams = STREAMS[:4]
    server = fakeredis.FakeServer()
    c = fakeredis.FakeAsyncRedis(server=server)
    one, two = Daemon(server, "one:0", rates=fps.__getitem__), Daemon(server, "two:0", rates=fps.__getitem__)
    for stream, owner in zip(streams, ["one:0", "one:0", "two:0", "two:0"]):
        await c.set(keys.source_lease("tracks", stream), owner)
    one.leases._rounds = two.leases._rounds = 1
    one.leases.held, two.leases.held = streams[:2], streams[2:]
    one.read_for = {s: 5 for s in streams[:2]}
    two.read_for = {s: 5 for s in streams[2:]}
    three = Daemon(server, "three:0", rates=fps.__getitem__)  # back from a restart
    moves = []
    for _ in range(40):
        for d in (three, one, two):
            before = await owners(c)
            await d.round(streams)
            after = await owners(c)
            moves += [(s, after[s]) for s in streams if after[s] != before[s]]
    assert all(sum(1 for m in moves if m[0] == s) <= 1 for s in streams), moves  # none moved twice


async def test_a_quick_restart_keeps_its_busy_camera():
    """Restarted under the same name, a daemon keeps its streams, over its share now, and every
    stream gives 0 frames/s until read: it gave its busy camera away by count at once."""
    fps = dict(zip(STREAMS, [0.0, 0.0, 15.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    streams = STREAMS[:4]
    server = fakeredis.FakeServer()
    c = fakeredis.FakeAsyncRedis(server=server)
    for stream, owner in zip(streams, ["one:0", "one:0", "one:0", "two:0"]):
        await c.set(keys.source_lease("tracks", stream), owner)
    two = Daemon(server, "two:0", rates=fps.__getitem__)
    two.leases._rounds, two.leases.held, two.read_for = 1, [STREAMS[3]], {STREAMS[3]: 5}
    again = Daemon(server, "one:0", rates=fps.__getitem__)  # back at once, nothing read yet
    await c_rounds(server, [two, again], streams, 10)
    assert STREAMS[2] in again.leases.held and len(again.leases.held) == 2


async def c_rounds(server, daemons: list[Daemon], streams: list[str], n: int) -> None:
    for _ in range(n):
        for d in daemons:
            await d.round(streams)
