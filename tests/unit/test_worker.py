"""The worker's device pipeline: a staged adapter's steps run where they belong, batches
overlap on one device, reach it in order, leave in order, and no more than `depth` are taken."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from sightstream import keys
from sightstream.config import ModelEntry
from sightstream.frames import Batch, DeadLettered, Frame, Published, now_ms
from sightstream.metrics import Metrics
from sightstream.models.catalogue import Catalogue
from sightstream.models.manager import ModelManager
from sightstream.stages.flow import STOP
from sightstream.stages.worker import Worker
from tests.conftest import wait_for

MODEL = "fake/staged"
OTHER = "fake/other"


class Rig:
    """A worker on the CPU with a staged fake model, a shared batch queue and an outcome queue."""

    def __init__(self, depth: int = 2, timeout_s: float = 10.0, other: dict | None = None,
                 timeout_s_entry: float | None = None, **options: Any) -> None:
        """`options`: the staged model's; `other`: a second staged model's (OTHER) options;
        `timeout_s`: the daemon's inference_timeout_s, `timeout_s_entry`: the staged model's own."""
        entry = ModelEntry(backend="torch", task="detect", adapter="tests.fake_adapters:Staged",
                           timeout_s=timeout_s_entry, **options)
        models = {"staged": entry}
        if other is not None:
            models["other"] = ModelEntry(backend="torch", task="detect",
                                         adapter="tests.fake_adapters:Staged", **other)
        self.manager = ModelManager(Catalogue({"fake": models}))
        self.batches: asyncio.Queue = asyncio.Queue()
        self.outcomes: asyncio.Queue = asyncio.Queue()
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="cpu-pool")
        self.worker = Worker("cpu", self.manager, self.batches, self.outcomes, self.metrics,
                             timeout_s, cpu=self.pool, depth=depth)
        self.released: list[int] = []

    def batch(self, *tags: int, model: str = MODEL) -> Batch:
        frames = [self.frame(t) for t in tags]
        return Batch("p", model, keys.DEFAULT_OUTPUT, 0, frames)

    def frame(self, tag: int) -> Frame:
        image = np.full((4, 4, 3), tag, np.uint8)
        return Frame("p", f"frames:cam{tag}", f"{tag}-0", {}, now_ms(), image=image, orig_size=(4, 4),
                     release=lambda: self.released.append(tag))

    @property
    def adapter(self) -> Any:
        return self.manager._loaded[(MODEL, "cpu")].adapter

    @property
    def other(self) -> Any:
        return self.manager._loaded[(OTHER, "cpu")].adapter

    def outcome_tags(self) -> list[tuple[str, int]]:
        out = []
        while not self.outcomes.empty():
            o = self.outcomes.get_nowait()
            out.append((type(o).__name__, int(o.frame.entry_id.split("-")[0])))
        return out

    async def run(self, *batches: Batch) -> None:
        for b in batches:
            self.batches.put_nowait(b)
        self.batches.put_nowait(STOP)
        await asyncio.wait_for(self.worker.run(), 10)

    def close(self) -> None:
        self.worker.close()
        self.pool.shutdown()


@pytest.fixture
def rigs():
    made: list[Rig] = []
    yield lambda **kw: made.append(Rig(**kw)) or made[-1]
    for rig in made:
        rig.close()


async def test_staged_steps_run_in_their_pools_and_the_next_batch_is_prepared_during_a_call(rigs):
    rig = rigs(await_next_prepare=[1, 2])
    await rig.run(rig.batch(1), rig.batch(2), rig.batch(3))
    threads = {(step, tag): name for step, tag, name in rig.adapter.events}
    for tag in (1, 2, 3):
        assert threads[("prepare", tag)].startswith("cpu-pool")
        assert threads[("infer", tag)].startswith("infer-cpu")
        assert threads[("finish", tag)].startswith("cpu-pool")
    # batch k+1 was prepared while batch k was on the device (each call waited for it)
    assert rig.adapter.overlapped == {1: True, 2: True}
    assert rig.outcome_tags() == [("Published", 1), ("Published", 2), ("Published", 3)]


async def test_batches_reach_the_device_and_leave_in_order_when_a_later_one_prepares_faster(rigs):
    # Prepares of one adapter take turns (its lock), so a later batch is ready first when it is
    # another model's: batch 2 (OTHER) takes 0.3 s to prepare, batch 3 (MODEL) is ready at once.
    rig = rigs(other={"prepare_s": {"2": 0.3}}, depth=3)
    await rig.run(rig.batch(1), rig.batch(2, model=OTHER), rig.batch(3))
    began = {**rig.adapter.began, **rig.other.began}
    infers = sorted((t, tag) for (step, tag), t in began.items() if step == "infer")
    assert [tag for _, tag in infers] == [1, 2, 3]
    assert began[("prepare", 3)] < began[("infer", 2)]  # ready first, yet it waited its turn
    assert rig.outcome_tags() == [("Published", 1), ("Published", 2), ("Published", 3)]


async def test_no_more_than_depth_batches_are_taken_from_the_shared_queue(rigs):
    rig = rigs(hang={"1": 1.0}, depth=2)
    for tag in range(1, 6):
        rig.batches.put_nowait(rig.batch(tag))
    task = asyncio.create_task(rig.worker.run())
    await wait_for(lambda: rig.worker.in_flight == 2, what="two batches in flight")
    await asyncio.sleep(0.3)  # negative window: nothing more is taken while the device is busy
    assert rig.worker.in_flight == 2 and rig.batches.qsize() == 3  # siblings may take these
    rig.batches.put_nowait(STOP)
    await asyncio.wait_for(task, 10)
    assert [t for kind, t in rig.outcome_tags()] == [1, 2, 3, 4, 5]


async def test_the_timeout_counts_from_when_the_device_starts_the_call(rigs):
    # each call takes 0.3 s of a 0.5 s budget; the third waits 0.6 s behind the first two
    rig = rigs(infer_s={"*": 0.3}, depth=3, timeout_s=0.5)
    await rig.run(rig.batch(1), rig.batch(2), rig.batch(3))
    assert rig.outcome_tags() == [("Published", 1), ("Published", 2), ("Published", 3)]
    assert rig.worker.replaced == 0 and not rig.released


async def test_a_batch_queued_behind_a_stuck_call_is_sent_again_to_the_fresh_thread(rigs):
    """Batch 2 never reached the model: it was queued behind batch 1's call, which hung. Left
    pending, it waited reclaim_min_idle_ms (30 s by default) for the reclaimer and counted as
    abandoned, blaming its pipeline for another's hung model."""
    rig = rigs(hang={"1": 2.0}, depth=2, timeout_s=0.3)
    rig.batches.put_nowait(rig.batch(1))
    rig.batches.put_nowait(rig.batch(2))
    rig.batches.put_nowait(rig.batch(3))
    rig.batches.put_nowait(STOP)
    await asyncio.wait_for(rig.worker.run(), 10)
    assert sorted(rig.outcome_tags()) == [("Published", 2), ("Published", 3)]
    assert rig.released == [1] and rig.worker.replaced == 1
    assert rig.metrics.frames_abandoned.labels("p")._value.get() == 1


