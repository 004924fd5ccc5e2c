"""`sightstream tail`'s one line per entry, for each kind of entry."""

from __future__ import annotations

import json

from sightstream.tail import summarize


def test_each_kind_of_entry_reads_as_one_line():
    detect = {"task": "detect", "latency_ms": "12", "result": json.dumps(
        {"detections": [{"label": "dog", "score": 0.9}, {"label": "dog", "score": 0.8}]})}
    assert summarize(detect) == "detect      12 ms  2 x dog (0.90, 0.80)"
    caption = {"task": "caption", "latency_ms": "40", "result": json.dumps({"text": "a dog"})}
    assert summarize(caption) == "caption     40 ms  'a dog'"
    classify = {"task": "classify", "latency_ms": "3", "result": json.dumps(
        {"labels": [{"label": "tabby", "score": 0.91}, {"label": "lynx", "score": 0.05}]})}
    assert summarize(classify) == "classify      3 ms  tabby (0.91), lynx (0.05)"
    summary = {"task": "summary", "result": json.dumps({"text": "Dogs play.", "lines": 30, "final": True})}
    assert summarize(summary) == "summary of 30 results: 'Dogs play.'"
    dead = {"reason": "bad_image", "error": "the JPEG image cannot be decoded"}
    assert summarize(dead) == "DEAD-LETTER bad_image: the JPEG image cannot be decoded"


def test_an_entry_of_another_shape_is_shown_not_crashed_on():
    """A glob such as results:* can reach other writers' streams: each of these was a traceback."""
    from sightstream.tail import _decode

    odd_score = {"task": "classify", "result": json.dumps({"labels": [{"label": "cat", "score": "high"}]})}
    assert summarize(odd_score).startswith("(not a sightstream result) ")
    odd_labels = {"task": "classify", "result": json.dumps({"labels": [1, 2]})}
    assert summarize(odd_labels).startswith("(not a sightstream result) ")
    assert _decode({b"\xffname": b"v", b"ok": b"\xff"}) == {"\\xffname": "v", "ok": {"base64": "/w=="}}


def test_json_lines_carry_result_and_meta_as_values_and_binary_as_base64(redis_url, sync_redis):
    from sightstream.tail import tail

    sync_redis.xadd("results:t", {"result": '{"detections": []}', "meta": '{"cam": 1}', "mask": b"\x89PNG\xff"})
    sync_redis.xadd("results:t", {"reason": "bad_fields", "meta": "not json"})
    lines: list[str] = []
    assert tail(redis_url, "results:t", start="0", count=2, as_json=True, emit=lines.append) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["result"] == {"detections": []} and first["meta"] == {"cam": 1}
    assert first["mask"] == {"base64": "iVBOR/8="} and first["stream"] == "results:t"
    assert second["meta"] == "not json"  # as it was, when it is not JSON
