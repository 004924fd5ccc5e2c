"""The SAM2 tracker's own rules (tiny random-init Sam2VideoModel, no Redis): sessions per
source, track ids, matching upstream detections, dropping lost objects, flat memory."""

from __future__ import annotations

import numpy as np
import pytest

from sightstream.models.adapter import FrameContext, Prompt
from sightstream.models.adapters.hf_sam2_video import HfSam2Tracker, drop_objects
from tests import tiny_hf

BOXES = Prompt('{"boxes": [[100, 50, 250, 200], [10, 10, 60, 60]]}', 1)


@pytest.fixture(scope="module")
def tracker_path(tmp_path_factory):
    return str(tiny_hf.sam2_video(tmp_path_factory.mktemp("sam2v") / "model"))


@pytest.fixture
def tracker(tracker_path):
    adapter = HfSam2Tracker(tracker_path, {"max_gap_ms": 1000})
    adapter.load("cpu")
    yield adapter
    adapter.unload()


def frames(n: int, size=(120, 160)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n)]


def ids(prediction) -> list[int]:
    return [d["track_id"] for d in prediction.result["detections"]]


def test_prompted_objects_keep_their_track_ids_within_a_source(tracker):
    out = [tracker.infer([img], BOXES, [FrameContext("cam1", 1000 + 40 * i)])[0] for i, img in enumerate(frames(6))]
    sessions = {p.result["track_session"] for p in out}
    assert len(sessions) == 1
    assert all(set(ids(p)) <= {1, 2} for p in out) and any(ids(p) for p in out)
    r = out[-1].result
    assert [m["track_id"] for m in r["masks"]] == ids(out[-1])
    assert out[-1].payloads["mask"][:8] == b"\x89PNG\r\n\x1a\n"


def test_sources_have_their_own_sessions_and_a_gap_starts_a_new_one(tracker):
    a, b = frames(2)
    first = tracker.infer([a, b], BOXES, [FrameContext("cam1", 1000), FrameContext("cam2", 1000)])
    assert first[0].result["track_session"] != first[1].result["track_session"]
    assert tracker.sessions == 2
    later = tracker.infer([a], BOXES, [FrameContext("cam1", 1500)])[0]
    assert later.result["track_session"] == first[0].result["track_session"]
    after_gap = tracker.infer([a], BOXES, [FrameContext("cam1", 5000)])[0]
    assert after_gap.result["track_session"] != first[0].result["track_session"]
    # the source went to another daemon and came back: this state missed frames
    taken_again = tracker.infer([a], BOXES, [FrameContext("cam1", 5040, generation=2)])[0]
    assert taken_again.result["track_session"] != after_gap.result["track_session"]


def test_a_new_prompt_version_starts_a_session_with_its_objects(tracker):
    """A PUT of a tracking pipeline's prompt reached only sources that had none yet: a live
    camera kept its first session, and its results claimed the new version while tracking
    the old prompt's objects (or none)."""
    a, b, c = frames(3)
    empty = tracker.infer([a], Prompt("", 1), [FrameContext("cam1", 1000)])[0]
    assert ids(empty) == []
    one_box = Prompt('{"boxes": [[10, 10, 60, 60]]}', 2)
    renewed = tracker.infer([b], one_box, [FrameContext("cam1", 1040)])[0]
    assert renewed.result["track_session"] != empty.result["track_session"]
    assert tracker._sources["cam1"].tracks.keys() == {1}  # the new prompt's box became track 1
    same = tracker.infer([c], one_box, [FrameContext("cam1", 1080)])[0]
    assert same.result["track_session"] == renewed.result["track_session"]


def test_upstream_detections_start_tracks_unless_they_overlap_one(tracker):
    img, = frames(1)
    det = {"box": [10.0, 10.0, 60.0, 60.0], "label": "cat", "class_id": 3}
    out = tracker.infer([img], None, [FrameContext("cam1", 1000, [det])])[0]
    assert ids(out) == [1] and out.result["detections"][0]["label"] == "cat"
    state = tracker._sources["cam1"]
    state.tracks[1].box = [12.0, 12.0, 60.0, 60.0]  # where it was last seen
    overlapping = {"box": [10.0, 10.0, 58.0, 58.0], "label": "dog"}
    elsewhere = {"box": [100.0, 60.0, 150.0, 110.0], "label": "cat"}
    tracker.infer([img], None, [FrameContext("cam1", 1040, [overlapping, elsewhere])])
    assert sorted(state.tracks) == [1, 2]
    assert state.tracks[1].label == "dog"  # renewed, not a new track
    nothing = tracker.infer([img], None, [FrameContext("cam9", 1000, [])])[0]
    assert nothing.result["detections"] == [] and nothing.result["masks"] == []


def test_an_object_lost_for_max_lost_frames_is_dropped(tracker_path):
    tracker = HfSam2Tracker(tracker_path, {"max_lost_frames": 2})
    tracker.load("cpu")
    img, = frames(1)
    tracker.infer([img], BOXES, [FrameContext("cam1", 1000)])
    state = tracker._sources["cam1"]
    for track in state.tracks.values():
        track.lost = 0
    h, w = img.shape[:2]
    seen = np.zeros((2, h, w), bool)
    seen[:, 10:20, 10:20] = True
    for _ in range(3):  # track 1 absent three frames running, track 2 present
        p = tracker._prediction(state, seen, np.array([-1.0, 1.0]), [1, 2], w, h)
        assert ids(p) == [2]
    assert sorted(state.tracks) == [2] and state.session.obj_ids == [2]
    assert tracker.infer([img], BOXES, [FrameContext("cam1", 1040)])[0].result["track_session"] == state.name


def test_memory_stays_flat_on_a_long_stream(tracker):
    for i, img in enumerate(frames(30, size=(64, 64))):
        tracker.infer([img], BOXES, [FrameContext("cam1", 1000 + 40 * i)])
    session = tracker._sources["cam1"].session
    assert len(session.processed_frames) == 1
    for outputs in session.output_dict_per_obj.values():
        assert len(outputs["non_cond_frame_outputs"]) <= tracker._history


def test_drop_objects_renumbers_the_survivors(tracker):
    img, = frames(1)
    three = Prompt('{"boxes": [[0, 0, 20, 20], [30, 30, 60, 60], [70, 70, 100, 100]]}', 1)
    tracker.infer([img], three, [FrameContext("cam1", 1000)])
    session = tracker._sources["cam1"].session
    kept = session.output_dict_per_obj[2]
    drop_objects(session, {2})
    assert session.obj_ids == [1, 3] and session.obj_id_to_idx(3) == 1
    assert session.output_dict_per_obj[1] is kept and len(session.output_dict_per_obj) == 2