async def test_a_tracker_s_batch_queued_behind_a_stuck_call_is_left_pending_not_sent_out_of_order(rigs):
    """Sent again, it would reach the device after the batch behind it: a tracker's state
    needs its frames in order."""
    rig = rigs(hang={"1": 2.0}, depth=2, timeout_s=0.3, claims_task="track")
    await rig.run(rig.batch(1), rig.batch(2))
    assert rig.outcome_tags() == [] and sorted(rig.released) == [1, 2]


async def test_a_batch_sent_again_keeps_out_frames_stale_by_then(rigs):
    rig = rigs(hang={"1": 2.0}, depth=2, timeout_s=0.6)
    late = rig.batch(2, 3)
    late.max_age_ms = 1500
    late.frames[1].ts_ms = now_ms() - 1100  # fresh when it reached the device, stale after the 0.6 s wait
    await rig.run(rig.batch(1), late)
    assert sorted(rig.outcome_tags()) == [("Acked", 3), ("Published", 2)]
    assert rig.released == [1]


async def test_a_model_s_own_timeout_replaces_the_daemon_s(rigs):
    # the daemon's inference_timeout_s is 1 s; `staged` takes 1.5 s a call but its entry
    # allows 5 s; `other` takes 0.6 s but its entry allows only 0.2 s
    rig = rigs(infer_s={"*": 1.5}, timeout_s=1.0, timeout_s_entry=5,
               other={"hang": {"2": 0.6}, "timeout_s": 0.2})
    await rig.run(rig.batch(1), rig.batch(2, model=OTHER))
    assert rig.outcome_tags() == [("Published", 1)]
    assert rig.released == [2] and rig.worker.replaced == 1


async def test_a_frame_whose_finish_fails_is_dead_lettered_alone(rigs):
    rig = rigs(bad_finish=2)
    await rig.run(rig.batch(1, 2, 3))
    assert sorted(rig.outcome_tags()) == [("DeadLettered", 2), ("Published", 1), ("Published", 3)]


