"""`sightstream status` against a running daemon's control plane over a real socket."""

from __future__ import annotations

import asyncio

import pytest

from sightstream import cli
from sightstream.daemon.embedded_redis import free_port
from sightstream.status import status
from tests.conftest import encode
from tests.integration.helpers import serving, settings_for, wait_for

pytestmark = pytest.mark.integration


async def test_status_shows_pipelines_sources_and_says_why_it_cannot(redis_url, sync_redis, tmp_path,
                                                                      gradient, capsys):
    settings = settings_for(redis_url, tmp_path, control={"token": "s3cret"})
    async with serving(settings) as (d, client):
        sync_redis.xadd("frames:{cam1}", {"image": encode(gradient)})
        await wait_for(lambda: d.snapshots.get("people", "frames:{cam1}") is not None, what="a result")
        base = str(client.make_url("")).rstrip("/")
        lines: list[str] = []
        assert await asyncio.to_thread(status, base, "s3cret", False, lines.append) == 0
        text = lines[0]
        assert f"sightstream at {base}: consumer testhost:0, devices cpu, Redis ok" in text
        people = next(line for line in text.splitlines() if line.startswith("people "))
        assert people.split()[:3] == ["people", "tiny/det", "v1"]
        cam = next(line for line in text.splitlines() if line.startswith("frames:{cam1}"))
        assert cam.split()[1:5] == ["people", "1", "0", "0"] and cam.endswith("1 x dog")  # results, pending, dead

        # every source of the group, also one the page does not keep (only dead letters: the
        # camera that needs attention) and beyond the page's `page_sources`
        sync_redis.xadd("frames:{broken}", {"image": b"not an image"})
        await wait_for(lambda: sync_redis.xlen("deadletter:people:frames:{broken}") == 1)
        await wait_for(lambda: "frames:{broken}" in d.runs["people"].ingest.found)
        lines.clear()
        assert await asyncio.to_thread(status, base, "s3cret", False, lines.append) == 0
        broken = next(line for line in lines[0].splitlines() if line.startswith("frames:{broken}"))
        assert broken.split()[1:5] == ["people", "-", "0", "1"]  # its dead-letter shows (it showed "-")

        code = await asyncio.to_thread(cli.main, ["status", "--url", base, "--token", "wrong"])
        assert code == 1 and "401 missing or wrong bearer token" in capsys.readouterr().err
    code = await asyncio.to_thread(cli.main, ["status", "--url", f"http://127.0.0.1:{free_port()}"])
    assert code == 1 and "no sightstream control plane answers" in capsys.readouterr().err


def test_status_does_not_wait_on_redis_again_once_it_is_known_down(monkeypatch):
    """With a hung Redis each figure waits out its bound: status took 15 s, 3 s more per
    pipeline. Once /pipelines says Redis cannot be asked, nothing more that needs it is asked."""
    from sightstream import status

    asked: list[str] = []
    down = "redis is unreachable: no answer within 3 s"
    answers = {
        "/health": {"redis": {"ok": False}, "devices": ["cpu"]},
        "/pipelines": {"pipelines": [{"name": "people", "redis_error": down},
                                     {"name": "cars", "redis_error": down}]},
        "/sources": {"sources": [{"pipeline": "people", "source": "frames:{a}"}]},
    }

    def call(base, path, token, *args):
        asked.append(path)
        return answers[path]

    monkeypatch.setattr(status, "call", call)
    figures = status.gather("http://x", "")
    assert asked == ["/health", "/pipelines", "/sources"]
    assert figures["jobs_error"] == down and [s["source"] for s in figures["sources"]] == ["frames:{a}"]


def test_status_names_the_daemon_reading_each_tracked_source():
    """A tracking pipeline has one reader per source: status says which daemon, and adds no
    column where no pipeline has one."""
    from sightstream import status

    pipeline = {"name": "tracks", "model": "tiny/track", "prompt_version": 1, "fps_in": 0.0, "fps_out": 0.0,
                "pending": 0, "lag": 0, "counts": {"dead_lettered": {}},
                "latency": {"p50_ms": None, "p99_ms": None}}
    sources = [{"pipeline": "tracks", "source": "frames:{a}", "pending": 0, "reader": "gpu-host-2:0"},
               {"pipeline": "tracks", "source": "frames:{b}", "pending": 0, "reader": None}]
    figures = {"health": {"consumer": "gpu-host-1:0", "devices": ["cpu"], "redis": {"ok": True}},
               "pipelines": [pipeline], "sources": sources, "jobs": []}
    lines = status.report("http://x", figures).splitlines()
    header = next(line for line in lines if line.startswith("SOURCE"))
    assert header.split()[:4] == ["SOURCE", "PIPELINE", "READ", "BY"]
    assert next(line for line in lines if line.startswith("frames:{a}")).split()[:3] == [
        "frames:{a}", "tracks", "gpu-host-2:0"]
    assert next(line for line in lines if line.startswith("frames:{b}")).split()[:3] == [
        "frames:{b}", "tracks", "-"]
    for s in sources:
        s["reader"] = None
    header = next(line for line in status.report("http://x", figures).splitlines() if line.startswith("SOURCE"))
    assert "READ BY" not in header
