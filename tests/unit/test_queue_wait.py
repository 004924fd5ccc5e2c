"""Live mode's admission under overload (stages/queue_wait.py): only while more than a batch
waits for the device, an age that leaves room for the wait ahead, and a share per camera."""

from __future__ import annotations

from collections import Counter

from sightstream.stages import queue_wait
from sightstream.stages.queue_wait import QueueWait


def test_limits_apply_only_while_the_device_is_behind(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(queue_wait.time, "monotonic", lambda: now[0])
    waits = QueueWait(batch_size=8, max_age_ms=1000)
    assert waits.limits(Counter({"a": 20}), "a") == (1000, None)  # its pace not known yet
    for _ in range(9):  # 10 frames every 0.25 s: 40 frames/s
        waits.taken(10)
        now[0] += 0.25
    # 20 frames ahead at 40 frames/s: 0.5 s of wait; 40 frames cleared within max_age_ms,
    # 20 for each camera waiting, of which "b" holds 8
    assert waits.limits(Counter({"a": 12, "b": 8}), "b") == (500, 12)
    assert waits.limits(Counter({"a": 12, "b": 8}), "c") == (500, 13)  # a third camera: a third
    assert waits.limits(Counter({"a": 6}), "b") == (1000, None)  # a batch or less: it keeps up
    assert waits.limits(Counter({"a": 60}), "a") == (1, -20)  # over what it clears in time: none
    now[0] += 3  # nothing taken since: a long call, a load; its pace is not known
    assert waits.limits(Counter({"a": 20}), "a") == (1000, None)


def test_frames_with_an_outcome_or_at_a_device_are_not_waiting():
    """A frame dropped at read stays held until acknowledged: counted as waiting, it made the
    next read (often the same stream's, at once) drop everything as if a queue stood ahead."""
    from sightstream.frames import Acked, Frame
    from sightstream.stages.flow import InFlight

    in_flight = InFlight(8)
    frames = [Frame("p", s, f"{n}-0", {}, n) for n, s in enumerate(["frames:{a}"] * 3 + ["frames:{b}"])]
    for f in frames:
        assert in_flight.hold(f)
    Acked(frames[0], "stale")  # dropped, not yet acknowledged
    frames[1].at_device = True
    assert in_flight.waiting() == Counter({"frames:{a}": 1, "frames:{b}": 1})