async def test_results_carry_the_model_s_output_as_json(rigs):
    rig = rigs()
    await rig.run(rig.batch(7))
    (outcome,) = [rig.outcomes.get_nowait()]
    assert isinstance(outcome, Published) and not isinstance(outcome, DeadLettered)
    assert outcome.stream == keys.result_stream(keys.DEFAULT_OUTPUT, "p", "frames:cam7")
    assert outcome.fields["result"] == '{"width":4,"height":4,"detections":[],"tag":7}'


async def test_a_timeout_during_split_retries_hands_back_every_frame_of_the_batch(rigs):
    # the batch fails as a whole, so it is retried frame by frame; frame 3's call then hangs
    rig = rigs(fail_multi=True, hang={"3": 2.0}, timeout_s=0.3)
    await rig.run(rig.batch(1, 2, 3, 4))
    assert rig.outcome_tags() == []  # frames 1 and 2 are done again later: never half a batch
    assert sorted(rig.released) == [1, 2, 3, 4]  # all pending in Redis again, credit returned


async def test_a_batch_that_needs_no_device_call_keeps_the_order_of_the_rest(rigs):
    rig = rigs(prepare_s={"1": 0.3}, depth=3)
    stale = rig.batch(2)
    stale.max_age_ms = 1
    stale.frames[0].ts_ms = now_ms() - 60_000  # dropped as stale: no device call
    await rig.run(rig.batch(1), stale, rig.batch(3))
    assert [tag for step, tag, _ in rig.adapter.events if step == "infer"] == [1, 3]
    assert rig.outcome_tags() == [("Published", 1), ("Acked", 2), ("Published", 3)]


async def test_a_model_waits_for_room_that_a_batch_in_flight_still_holds():
    """Two 60 MB models, a 100 MB budget, two batches in flight: the second model is loaded
    once the first batch lets go of the first (evicting it), not refused."""
    entry = {"backend": "torch", "task": "detect", "adapter": "tests.fake_adapters:Staged",
             "memory_mb": 60, "infer_s": {"*": 0.3}}
    manager = ModelManager(Catalogue({"fake": {"a": ModelEntry(**entry), "b": ModelEntry(**entry)}}),
                           budgets_mb={"cpu": 100})
    batches, outcomes = asyncio.Queue(), asyncio.Queue()
    pool = ThreadPoolExecutor(2)
    worker = Worker("cpu", manager, batches, outcomes, Metrics(), 10, cpu=pool, depth=2)
    image = np.full((4, 4, 3), 1, np.uint8)
    for model, tag in (("fake/a", 1), ("fake/b", 2)):
        frame = Frame("p", "frames:cam", f"{tag}-0", {}, now_ms(), image=image, orig_size=(4, 4))
        batches.put_nowait(Batch("p", model, keys.DEFAULT_OUTPUT, 0, [frame]))
    batches.put_nowait(STOP)
    await asyncio.wait_for(worker.run(), 10)
    worker.close()
    pool.shutdown()
    kinds = [type(outcomes.get_nowait()).__name__ for _ in range(outcomes.qsize())]
    assert kinds == ["Published", "Published"]
    assert [m["model"] for m in manager.loaded()] == ["fake/b"]  # a was evicted for b


async def test_an_abandoned_call_queued_behind_a_stuck_one_never_runs_on_the_stuck_thread(rigs):
    rig = rigs(hang={"1": 1.0}, depth=2, timeout_s=0.3)
    await rig.run(rig.batch(1), rig.batch(2))
    assert rig.released == [1]
    await asyncio.sleep(1.2)  # the stuck call has ended by now; the queued one was cancelled
    assert [(step, tag) for step, tag, _ in rig.adapter.events].count(("infer", 2)) == 1  # on the fresh one


async def test_a_result_that_cannot_be_encoded_is_dead_lettered_alone(rigs):
    rig = rigs(unjsonable=2)
    await rig.run(rig.batch(1, 2), rig.batch(3))
    assert rig.outcome_tags() == [("Published", 1), ("DeadLettered", 2), ("Published", 3)]


async def test_log_lines_of_a_batch_name_its_pipeline_device_and_batch(rigs):
    from structlog.testing import capture_logs

    rig = rigs(fail_multi=True)
    with capture_logs() as logs:
        await rig.run(rig.batch(1, 2), rig.batch(3, 4))
    retries = [e for e in logs if e["event"] == "batch_failed_retrying"]
    assert [(e["pipeline"], e["device"], e["batch"]) for e in retries] == [("p", "cpu", "cpu/1"), ("p", "cpu", "cpu/2")]
