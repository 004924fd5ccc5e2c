"""The live page: GET / in a real browser (Debian's chromium, headless) against a running daemon
fed with frames; the snapshot images over HTTP (decode, ETag, 304, change); the token."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from sightstream import keys
from sightstream.daemon.embedded_redis import EmbeddedRedis
from sightstream.jobs.store import JobSpec
from tests.conftest import encode
from tests.integration.helpers import serving, settings_for, wait_for

pytestmark = pytest.mark.integration
TOKEN = "page-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SOURCES = ["frames:{door}", "frames:{yard}"]


def scene(shade: int) -> bytes:
    y, x = np.mgrid[0:240, 0:320]
    image = np.stack([x * 0.8, y, np.full_like(x, shade)], axis=-1).astype(np.uint8)
    return encode(image)


def page_settings(redis_url, tmp_path):
    return settings_for(redis_url, tmp_path, control={"token": TOKEN})


async def test_snapshots_over_http_decode_change_and_answer_304(redis_url, sync_redis, tmp_path):
    async with serving(page_settings(redis_url, tmp_path)) as (d, client):
        for source in SOURCES:
            sync_redis.xadd(source, {"image": scene(40)})
        await wait_for(lambda: len(d.snapshots.list()) == 2, what="two sources' results")
        assert (await client.get("/sources")).status == 401
        page = await client.get("/")  # open: it holds no data; never framed by another site
        assert page.status == 200 and page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
        listed = (await (await client.get("/sources", headers=AUTH)).json())["sources"]
        assert [s["source"] for s in listed] == SOURCES
        assert all(s["summary"] == "1 x dog" and s["task"] == "detect" and s["seq"] == 1 for s in listed)
        assert all(s["dead_lettered"] == 0 and s["read"] == 1 for s in listed)
        sync_redis.xadd("frames:{yard}", {"image": b"not an image"})
        await wait_for(lambda: d.snapshots.dead_count("people", "frames:{yard}") == 1, what="a dead-letter")
        yard = next(s for s in (await (await client.get("/sources", headers=AUTH)).json())["sources"]
                    if s["source"] == "frames:{yard}")
        assert yard["dead_lettered"] == 1 and yard["seq"] == 1 and yard["read"] == 2

        url = "/sources/people/frames:%7Bdoor%7D/latest.jpg"
        assert (await client.get(url)).status == 401
        first = await client.get(url, headers=AUTH)
        assert first.status == 200 and first.content_type == "image/jpeg"
        etag = first.headers["ETag"]
        assert etag == f'"{d.snapshots.get("people", "frames:{door}").version}"'
        image = Image.open(io.BytesIO(await first.read()))
        assert image.size == (320, 240)
        for match in (etag, f"W/{etag}", '"0", ' + etag, "*"):  # weak, listed, any: the same
            again = await client.get(url, headers={**AUTH, "If-None-Match": match})
            assert again.status == 304, match

        sync_redis.xadd("frames:{door}", {"image": scene(220)})
        await wait_for(lambda: d.snapshots.get("people", "frames:{door}").seq == 2, what="the next result")
        changed = await client.get(url, headers={**AUTH, "If-None-Match": etag})
        assert changed.status == 200 and changed.headers["ETag"] != etag
        later = np.asarray(Image.open(io.BytesIO(await changed.read())), dtype=np.int16)
        assert abs(later[..., 2].mean() - np.asarray(image, dtype=np.int16)[..., 2].mean()) > 100

        missing = await client.get("/sources/people/frames:%7Bnone%7D/latest.jpg", headers=AUTH)
        assert missing.status == 404 and "no result" in (await missing.json())["error"]["message"]
        home = await client.get("/")
        assert home.status == 200 and "text/html" in home.content_type  # no token: the page asks
        assert "http" not in re.sub(r"https?://\S*localhost|//\s", "", await home.text())  # nothing from elsewhere


@pytest.mark.timeout(90)
def browser(tmp_path) -> list[str]:
    """Headless chromium's command line, to which --dump-dom or --screenshot and a URL are added."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run does)")
    return [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1280,900", "--virtual-time-budget=6000", f"--user-data-dir={tmp_path / 'profile'}"]


async def test_the_page_in_a_real_browser(redis_url, sync_redis, tmp_path):
    common = browser(tmp_path)
    async with serving(page_settings(redis_url, tmp_path)) as (d, client):
        for shade, source in zip((60, 180), SOURCES):
            sync_redis.xadd(source, {"image": scene(shade)})
        await wait_for(lambda: len(d.snapshots.list()) == 2, what="two sources' results")
        job = await d.jobs.create(JobSpec("redis://yard:{cam}", "tiny/det", max_seconds=1))
        sync_redis.hset(keys.job(job.id), "summary", json.dumps(
            {"text": "Two dogs cross the yard.", "from_s": 0, "to_s": 1, "lines": 2, "windows": 1, "levels": 1,
             "final": True, "model": "llm/tiny", "created_at": 0}))
        url = f"{client.make_url('/')}#token={TOKEN}"
        screenshot = Path(os.environ.get("SIGHTSTREAM_TEST_PAGE_SCREENSHOT", tmp_path / "page.png"))
        dom = await run(*common, "--dump-dom", url)
        await run(*common, f"--screenshot={screenshot}", url)
        alone = await run(*common, "--dump-dom", f"{url}&source=people%20frames:%7Byard%7D")
    tiles = re.findall(r'<div class="tile[^"]*" data-pipeline="people" data-source="([^"]+)">', dom)
    assert sorted(tiles) == SOURCES
    # both images fetched and decoded by the browser (their natural width is the frame's)
    assert len(re.findall(r'<img alt="" src="blob:[^"]+" data-width="320" data-seq="1">', dom)) == 2
    assert 'data-pipeline="people"><td>people</td><td>tiny/det</td>' in dom  # the pipeline table
    assert "1 x dog" in dom and "2 sources" in dom
    assert '<blockquote class="summary">summary: Two dogs cross the yard.</blockquote>' in dom  # under its job
    assert '<body class="solo">' in alone  # #source= opens one source alone, large
    assert re.findall(r'<div class="tile big" data-pipeline="people" data-source="([^"]+)">', alone) == [
        "frames:{yard}"]
    shot = np.asarray(Image.open(screenshot).convert("RGB"))
    assert shot.shape[:2] == (900, 1280) and shot.std() > 10  # something was drawn


async def test_the_page_says_when_redis_is_down_and_keeps_what_it_showed(tmp_path):
    common = browser(tmp_path)
    with EmbeddedRedis() as server:
        async with serving(page_settings(server.url, tmp_path)) as (d, client):
            with redis.Redis.from_url(server.url) as producer:
                producer.xadd(SOURCES[0], {"image": scene(60)})
            await wait_for(lambda: len(d.snapshots.list()) == 1, what="a source's result")
            server.stop()
            dom = await run(*common, "--dump-dom", f"{client.make_url('/')}#token={TOKEN}")
    status = re.search(r'<span id="status" class="([^"]*)">([^<]*)</span>', dom)
    assert status is not None and status[1] == "trouble"
    assert status[2].startswith("Redis is unreachable: this daemon's own figures only · 1 sources · updated")
    # the daemon's own figures and latest frame are still shown
    assert 'data-pipeline="people"><td>people</td><td>tiny/det</td>' in dom
    assert re.findall(r'<div class="tile" data-pipeline="people" data-source="([^"]+)">', dom) == [SOURCES[0]]


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()
