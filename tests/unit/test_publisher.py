"""Ack-then-publish: a result is published only by the call that acknowledged its frame."""

from __future__ import annotations

import asyncio

import fakeredis

from sightstream.frames import Acked, DeadLettered, Frame, Published
from sightstream.metrics import Metrics
from sightstream.stages.publisher import Publisher


async def setup():
    client = fakeredis.FakeAsyncRedis()
    await client.xgroup_create("frames:{a}", "p", id="0", mkstream=True)
    ids = [await client.xadd("frames:{a}", {"image": b"x"}) for _ in range(3)]
    await client.xreadgroup("p", "c", {"frames:{a}": ">"})
    frames = [Frame("p", "frames:{a}", i.decode(), {}, 1) for i in ids]
    return client, frames, Publisher(client, asyncio.Queue(), Metrics(), {"p": 100}, stop=asyncio.Event())


async def test_publishes_once_and_acknowledges():
    client, frames, pub = await setup()
    out = "results:p:frames:{a}"
    await pub.publish([Published(f, out, {"frame_id": f.frame_id}) for f in frames])
    assert await client.xlen(out) == 3
    assert (await client.xpending("frames:{a}", "p"))["pending"] == 0
    # A retry, or a second daemon that processed the same frames: nothing is published twice.
    await pub.publish([Published(f, out, {"frame_id": f.frame_id}) for f in frames])
    assert await client.xlen(out) == 3
    assert pub.published == 3


async def test_dead_letters_and_plain_acks():
    client, frames, pub = await setup()
    dl = "deadletter:p:frames:{a}"
    await pub.publish([DeadLettered(frames[0], dl, "bad_image", "cannot decode"),
                       Acked(frames[1], "sampled_out")])
    (entry,) = await client.xrange(dl)
    assert entry[1][b"reason"] == b"bad_image" and entry[1][b"error"] == b"cannot decode"
    assert entry[1][b"frame_id"] == frames[0].frame_id.encode()
    pending = await client.xpending("frames:{a}", "p")
    assert pending["pending"] == 1  # only the third frame, never handled


async def test_released_credits():
    client, frames, pub = await setup()
    released = []
    for f in frames:
        f.release = lambda f=f: released.append(f.frame_id)
    await pub.publish([Acked(f, "stale") for f in frames])
    assert released == [f.frame_id for f in frames]


async def test_scripts_lost_by_a_restarted_redis_are_reloaded():
    client, frames, pub = await setup()
    out = "results:p:frames:{a}"
    await pub.publish([Published(frames[0], out, {"frame_id": frames[0].frame_id})])
    await client.script_flush()  # what a Redis restart does to the script cache
    await pub.publish([Published(f, out, {"frame_id": f.frame_id}) for f in frames[1:]])
    assert await client.xlen(out) == 3


async def test_a_record_for_an_entry_no_longer_pending_is_written_once():
    client, frames, pub = await setup()
    dl = "deadletter:p:frames:{a}"
    frames[0].pending = False
    gone = DeadLettered(frames[0], dl, "empty_entry", "trimmed")
    await pub.publish([gone])
    await pub.publish([gone])  # a retried round
    assert await client.xlen(dl) == 1


async def test_the_result_of_a_frame_trimmed_while_processed_is_written_once():
    """Redis dropped the entry from the pending list (XAUTOCLAIM reported it to this daemon):
    its result is still written, once, and nothing else of the group is touched."""
    client, frames, pub = await setup()
    out = "results:p:frames:{a}"
    frames[0].pending = False
    await client.xack("frames:{a}", "p", frames[0].entry_id)  # as Redis' own drop from the list
    result = Published(frames[0], out, {"frame_id": frames[0].frame_id})
    await pub.publish([result])
    await pub.publish([result])  # a retried round
    assert await client.xlen(out) == 1 and pub.published == 1
    frames[1].pending = False
    await pub.publish([Acked(frames[1], "sampled_out")])  # nothing to acknowledge: no error
    pending = await client.xpending_range("frames:{a}", "p", "-", "+", 10)
    assert [r["message_id"].decode() for r in pending] == [frames[1].frame_id, frames[2].frame_id]


async def test_a_refused_write_leaves_the_frame_pending_and_unreleased():
    client, frames, pub = await setup()
    out = "results:p:frames:{a}"
    await client.set(out, "not a stream")  # a key collision: every XADD to it fails
    released = []
    frames[0].release = lambda: released.append(True)
    await pub.publish([Published(frames[0], out, {"frame_id": frames[0].frame_id}),
                       Acked(frames[1], "sampled_out")])
    pending = await client.xpending_range("frames:{a}", "p", "-", "+", 10)
    assert [r["message_id"].decode() for r in pending] == [frames[0].frame_id, frames[2].frame_id]
    assert released == [] and pub.published == 0  # held for a retry, not acknowledged
    assert len(pub._retries) == 1  # its batch-mate went through


