"""`sightstream status`: what the live page shows, in the terminal, from a running daemon's
control plane (its /health, /pipelines, /sources and /jobs)."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from sightstream.control_client import ControlError, call


def gather(base: str, token: str) -> dict[str, Any]:
    """Every figure the page shows. With Redis down the daemon still answers with its own
    figures (the group-wide ones null) and the jobs are unknown: `jobs_error` says why."""
    health = call(base, "/health", token)
    pipelines = call(base, "/pipelines", token)["pipelines"]
    cached = {(s["pipeline"], s["source"]): s for s in call(base, "/sources", token)["sources"]}
    sources: list[dict[str, Any]] = []
    videos: list[dict[str, Any]] = []
    for p in pipelines:
        # every stream of the group (the page keeps only its latest `page_sources`), cached or
        # not; not asked while Redis cannot be (each ask would wait on it again)
        path = f"/pipelines/{urllib.parse.quote(p['name'])}"
        detail = None if p.get("redis_error") else call(base, path, token)
        # by source: a chained pipeline's stream is its upstream's results of the source
        listed = {s.get("source", s["stream"]): s for s in detail["sources"]} if detail is not None else {}
        names = [*listed, *sorted(src for pipe, src in cached if pipe == p["name"] and src not in listed)]
        if detail is not None:  # a pipeline's video inputs (cameras by URL): read or not, by whom
            videos += [{"pipeline": p["name"], **v} for v in detail.get("videos", [])]
        for name in names:
            group = listed.get(name, {})
            # a camera that sends only bad frames has no tile (no result) but has its dead count
            sources.append({"pipeline": p["name"], "source": name, "pending": group.get("pending"),
                            "reader": group.get("reader"), "dead_lettered": group.get("dead_lettered"),
                            **{k: v for k, v in cached.get((p["name"], name), {}).items()
                               if k not in ("pipeline", "source")}})
    figures: dict[str, Any] = {"health": health, "pipelines": pipelines, "sources": sources, "videos": videos}
    down = next((p["redis_error"] for p in pipelines if p.get("redis_error")), None)
    if down is not None:  # the jobs live in Redis: asking would wait out the daemon's bound
        figures["jobs"], figures["jobs_error"] = [], down
        return figures
    try:
        figures["jobs"] = call(base, "/jobs?limit=20", token)["jobs"]
    except ControlError as e:
        if e.status != 503:
            raise
        figures["jobs"], figures["jobs_error"] = [], str(e)
    return figures


def report(base: str, figures: dict[str, Any]) -> str:
    h = figures["health"]
    lines = [f"sightstream at {base}: consumer {h.get('consumer', '?')}, devices "
             f"{', '.join(h.get('devices', []))}, Redis {'ok' if h.get('redis', {}).get('ok') else 'DOWN'}"]
    unknown = next((p["redis_error"] for p in figures["pipelines"] if p.get("redis_error")), None)
    if unknown:
        lines.append(f"group-wide figures (PENDING, LAG) unknown: {unknown}")
    rows = [["PIPELINE", "MODEL", "PROMPT", "FPS IN", "FPS OUT", "PENDING", "LAG", "DEAD", "P50/P99 MS"]]
    for p in figures["pipelines"]:
        lat = p["latency"]
        rows.append([p["name"], p["model"], f"v{p['prompt_version']}", f"{p['fps_in']:.1f}",
                     f"{p['fps_out']:.1f}", _or_dash(p["pending"]), _or_dash(p["lag"]),
                     str(sum(p["counts"]["dead_lettered"].values())),
                     f"{_ms(lat['p50_ms'])}/{_ms(lat['p99_ms'])}"])
    lines += ["", *_table(rows)]
    lines += [f"PAUSED {p['name']}: {p['paused']}" for p in figures["pipelines"] if p.get("paused")]
    # READ BY only where a pipeline has one reader per source (tracking): the others' sources
    # are read by every daemon of the group
    read_by = any(s.get("reader") for s in figures["sources"])
    rows = [["SOURCE", "PIPELINE", *(["READ BY"] if read_by else []), "RESULTS", "PENDING", "DEAD",
             "LATENCY", "LATEST"]]
    for s in figures["sources"]:
        latency = "-" if s.get("latency_ms") is None else f"{s['latency_ms']} ms"
        rows.append([s["source"], s["pipeline"], *([_or_dash(s.get("reader"))] if read_by else []),
                     _or_dash(s.get("seq")), _or_dash(s.get("pending")), _or_dash(s.get("dead_lettered")),
                     latency, s.get("summary", "")])
    lines += ["", *_table(rows)] if len(rows) > 1 else ["", "no sources yet"]
    if figures.get("videos"):  # an input nobody reads (pending) or that keeps failing shows here
        rows = [["VIDEO INPUT", "PIPELINE", "STATUS", "READ BY", "RESULTS", "LAST FRAME", "LAST ERROR"]]
        rows += [[v["url"], v["pipeline"], v["status"], v.get("holder") or "-", str(v["processed"]),
                  _or_dash(v.get("last_frame_at")), _or_dash(v.get("last_error"))] for v in figures["videos"]]
        lines += ["", *_table(rows)]
    if figures.get("jobs_error"):
        lines += ["", f"jobs unknown: {figures['jobs_error']}"]
    if figures["jobs"]:
        rows = [["JOB", "STATUS", "DONE", "FRAMES", "SOURCE"]]
        rows += [[j["job_id"], j["status"], _percent(j["progress"].get("fraction")),
                  str(j["counts"]["processed"]), j["source"]] for j in figures["jobs"]]
        lines += ["", *_table(rows)]
        for j in figures["jobs"]:
            if j.get("summary"):
                kind = "summary" if j["summary"]["final"] else "summary so far"
                lines += ["", f"{kind} of job {j['job_id']}: {j['summary']['text']}"]
    return "\n".join(lines)


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _table(rows: list[list[str]]) -> list[str]:
    rows = [[_printable(cell) for cell in r] for r in rows]  # a newline in a stream name breaks no row
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def status(base: str, token: str, as_json: bool = False, emit: Callable[[str], None] = print) -> int:
    figures = gather(base, token)
    emit(json.dumps(figures, indent=2) if as_json else report(base, figures))
    return 0
