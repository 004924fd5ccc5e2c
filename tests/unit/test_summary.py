"""The summary's windows and levels, with a counted budget and a recording text model."""

from __future__ import annotations

import pytest

from sightstream.jobs.summary import Line, SummaryFailed, clock, describe, summarize
from sightstream.models.adapters.hf_text import TextBudget


def words(text: str) -> int:
    return len(text.split())


class Recorder:
    """A text model that answers each text with `answer_words` words, recording its calls."""

    def __init__(self, answer_words: int = 3) -> None:
        self.calls: list[list[str]] = []
        self.answer_words = answer_words

    async def __call__(self, texts: list[str]) -> list[str]:
        self.calls.append(texts)
        n = len(self.calls)
        return [" ".join([f"s{n}.{i}"] * self.answer_words) for i in range(len(texts))]


def budget(context: int, max_new: int = 4, overhead: int = 0) -> TextBudget:
    return TextBudget(context, max_new, overhead, words)


async def test_lines_that_fit_are_summarised_in_one_call():
    model = Recorder()
    lines = [Line(i, f"a dog at {i}") for i in range(5)]
    summary = await summarize(lines, budget(200), model)
    assert len(model.calls) == 1 and len(model.calls[0]) == 1
    assert model.calls[0][0].splitlines() == [f"[00:{i:02d}] a dog at {i}" for i in range(5)]
    assert (summary.text, summary.lines, summary.windows, summary.levels) == ("s1.0 s1.0 s1.0", 5, 1, 1)
    assert (summary.from_s, summary.to_s) == (0, 4)


async def test_long_videos_go_in_windows_then_summaries_of_summaries():
    model = Recorder()
    lines = [Line(60 * i, f"event number {i} happens here") for i in range(100)]  # 6 words a line
    room = budget(100, max_new=4, overhead=2).room * 19 // 20
    summary = await summarize(lines, budget(100, max_new=4, overhead=2), model)
    first = model.calls[0]
    assert len(first) > 1  # one call of several windows: batched together
    seen = [line for window in first for line in window.splitlines()]
    assert seen == [f"[{clock(60 * i, True)}] event number {i} happens here" for i in range(100)]  # each once, in order
    assert all(sum(words(x) + 1 for x in w.splitlines()) <= room for w in first)
    second = model.calls[1][0].splitlines()
    assert second[0].startswith("[00:00-") and "s1.0" in second[0]
    assert summary.windows == len(first) and summary.levels == len(model.calls) >= 2
    assert all(len(call) < len(before) for before, call in zip(model.calls, model.calls[1:]))
    assert len(model.calls[-1]) == 1 and summary.text.startswith(f"s{len(model.calls)}.0")


async def test_a_caption_longer_than_a_window_is_cut_not_dropped():
    model = Recorder()
    lines = [Line(0, "word " * 500), Line(1, "short")]
    await summarize(lines, budget(100), model)
    text = model.calls[0][0].splitlines()
    assert len(text) == 2 and text[0].startswith("[00:00] word") and words(text[0]) <= 100 // 3
    assert text[1] == "[00:01] short"


async def test_too_short_a_window_says_so_and_nothing_is_called():
    model = Recorder()
    with pytest.raises(SummaryFailed, match=r"window \(40 tokens\).*lower the model's max_new_tokens"):
        await summarize([Line(0, "a")], budget(40, max_new=16), model)
    assert model.calls == []


async def test_no_lines_no_call():
    model = Recorder()
    with pytest.raises(SummaryFailed, match="says anything to summarise"):
        await summarize([], budget(100), model)
    assert model.calls == []


def test_each_kind_of_result_as_a_line():
    assert describe({"text": " a cat "}) == "a cat"
    assert describe({"detections": [{"label": "dog"}, {"label": "cat"}, {"label": "dog"}]}) == "2 dog, 1 cat"
    assert describe({"detections": []}) == "nothing detected"
    assert describe({"labels": [{"label": "tabby", "score": 0.91}, {"label": "lynx", "score": 0.05}]}) \
        == "tabby (0.91), lynx (0.05)"
    assert describe({"masks": [{"label": "person"}]}) == "1 person mask"
    assert describe({"width": 1, "height": 1, "min": 0, "max": 1}) is None


def test_clock():
    assert clock(75.4, True) == "01:15" and clock(3725, True) == "1:02:05"
    assert clock(0, False) == "00:00:00" and clock(86400 + 3661, False) == "01:01:01"


def test_the_instruction_carries_the_frames_prompt():
    from sightstream.jobs.summary import DEFAULT_INSTRUCTION, FRAME_PROMPT_CHARS, instruction_for

    assert instruction_for("", "") == DEFAULT_INSTRUCTION
    assert instruction_for("  Be brief. ", "") == "Be brief."
    asked = instruction_for("Be brief.", "Is the door open?")
    assert asked.startswith("Be brief.\n") and asked.endswith("prompt: Is the door open?")
    long = instruction_for("", "cat, " * 200)
    assert long.endswith("…") and len(long) < len(DEFAULT_INSTRUCTION) + FRAME_PROMPT_CHARS + 80


def test_the_summarize_command_shows_each_periodic_summary_once_and_in_order(monkeypatch):
    """One new summary since the last poll is the job's latest; several (a failed poll between)
    are read from its results stream; the final one is left for the end; a failed read takes
    nothing."""
    from sightstream import summarize
    from sightstream.errors import SightstreamError

    def summary(n, final=False):
        return {"text": f"s{n}", "created_at": float(n), "final": final}

    stream = [summary(1), {"task": "caption"}, summary(2), summary(3)]
    pages: list[str] = []
    fail = []

    def call(base, path, token):
        pages.append(path)
        if fail:
            raise SightstreamError("the daemon went away")
        after = int(path.split("after=")[1]) if "after=" in path else -1
        rows = [{"id": str(i), "fields": {"task": "summary", "result": s} if "text" in s else {"task": "caption"}}
                for i, s in enumerate(stream) if i > after]
        return {"results": rows}

    monkeypatch.setattr(summarize, "call", call)
    seen = summarize._Summaries("http://d", "", "j")

    def job(count, latest):
        return {"counts": {"summaries": count}, "summary": latest}

    assert [s["text"] for s in seen.new(job(1, summary(1)))] == ["s1"] and not pages  # the field alone
    assert seen.new(job(1, summary(1))) == []
    fail.append(True)
    with pytest.raises(SightstreamError):
        seen.new(job(3, summary(3)))
    fail.clear()
    assert [s["text"] for s in seen.new(job(3, summary(3)))] == ["s2", "s3"]  # s1 not again
    assert seen.new(job(4, summary(4, final=True))) == []  # the final one is printed at the end
