"""The wire contract: what a producer may send, what a result and a dead-letter carry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sightstream.errors import FrameError
from sightstream.frames import (
    MAX_META_DEPTH,
    Frame,
    Prediction,
    deadletter_fields,
    entry_ms,
    result_fields,
    result_json,
    scale_detections,
)


def parsed(pipeline: str, source: str, entry_id: str, fields: dict) -> Frame:
    """A frame as admission builds it: from the entry, then its fields checked."""
    frame = Frame(pipeline, source, entry_id, fields, entry_ms(entry_id))
    frame.parse_fields()
    return frame


def test_ts_defaults_to_the_entry_id_time():
    f = parsed("p", "frames:{a}", "1700000000123-4", {b"image": b"x"})
    assert f.ts_ms == 1700000000123


def test_ts_and_meta_are_taken_from_fields():
    f = parsed("p", "s", "1-0", {b"image": b"x", b"ts": b"42", b"meta": b'{"a": [1]}'})
    assert f.ts_ms == 42 and f.meta == b'{"a": [1]}'
    assert parsed("p", "s", "1-0", {b"image": b"x", b"ts": str(10**14 - 1).encode()}).ts_ms == 10**14 - 1
    # time.time() * 1000 written as it is: the fraction is cut off (every frame was dead-lettered)
    for written in (b"1795751715813.5", b"1795751715813.0", b"1795751715813."):
        assert parsed("p", "s", "1-0", {b"image": b"x", b"ts": written}).ts_ms == 1795751715813


@pytest.mark.parametrize(
    "fields,reason",
    [
        ({}, "empty_entry"),
        ({b"width": b"3"}, "missing_image"),
        ({b"image": b"x", b"ts": b"soon"}, "bad_fields"),
        ({b"image": b"x", b"meta": b"[1, 2]"}, "bad_fields"),
        ({b"image": b"x", b"meta": b"{not json"}, "bad_fields"),
        ({b"image": b"x", b"meta": b'{"a": NaN}'}, "bad_fields"),  # Python reads it; JSON.parse does not
        ({b"image": b"x", b"meta": b'{"a": -Infinity}'}, "bad_fields"),
        ({b"image": b"x", b"ts": b"-5"}, "bad_fields"),
        ({b"image": b"x", b"ts": b"+5"}, "bad_fields"),  # int() takes these three
        ({b"image": b"x", b"ts": b" 5"}, "bad_fields"),
        ({b"image": b"x", b"ts": b"1_000"}, "bad_fields"),
        ({b"image": b"x", b"ts": "٣".encode()}, "bad_fields"),
        ({b"image": b"x", b"meta": b'{"a": "\xff"}'}, "bad_fields"),
        ({b"image": b"x", b"ts": str(2**53).encode()}, "bad_fields"),  # past JSON's exact integers
        # microseconds: 100 of 100 frames kept at fps 2, never stale in live mode, latency 0
        ({b"image": b"x", b"ts": b"1795751715813000"}, "bad_fields"),
        ({b"image": b"x", b"ts": b"1.795e12"}, "bad_fields"),
        ({b"image": b"x", b"ts": b".5"}, "bad_fields"),
        ({b"image": b"x", b"ts": b"5.5.5"}, "bad_fields"),
        ({b"image": b"x", b"ts": b"5.-5"}, "bad_fields"),
        # deep enough that Python's JSON reader gives up (a RecursionError stopped the daemon)
        ({b"image": b"x", b"meta": b'{"a":' * 5000 + b"1" + b"}" * 5000}, "bad_fields"),
        ({b"image": b"x", b"meta": b'{"a":' + b"[" * 2000 + b"]" * 2000 + b"}"}, "bad_fields"),
        ({b"image": b"x", b"meta": b'{"a":' * 65 + b"1" + b"}" * 65}, "bad_fields"),  # past MAX_META_DEPTH
    ],
)
def test_entries_the_contract_forbids(fields, reason):
    with pytest.raises(FrameError) as e:
        parsed("p", "s", "1-0", fields)
    assert e.value.reason == reason and str(e.value)


def test_result_fields_carry_every_contract_field():
    f = parsed("people", "frames:{cam1}", "5-1", {b"image": b"x", b"meta": b'{"k":1}'})
    fields = result_fields(f, model="m/v", task="detect",
                           prediction=Prediction({"detections": []}, {"mask": b"PNG"}),
                           prompt_version=3)
    assert fields["source"] == "frames:{cam1}" and fields["frame_id"] == "5-1"
    assert fields["ts"] == "5" and fields["pipeline"] == "people" and fields["model"] == "m/v"
    assert fields["task"] == "detect" and fields["prompt_version"] == "3"
    assert json.loads(fields["result"]) == {"detections": []}
    assert fields["mask"] == b"PNG" and fields["meta"] == b'{"k":1}'


def test_prompt_version_is_absent_for_models_without_prompts():
    f = parsed("p", "s", "5-1", {b"image": b"x"})
    fields = result_fields(f, model="m/v", task="detect", prediction=Prediction({}))
    assert "prompt_version" not in fields and "meta" not in fields


def test_deadletter_fields():
    f = parsed("p", "s", "5-1", {b"image": b"x"})
    d = deadletter_fields(f, "bad_image", "the JPEG image cannot be decoded")
    assert d["reason"] == "bad_image" and d["error"].startswith("the JPEG")
    assert d["source"] == "s" and d["frame_id"] == "5-1" and d["deliveries"] == "1"


def test_detections_scale_back_to_original_pixels():
    result = {"width": 320, "height": 180, "detections": [
        {"box": [10, 20, 30, 40], "landmarks": [[10, 20]], "label": "face"}]}
    scale_detections(result, 4, 4, 1280, 720)
    assert result["width"] == 1280 and result["height"] == 720
    assert result["detections"][0]["box"] == [40, 80, 120, 160]
    assert result["detections"][0]["landmarks"] == [[40, 80]]


def test_outlines_scale_back_with_their_boxes():
    """Florence-2's text regions (a polygon) and open-vocabulary outlines (polygons)."""
    result = {"width": 320, "height": 180, "detections": [
        {"box": [10, 20, 30, 40], "label": "text", "polygon": [[10, 20], [30, 20], [30, 40], [10, 40]]},
        {"box": [0, 0, 8, 8], "label": "cat", "polygons": [[[0, 0], [8, 0], [8, 8]], [[1, 1], [2, 2]]]}]}
    scale_detections(result, 2, 4, 640, 720)
    text, cat = result["detections"]
    assert text["polygon"] == [[20, 80], [60, 80], [60, 160], [20, 160]]
    assert cat["polygons"] == [[[0, 0], [16, 0], [16, 32]], [[2, 4], [4, 8]]]