async def test_a_refused_record_can_be_written_on_a_retry():
    client, frames, pub = await setup()
    dl = "deadletter:p:frames:{a}"
    await client.set(dl, "in the way")
    frames[0].pending = False
    gone = DeadLettered(frames[0], dl, "empty_entry", "trimmed")
    await pub.publish([gone])
    await client.delete(dl)
    await pub.publish([gone])
    assert await client.xlen(dl) == 1


async def test_a_vanished_group_publishes_nothing_and_raises_nothing():
    client, frames, pub = await setup()
    await client.xgroup_destroy("frames:{a}", "p")
    out = "results:p:frames:{a}"
    await pub.publish([Published(frames[0], out, {"frame_id": frames[0].frame_id})])
    assert await client.exists(out) == 0 and pub.published == 0


async def test_one_script_call_answers_for_each_entry_of_its_group():
    """Frames of one source go in one script call; its reply is per entry: the one another
    daemon already finished is not published again, the others are, and each is counted."""
    client, frames, pub = await setup()
    out = "results:p:frames:{a}"
    await client.xack("frames:{a}", "p", frames[1].entry_id)  # another daemon did this one
    await pub.publish([Published(f, out, {"frame_id": f.frame_id}) for f in frames])
    assert [e[1][b"frame_id"].decode() for e in await client.xrange(out)] == [
        frames[0].frame_id, frames[2].frame_id]
    assert pub.published == 2
    assert pub._metrics.publish_duplicates.labels("p")._value.get() == 1
    assert (await client.xpending("frames:{a}", "p"))["pending"] == 0


async def test_a_refused_output_refuses_only_its_group():
    """Two outputs in one round: the one Redis refuses (WRONGTYPE) leaves its frame pending;
    the other is published."""
    client, frames, pub = await setup()
    await client.set("results:p:bad", "not a stream")
    await pub.publish([Published(frames[0], "results:p:bad", {"frame_id": frames[0].frame_id}),
                       Published(frames[1], "results:p:frames:{a}", {"frame_id": frames[1].frame_id})])
    assert await client.xlen("results:p:frames:{a}") == 1
    pending = await client.xpending_range("frames:{a}", "p", "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] == [frames[0].entry_id, frames[2].entry_id]


async def test_every_stale_drop_is_in_a_log_line_the_last_of_a_burst_too(monkeypatch):
    """The summary line came only when a drop arrived 10 s after the last line: a burst's tail
    (319 of 640 drops in a black-box run) was never logged, not even at stop."""
    from structlog.testing import capture_logs

    from sightstream.stages import publisher
    from sightstream.stages.flow import STOP

    monkeypatch.setattr(publisher, "DROP_LOG_EVERY_S", 0.3)
    client, frames, pub = await setup()
    with capture_logs() as logs:
        running = asyncio.create_task(pub.run())
        for f in frames:
            await pub._in.put(Acked(f, "stale"))
        await asyncio.sleep(0.6)  # no drop comes after the burst: its tail is logged anyway
        lines = [e["counts"]["p"] for e in logs if e["event"] == "stale_frames_dropped"]
        assert sum(lines) == 3 and lines[0] == 1  # the first at once, then the rest when due
        more = Frame("p", "frames:{a}", "9-0", {}, 1)
        await pub._in.put(Acked(more, "stale"))
        await pub._in.put(STOP)
        await asyncio.wait_for(running, 2)
    assert sum(e["counts"]["p"] for e in logs if e["event"] == "stale_frames_dropped") == 4  # at stop


async def test_a_trim_learnt_while_the_round_is_on_its_way_still_gets_the_result_written():
    """The reclaimer's XAUTOCLAIM drops the trimmed entry from the pending list between the
    round's making (as a pending entry's write) and its reply (0: not pending): the result
    was counted a duplicate and never written, and no dead-letter either."""
    client, frames, pub = await setup()
    out = "results:p:frames:{a}"
    made = pub._round

    async def raced(outcomes):
        await client.xack("frames:{a}", "p", frames[0].entry_id)  # Redis drops it from the list
        replies = await made(outcomes)
        frames[0].pending = False  # what the reclaimer then learns
        return replies

    pub._round = raced
    await pub.publish([Published(frames[0], out, {"frame_id": frames[0].frame_id})])
    assert await client.xlen(out) == 0 and len(pub._retries) == 1  # not given up: written next
    pub._round = made
    await pub.publish(pub._due())
    assert await client.xlen(out) == 1 and pub.published == 1
