"""The live page's snapshots: what is kept (bounded), and what is drawn for each kind of result."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from sightstream.daemon.snapshots import PALETTE, Snapshots, render, summarize
from sightstream.frames import Frame
from sightstream.models import masks
from tests.conftest import encode

GREY = np.full((100, 160, 3), 128, np.uint8)


def frame(source: str, image: np.ndarray = GREY, encoded: bool = True) -> Frame:
    f = Frame("p", source, "1-0", {}, 1000, image=image, orig_size=(image.shape[1], image.shape[0]))
    f.snapshot = encode(image, "PNG") if encoded else None
    return f


def fields(result: dict, **payloads: bytes) -> dict:
    return {"result": json.dumps(result), "model": "m/v", "task": "detect", **payloads}


def drawn(snapshots: Snapshots, source: str) -> np.ndarray:
    snap = snapshots.get("p", source)
    assert snap is not None
    return np.asarray(Image.open(io.BytesIO(render(snap))).convert("RGB"), dtype=np.int16)


def test_the_latest_result_per_source_is_kept_for_a_bounded_number_of_sources():
    s = Snapshots(max_sources=2)
    for source in ("a", "b", "a", "c"):
        s.record(frame(source), fields({"detections": []}))
    assert [(x.source, x.seq) for x in s.list()] == [("a", 2), ("c", 1)]  # b was the oldest
    big = np.zeros((3000, 3000, 3), np.uint8)  # raw pixels over MAX_SNAPSHOT_BYTES: not kept
    s.record(frame("raw", big, encoded=False), fields({"detections": []}))
    assert s.get("p", "raw") is None


def test_the_counts_kept_are_of_the_sources_counted_lately():
    """Bounded to 4 x max_sources: the source counted longest ago goes, not the first seen (a
    camera still sending, whose drop the page took for a restart)."""
    s = Snapshots(max_sources=2)
    for i in range(20):  # short-lived streams come and go; "cam" keeps sending
        s.frames_read("p", "cam", 10)
        s.frames_read("p", f"brief{i}", 1)
        s.dead_lettered(frame("cam"))
        s.dead_lettered(frame(f"brief{i}"))
    assert s.read_count("p", "cam") == 200 and s.dead_count("p", "cam") == 20
    assert s.read_count("p", "brief0") == 0 and s.read_count("p", "brief19") == 1


def test_versions_never_repeat_and_the_bytes_kept_are_capped():
    s = Snapshots(max_sources=10, max_bytes=50_000)
    seen = set()
    for source in ("a", "b", "a"):
        s.record(frame(source), fields({"detections": []}))
        seen.add(s.get("p", source).version)
    assert len(seen) == 3  # a version per result, also for a source seen again
    other = Snapshots()
    other.record(frame("a"), fields({"detections": []}))
    assert other.get("p", "a").version not in seen  # another daemon life: other versions
    noisy = np.random.default_rng(0).integers(0, 255, (100, 160, 3), dtype=np.uint8)
    for source in "cdefgh":  # ~48 KB each as PNG: the budget keeps the latest one or two
        s.record(frame(source, noisy), fields({"detections": []}))
    assert s.nbytes <= 50_000 and s.get("p", "h") is not None and s.get("p", "a") is None
    assert not Snapshots(max_sources=0).record(frame("x"), fields({})) and not Snapshots(0).list()


def test_boxes_are_drawn_in_the_frame_s_pixels_with_their_label():
    s = Snapshots()
    det = {"box": [40, 20, 120, 80], "score": 0.9, "label": "dog", "class_id": 1, "track_id": 3}
    s.record(frame("a"), fields({"width": 160, "height": 100, "detections": [det]}))
    out = drawn(s, "a")
    assert out.shape == (100, 160, 3)
    edge = out[50, 40]  # on the box's left side, in track 3's colour
    assert np.abs(edge - PALETTE[3]).max() < 40
    assert np.abs(out[50, 80] - 128).max() < 10  # inside the box: the frame as it was
    assert summarize({"detections": [det, det]}) == "2 x dog"


def test_masks_are_tinted_and_depth_is_coloured_and_captions_written():
    s = Snapshots()
    index = np.zeros((100, 160), np.uint8)
    index[10:50, 10:60] = 1
    s.record(frame("m"), fields({"width": 160, "height": 100, "masks": [{"object": 0}]}, mask=masks.png(index)))
    tinted = drawn(s, "m")
    assert np.abs(tinted[30, 30] - 128).max() > 30 and np.abs(tinted[80, 120] - 128).max() < 10

    depth = np.tile(np.linspace(0, 65535, 160, dtype=np.uint16), (100, 1))
    buf = io.BytesIO()
    Image.fromarray(depth).save(buf, format="PNG")
    s.record(frame("d"), fields({"width": 160, "height": 100, "min": 0.0, "max": 1.0}, depth=buf.getvalue()))
    coloured = drawn(s, "d")
    assert np.abs(coloured[50, 5] - coloured[50, 155]).max() > 100  # near and far differ

    s.record(frame("c"), fields({"text": "a grey square"}))
    captioned = drawn(s, "c")
    assert captioned[-17:, :, :].mean() < 60  # a dark strip for the text at the bottom
    assert summarize({"text": "a grey square"}) == "a grey square"
    labels = {"labels": [{"label": "cat", "class_id": 0, "score": 0.81}, {"label": "dog", "class_id": 1, "score": 0.1}]}
    assert summarize(labels) == "cat 0.81, dog 0.10"
    s.record(frame("k"), fields(labels))
    assert drawn(s, "k")[-17:, :, :].mean() < 60  # a classifier's labels are written too


def test_raw_frames_are_drawn_from_their_pixels():
    s = Snapshots()
    s.record(frame("r", encoded=False), fields({"width": 160, "height": 100, "detections": []}))
    assert drawn(s, "r").shape == (100, 160, 3)


def test_the_one_line_summary_names_unlabelled_tracks():
    from sightstream.daemon.snapshots import summarize

    tracks = {"detections": [{"box": [0, 0, 1, 1], "track_id": 1}, {"box": [0, 0, 1, 1], "track_id": 2},
                             {"box": [0, 0, 1, 1], "track_id": 3, "label": "dog"}]}
    assert summarize(tracks) == "1 x dog, 2 x tracked object"  # was "2 x ?"
    assert summarize({"detections": []}) == "nothing found"


def test_a_photo_with_an_exif_orientation_is_drawn_as_its_result_saw_it():
    """Its boxes speak of the photo as shown: drawn on it as stored, they fell beside it."""
    from tests.unit.test_decoder import tagged

    image = np.full((100, 160, 3), 128, np.uint8)
    image[10:30, 100:150] = (255, 255, 255)  # a white block top right, as shown
    s = Snapshots()
    f = frame("phone", image)
    f.snapshot = tagged(image, "PNG", 6)  # stored turned a quarter, tagged to be shown upright
    s.record(f, fields({"width": 160, "height": 100, "detections": []}))
    pixels = drawn(s, "phone")
    assert pixels.shape == (100, 160, 3) and pixels[20, 125].min() > 200 and pixels[80, 30].max() < 160