def test_a_result_is_strict_json_and_a_nan_is_refused_where_it_is():
    # JavaScript's JSON.parse refuses NaN and Infinity: a result holding one must never be published
    with pytest.raises(ValueError, match=r"NaN or an infinity.*at result\.detections\[1\]\.box\[0\]"):
        result_json({"detections": [{"box": [1.0, 2.0]}, {"box": [float("nan"), 2.0], "score": 0.5}]})
    with pytest.raises(ValueError, match=r"at result\.score"):
        result_json({"score": np.float32("inf")})
    # a plug-in's numpy numbers and arrays are JSON's own
    encoded = result_json({"n": np.int64(3), "s": np.float32(0.5), "box": np.array([1, 2]), "ok": np.bool_(True)})
    assert json.loads(encoded) == {"n": 3, "s": 0.5, "box": [1, 2], "ok": True}
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        result_json({"bad": {1}})


def upstream(detections, meta: str | None = None) -> Frame:
    fields = {b"source": b"frames:{cam}", b"frame_id": b"1-0", b"ts": b"1",
              b"result": json.dumps({"detections": detections}, allow_nan=True).encode()}
    if meta is not None:
        fields[b"meta"] = meta.encode()
    frame = Frame("masks", "results:faces:frames:{cam}", "9-0", fields, 0)
    frame.parse_upstream_result()
    return frame


