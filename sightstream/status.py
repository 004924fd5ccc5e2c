"""`sightstream status`: what the live page shows, in the terminal, from a running daemon's
control plane (its /health, /pipelines, /sources and /jobs)."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from sightstream.control_client import call


def gather(base: str, token: str) -> dict[str, Any]:
    pipelines = call(base, "/pipelines", token)["pipelines"]
    pending = {}  # (pipeline, source) -> group-wide pending entries
    for p in pipelines:
        for s in call(base, f"/pipelines/{urllib.parse.quote(p['name'])}", token)["sources"] or []:
            pending[f"{p['name']} {s['stream']}"] = s["pending"]
    sources = call(base, "/sources", token)["sources"]
    for s in sources:
        s["pending"] = pending.get(f"{s['pipeline']} {s['source']}")
    return {"health": call(base, "/health", token), "pipelines": pipelines, "sources": sources,
            "jobs": call(base, "/jobs?limit=20", token)["jobs"]}


def report(base: str, figures: dict[str, Any]) -> str:
    h = figures["health"]
    lines = [f"sightstream at {base}: consumer {h.get('consumer', '?')}, devices "
             f"{', '.join(h.get('devices', []))}, Redis {'ok' if h.get('redis', {}).get('ok') else 'DOWN'}"]
    rows = [["PIPELINE", "MODEL", "PROMPT", "FPS IN", "FPS OUT", "PENDING", "LAG", "DEAD", "P50/P99 MS"]]
    for p in figures["pipelines"]:
        lat = p["latency"]
        rows.append([p["name"], p["model"], f"v{p['prompt_version']}", f"{p['fps_in']:.1f}",
                     f"{p['fps_out']:.1f}", str(p["pending"]), "-" if p["lag"] is None else str(p["lag"]),
                     str(sum(p["counts"]["dead_lettered"].values())),
                     f"{_ms(lat['p50_ms'])}/{_ms(lat['p99_ms'])}"])
    lines += ["", *_table(rows)]
    rows = [["SOURCE", "PIPELINE", "RESULTS", "PENDING", "DEAD", "LATENCY", "LATEST"]]
    for s in figures["sources"]:
        pending = "-" if s.get("pending") is None else str(s["pending"])
        rows.append([s["source"], s["pipeline"], str(s["seq"]), pending, str(s["dead_lettered"]),
                     f"{s['latency_ms']} ms", s["summary"]])
    lines += ["", *_table(rows)] if len(rows) > 1 else ["", "no results on this daemon yet"]
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


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.0f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def status(base: str, token: str, as_json: bool = False, emit: Callable[[str], None] = print) -> int:
    figures = gather(base, token)
    emit(json.dumps(figures, indent=2) if as_json else report(base, figures))
    return 0
