"""A whole video's summary from its per-frame results, by a text model.

Each result becomes one timestamped line ("[01:23] a man opens a red door"): a caption or an
answer as it is, detections as counts per label, a classifier's best labels. The lines are
packed into windows that fit the text model's context, each window is summarised, and while
there is more than one summary, the summaries (labelled with the time they cover) are packed
and summarised again, until one is left. Every call of a level goes out at once, so they
are batched on the device (jobs/summaries.py sets how many windows share a model call).

Nothing here touches Redis or a model: `generate` is given (jobs/summaries.py passes the
daemon's batcher), so the windowing is tested on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sightstream.errors import SightstreamError
from sightstream.models.adapters.hf_text import TextBudget

DEFAULT_INSTRUCTION = (
    "Below are timestamped descriptions of frames from one video, in order (or summaries of "
    "its consecutive parts). Write a short summary of what happens in the video."
)
WIDEST_LABEL = "[23:59:59-23:59:59] "  # a summary's time label at its longest
FRAME_PROMPT_CHARS = 300


def instruction_for(summary_prompt: str, frame_prompt: str) -> str:
    """The text model's instruction: the job's `summarize.prompt` (or the default) and, when a
    prompted model described the frames (a question, labels to find), that prompt: without it
    answers such as "yes" or "2" say nothing. A long one (a list of labels) is cut: the window
    must keep room for the lines."""
    instruction = summary_prompt.strip() or DEFAULT_INSTRUCTION
    if shown := frame_prompt.strip():
        if len(shown) > FRAME_PROMPT_CHARS:
            shown = shown[:FRAME_PROMPT_CHARS].rstrip() + "…"
        instruction += f"\nEach frame's description was made for this prompt: {shown}"
    return instruction

Generate = Callable[[list[str]], Awaitable[list[str]]]


class SummaryFailed(SightstreamError):
    """The summary cannot be written; the sentence says why."""


@dataclass(frozen=True, slots=True)
class Line:
    """One result as text, at `t` seconds (into the video, or since the epoch for a stream)."""

    t: float
    text: str


@dataclass
class Summary:
    text: str
    from_s: float | None
    to_s: float | None
    lines: int  # results summarised
    windows: int  # calls of the first level
    levels: int  # 1: one call; more: summaries of summaries
    final: bool = False
    model: str = ""
    created_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(result: dict[str, Any]) -> str | None:
    """One result as a short text, or None when it says nothing a summary can use."""
    if isinstance(result.get("text"), str):
        return result["text"].strip() or None
    detections = result.get("detections")
    if isinstance(detections, list):
        counts = Counter(str(d.get("label", "object")) for d in detections if isinstance(d, dict))
        return ", ".join(f"{n} {label}" for label, n in counts.most_common()) or "nothing detected"
    labels = result.get("labels")
    if isinstance(labels, list) and labels:
        return ", ".join(f"{item.get('label')} ({float(item.get('score', 0)):.2f})"
                         for item in labels[:3] if isinstance(item, dict))
    masks = result.get("masks")
    if isinstance(masks, list):
        names = Counter(str(m.get("label", "object")) for m in masks if isinstance(m, dict))
        return ", ".join(f"{n} {label} mask" for label, n in names.most_common()) or "nothing segmented"
    return None  # depth maps and the like


def clock(t: float, video: bool) -> str:
    """A line's time: into the video as [h:]mm:ss, or a stream's UTC time of day."""
    if not video:
        return time.strftime("%H:%M:%S", time.gmtime(t))
    s = int(t)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def room_of(budget: TextBudget) -> int:
    """Tokens of lines one call may take. Raises SummaryFailed when that cannot hold three
    summaries (then summaries of summaries would not get shorter)."""
    room = budget.room * 19 // 20  # a margin: tokens counted line by line may merge when joined
    label = budget.count(WIDEST_LABEL) + 1
    if room < 3 * (budget.max_new_tokens + label):
        raise SummaryFailed(
            f"the text model's window ({budget.context_tokens} tokens) leaves {max(room, 0)} tokens for the "
            f"text, too few to summarise summaries of up to {budget.max_new_tokens} tokens: lower the "
            "model's max_new_tokens, shorten the instruction, or raise window_tokens (up to the model's "
            "context)")
    return room


async def summarize(lines: list[Line], budget: TextBudget, generate: Generate, video: bool = True) -> Summary:
    """The summary of `lines` (in time order). Raises SummaryFailed."""
    if not lines:
        raise SummaryFailed("none of the job's results says anything to summarise")
    # Counting tokens is CPU work: in a thread (the tokenizer is this budget's own).
    room = await asyncio.to_thread(room_of, budget)
    items = await asyncio.to_thread(_fitted, [(line.t, line.t, line.text) for line in lines], room, budget,
                                    video)
    levels, windows = 0, 0
    while True:
        packed = await asyncio.to_thread(_pack, items, room, budget)
        outs = await generate(["\n".join(text for _, _, text in window) for window in packed])
        if len(outs) != len(packed):
            raise SummaryFailed(f"the text model gave {len(outs)} answers to {len(packed)} windows")
        levels += 1
        windows = windows or len(packed)
        if len(packed) == 1:
            return Summary(outs[0].strip(), lines[0].t, lines[-1].t, len(lines), windows, levels)
        if len(packed) >= len(items):  # a guard against looping: _fitted leaves two items per window
            raise SummaryFailed("the summaries do not get shorter: lower the text model's max_new_tokens")
        items = await asyncio.to_thread(
            _fitted, [(w[0][0], w[-1][1], out.strip()) for w, out in zip(packed, outs)], room, budget, video)


def _fitted(items: list[tuple[float, float, str]], room: int, budget: TextBudget,
            video: bool) -> list[tuple[float, float, str]]:
    """Each (from, to, text) as "[time] text" (a span's label when from < to), the text cut at
    its end so the whole takes at most a third of the room: any window then holds two items or
    more, and each level is shorter."""
    limit = room // 3 - 1
    out = []
    for start, end, text in items:
        span = clock(start, video) if start == end else f"{clock(start, video)}-{clock(end, video)}"
        label = f"[{span}] "
        line = label + text
        while len(text) > 1 and (n := budget.count(line)) > limit:
            text = text[: max(1, int(len(text) * limit / n * 0.9))]
            line = label + text
        out.append((start, end, line))
    return out


def _pack(items: list[tuple[float, float, str]], room: int,
          budget: TextBudget) -> list[list[tuple[float, float, str]]]:
    """Consecutive items in windows of at most `room` tokens (one newline each between)."""
    windows: list[list[tuple[float, float, str]]] = []
    current: list[tuple[float, float, str]] = []
    used = 0
    for item in items:
        cost = budget.count(item[2]) + 1
        if current and used + cost > room:
            windows.append(current)
            current, used = [], 0
        current.append(item)
        used += cost
    if current:
        windows.append(current)
    return windows