@pytest.mark.parametrize("box", [
    [float("nan"), 1, 2, 3],  # was model_error, from inside the model
    ["a", 2, 3, 4],
    [True, 2, 3, 4],
    [5, 1, 2, 3],  # inverted
    [1, 2, 3],
])
def test_an_upstream_box_the_model_cannot_take_is_bad_fields(box):
    with pytest.raises(FrameError) as refused:
        upstream([{"box": box, "label": "face"}])
    assert refused.value.reason == "bad_fields"


def test_meta_too_deep_for_the_json_reader_says_so():
    with pytest.raises(FrameError, match=f"nested more than {MAX_META_DEPTH} levels deep"):
        parsed("p", "s", "1-0", {b"image": b"x", b"meta": b'{"a":' * 5000 + b"1" + b"}" * 5000})


def test_meta_may_be_nested_up_to_max_meta_depth():
    meta = b'{"a":' * MAX_META_DEPTH + b"[]" + b"}" * MAX_META_DEPTH  # the innermost array is one more
    with pytest.raises(FrameError, match=f"nested more than {MAX_META_DEPTH} levels"):
        parsed("p", "s", "1-0", {b"image": b"x", b"meta": meta})
    meta = b'{"a":' * MAX_META_DEPTH + b"[1]" + b"}" * MAX_META_DEPTH
    with pytest.raises(FrameError):
        parsed("p", "s", "1-0", {b"image": b"x", b"meta": meta})
    meta = b'{"a":' * (MAX_META_DEPTH - 1) + b"[1, 2]" + b"}" * (MAX_META_DEPTH - 1)
    assert parsed("p", "s", "1-0", {b"image": b"x", b"meta": meta}).meta == meta


def test_an_upstream_result_nested_past_what_json_reads_is_bad_fields():
    fields = {b"source": b"frames:{cam}", b"frame_id": b"1-0", b"ts": b"1",
              b"result": b'{"detections": [], "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"}
    with pytest.raises(FrameError) as refused:
        Frame("masks", "results:faces:frames:{cam}", "9-0", fields, 0).parse_upstream_result()
    assert refused.value.reason == "bad_fields"


def test_an_upstream_meta_must_be_a_json_object_as_a_producers_must():
    assert upstream([{"box": [1, 2, 3, 4]}], meta='{"n": 1}').meta == b'{"n": 1}'
    with pytest.raises(FrameError, match="`meta` must be a JSON object") as refused:
        upstream([{"box": [1, 2, 3, 4]}], meta="[1]")  # was copied into the chained result
    assert refused.value.reason == "bad_fields"


@pytest.mark.parametrize("result,ts", [
    ('{"detections": [{"box": [1e400, 1, 2, 3]}]}', b"1"),  # inf, though no JSON constant
    ('{"detections": []}', b"-5"),  # ts as a producer's: 0 to 2^53 - 1
    ('{"detections": []}', str(2**53).encode()),
])
def test_an_upstream_entry_is_checked_as_strictly_as_a_producers(result, ts):
    fields = {b"source": b"frames:{cam}", b"frame_id": b"1-0", b"ts": ts, b"result": result.encode()}
    with pytest.raises(FrameError) as refused:
        Frame("masks", "results:faces:frames:{cam}", "9-0", fields, 0).parse_upstream_result()
    assert refused.value.reason == "bad_fields"


def test_a_chained_frame_is_aged_from_when_the_frame_itself_reached_redis():
    """A chained pipeline's entry is its upstream's result: its ID says when the result was
    written, not when the frame came (the upstream's own wait no longer counted)."""
    from sightstream.frames import is_stale, now_ms

    now = now_ms()
    result = {b"source": b"frames:{a}", b"frame_id": f"{now - 60_000}-0".encode(), b"ts": str(now).encode(),
              b"result": b'{"detections": []}'}
    frame = Frame("masks", "results:people:frames:{a}", f"{now}-0", result, now, arrived_ms=now)
    frame.parse_upstream_result()
    assert frame.arrived_ms == now - 60_000 and is_stale(frame, 5000)
    result[b"frame_id"] = b"12"  # a job's frame, by its index: its ts
    frame = Frame("masks", "results:people:frames:{a}", f"{now}-0", result, now)
    frame.parse_upstream_result()
    assert frame.arrived_ms is None and not is_stale(frame, 5000)
