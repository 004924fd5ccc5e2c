"""The control plane over a real socket: health, readiness, metrics, JSON errors, auth."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest

from sightstream.control.app import make_app
from sightstream.control.state import OPENAPI
from sightstream.daemon.daemon import Daemon
from sightstream.daemon.embedded_redis import free_port
from tests.conftest import encode
from tests.integration.helpers import client_for, serving, settings_for, wait_for

pytestmark = pytest.mark.integration



async def test_health_ready_and_metrics(redis_url, sync_redis, tmp_path, gradient):
    async with serving(settings_for(redis_url, tmp_path)) as (daemon, client):
        r = await client.get("/health/live")
        assert r.status == 200 and (await r.json())["status"] == "ok"
        r = await client.get("/health/ready")
        assert r.status == 200
        for _ in range(3):
            sync_redis.xadd("frames:{m}", {"image": encode(gradient)})
        sync_redis.xadd("frames:{m}", {"image": b"junk"})
        await wait_for(lambda: sync_redis.xlen("results:people:frames:{m}") == 3
                       and sync_redis.exists("deadletter:people:frames:{m}"))
        health = await (await client.get("/health")).json()
        assert health["status"] == "ok" and health["redis"]["ok"]
        assert health["devices"] == ["cpu"] and health["workers"][0]["batches"] >= 1
        assert health["models"][0]["model"] == "tiny/det"
        (pipeline,) = health["pipelines"]
        assert pipeline["name"] == "people" and "frames:{m}" in pipeline["streams"]
        text = await (await client.get("/metrics")).text()
        assert 'sightstream_frames_published_total{pipeline="people"} 3.0' in text
        assert 'sightstream_frames_dead_lettered_total{pipeline="people",reason="unsupported_format"} 1.0' in text
        assert 'sightstream_frames_in_total{pipeline="people"} 4.0' in text
        assert 'sightstream_frames_in_flight{pipeline="people"} 0.0' in text  # all acknowledged
        assert "sightstream_batch_size_bucket" in text
        assert "sightstream_inference_seconds_bucket" in text
        assert "sightstream_e2e_latency_seconds_bucket" in text


async def test_ready_is_503_while_redis_is_unreachable(tmp_path):
    settings = settings_for(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    daemon = Daemon(settings)
    starting = asyncio.create_task(daemon.start())  # retries, never fails, while Redis is down
    client = await client_for(daemon)
    try:
        r = await client.get("/health/ready")
        body = await r.json()
        assert r.status == 503 and body["problems"][0].startswith("redis is unreachable: Error "), body
        assert (await client.get("/health/live")).status == 200
        assert (await (await client.get("/health")).json())["status"] == "degraded"
        assert not starting.done()
    finally:
        await client.close()
        daemon.stop_event.set()
        await starting
        await daemon.stop()


async def test_readiness_tells_redis_s_error_only_to_token_holders(tmp_path):
    """Open to probes, /health/ready gave anyone who could reach it Redis's host and port (and
    a TLS certificate's detail) once a token guarded the rest."""
    settings = settings_for(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    settings = settings.model_copy(update={"control": settings.control.model_copy(update={"token": "s3cret"})})
    daemon = Daemon(settings)
    starting = asyncio.create_task(daemon.start())
    client = await client_for(daemon)
    try:
        stranger = await (await client.get("/health/ready")).json()
        assert stranger["problems"] == ["redis is unreachable", "workers are not up"], stranger
        r = await client.get("/health/ready", headers={"Authorization": "Bearer s3cret"})
        assert r.status == 503 and (await r.json())["problems"][0].startswith("redis is unreachable: Error ")
    finally:
        await client.close()
        daemon.stop_event.set()
        await starting
        await daemon.stop()


async def test_unknown_routes_are_json_errors(redis_url, tmp_path):
    daemon = Daemon(settings_for(redis_url, tmp_path))
    client = await client_for(daemon)
    try:
        r = await client.get("/no/such/route")
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"
        r = await client.post("/health/live")
        assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
    finally:
        await client.close()
        await daemon.stop()


async def test_a_token_guards_everything_but_the_probes_metrics_and_the_page(redis_url, tmp_path):
    settings = settings_for(redis_url, tmp_path)
    settings = settings.model_copy(update={"control": settings.control.model_copy(update={"token": "s3cret"})})
    daemon = Daemon(settings)
    client = await client_for(daemon)
    try:
        # Every documented route, called without the token: only the probes, metrics and the
        # live page (which holds no data and asks for the token itself) answer. /health tells
        # the models, pipelines and Redis: it needs the token.
        doc = make_app(daemon)[OPENAPI]
        for path, operations in doc["paths"].items():
            for method in operations:
                r = await client.request(method.upper(), path.replace("{", "").replace("}", ""))
                if path in ("/health/live", "/health/ready", "/metrics", "/"):
                    assert r.status != 401, path
                else:
                    assert r.status == 401, (method, path)
                    assert (await r.json())["error"]["code"] == "unauthorized"
        r = await client.get("/pipelines", headers={"Authorization": "Bearer wrong"})
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        r = await client.get("/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert r.status == 200
        for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive, the token is not
            assert (await client.get("/pipelines", headers={"Authorization": f"{scheme} s3cret"})).status == 200
        for wrong in ("Bearer S3CRET", "Basic s3cret", "s3cret", "Bearer", "Bearer  "):
            assert (await client.get("/pipelines", headers={"Authorization": wrong})).status == 401, wrong
        # HEAD asks what GET does (a load balancer's probe): open where GET is (it was 401)
        for path in ("/health/live", "/metrics", "/"):
            assert (await client.head(path)).status == 200, path
        assert (await client.head("/pipelines")).status == 401
        # with a token, a page elsewhere cannot send it cross-site: no Origin or Host check
        r = await client.post("/jobs", data=b"{}", headers={
            "Authorization": "Bearer s3cret", "Origin": "http://tool.example", "Host": "sightstream.example"})
        assert r.status == 422
    finally:
        await client.close()
        await daemon.stop()


async def test_without_a_token_web_pages_can_neither_change_nor_read_the_daemon(redis_url, tmp_path):
    """With no token, a page the operator has open could POST to 127.0.0.1 (a form, or JSON as
    text/plain: it made a job of a URL of the page's choosing), and a page whose name is rebound
    to 127.0.0.1 could read the answers. Programs of this host (no Origin) are served as before."""
    settings = settings_for(redis_url, tmp_path, control={"port": 0, "allowed_host_names": ["sightstream"]})
    async with serving(settings) as (d, client):
        job = b'{"source": "http://169.254.169.254/latest/meta-data/", "model": "tiny/det"}'
        r = await client.post("/jobs", data=job, headers={"Origin": "http://attacker.example",
                                                          "Content-Type": "text/plain"})
        assert r.status == 403 and "web page at http://attacker.example cannot change" in (
            await r.json())["error"]["message"]
        r = await client.post("/models/tiny/det/load", headers={"Origin": "null"})  # a sandboxed page
        assert r.status == 403
        r = await client.get("/pipelines", headers={"Host": f"attacker.example:{client.port}"})
        assert r.status == 403 and "not a name of this daemon" in (await r.json())["error"]["message"]
        assert (await client.post("/jobs", data=job, headers={"Host": "rebound.example"})).status == 403
        # the routes open with a token too answer any name (a load balancer's, Prometheus's)
        for path in ("/health/live", "/metrics", "/"):
            assert (await client.get(path, headers={"Host": "gpu-7.cluster.example"})).status == 200, path
        # this host's programs, and the live page itself (its Origin is the host it asks)
        # an address (no page can be rebound to one), loopback names, the names listed
        for host in (f"localhost:{client.port}", f"127.0.0.1:{client.port}", f"[::1]:{client.port}",
                     f"10.1.2.3:{client.port}", f"sightstream:{client.port}", "SightStream"):
            assert (await client.get("/pipelines", headers={"Host": host})).status == 200, host
        for bad in ({"Host": "[abc"}, {"Host": "x:port"}, {"Origin": "http://[x"}):  # a 400, not a 500
            assert (await client.post("/jobs", json={}, headers=bad)).status == 400, bad
        assert (await client.post("/jobs", json={"model": "tiny/det"})).status == 422  # no Origin: to the API
        same = f"http://127.0.0.1:{client.port}"
        r = await client.post("/jobs", json={"model": "tiny/det"}, headers={"Origin": same})
        assert r.status == 422


async def test_model_routes(redis_url, tmp_path):
    settings = settings_for(redis_url, tmp_path, fakes={"small": {"memory_mb": 300}, "big": {"memory_mb": 800}},
                            manager={"max_memory_mb": {"cpu": 1000}})
    async with serving(settings) as (daemon, client):
        listed = (await (await client.get("/models")).json())["models"]
        ids = {m["model"]: m for m in listed}
        assert {"retinaface/mobilenet", "tiny/det", "fake/small"} <= set(ids)
        assert ids["retinaface/mobilenet"]["available"] and not ids["fake/small"]["loaded"]

        r = await client.post("/models/fake/small/load?device=cpu")
        assert r.status == 200 and (await r.json())["memory_mb"] == 300
        info = await (await client.get("/models/fake/small/info")).json()
        assert info["task"] == "detect" and info["loaded_on"][0]["device"] == "cpu"
        assert info["options"]["memory_mb"] == 300 and "task" not in info["options"]

        r = await client.post("/models/fake/big/load")  # 300 + 800 > the 1000 MB budget …
        assert r.status == 200  # … so the idle small model was evicted (LRU)
        loaded = (await (await client.get("/models/loaded")).json())["models"]
        assert [m["model"] for m in loaded] == ["fake/big"]

        r = await client.post("/models/no/such/load")
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        r = await client.post("/models/fake/small/load?device=cuda:7")
        assert r.status == 404 and "no worker owns device" in (await r.json())["error"]["message"]
        r = await client.post("/models/fake/small/unload")
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_loaded"
        r = await client.post("/models/fake/big/unload?device=cuda:7")  # loaded, but not there: as load says
        assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_device"
        r = await client.post("/models/fake/big/unload")
        assert (await r.json()) == {"model": "fake/big", "unloaded_from": ["cpu"]}

        await client.post("/models/fake/small/load")
        async with daemon.manager.use("fake/small", "cpu", daemon.worker_for("cpu", "fake/small").executor):
            r = await client.post("/models/fake/small/unload")  # a call is using it
            body = await r.json()
            assert r.status == 409 and body["error"]["code"] == "model_in_use", body
        r = await client.post("/models/cleanup?inactive_seconds=0")
        assert (await r.json())["unloaded"] == [{"model": "fake/small", "device": "cpu"}]
        r = await client.post("/models/cleanup?inactive_seconds=soon")
        assert r.status == 422 and "inactive_seconds" in (await r.json())["error"]["message"]


async def test_a_new_weights_file_is_rolled_out_to_a_running_pipeline_by_a_load(redis_url, sync_redis, tmp_path,
                                                                                  gradient):
    """The pipeline's model is loaded at start, so a load answered that copy and the new file
    waited for a restart. Now the load reads the changed file, the pipeline's next frames get
    it, and a new file that does not load leaves the running copy in use (409, saying so)."""
    from tests.integration.helpers import TINY_ROWS
    from tests.tiny_models import constant_yolov8

    def labels() -> list[str]:
        import json

        return [json.loads(fields[b"result"])["detections"][0]["label"]
                for _, fields in sync_redis.xrange("results:people:frames:{w}")]

    async with serving(settings_for(redis_url, tmp_path)) as (daemon, client):
        sync_redis.xadd("frames:{w}", {"image": encode(gradient)})
        await wait_for(lambda: labels() == ["dog"])
        before = (await (await client.get("/models/loaded")).json())["models"]
        r = await client.post("/models/tiny/det/load")  # unchanged: the same copy
        assert r.status == 200 and (await r.json())["loaded_at"] == before[0]["loaded_at"]

        cat = [[32, 32, 20, 20, 0.9, 0.1]] + TINY_ROWS[1:]
        constant_yolov8(tmp_path / "tiny.onnx", cat, classes=2, size=64, names={0: "cat", 1: "dog"})
        r = await client.post("/models/tiny/det/load")
        assert r.status == 200 and (await r.json())["loaded_at"] > before[0]["loaded_at"]
        sync_redis.xadd("frames:{w}", {"image": encode(gradient)})
        await wait_for(lambda: labels() == ["dog", "cat"])
        assert len((await (await client.get("/models/loaded")).json())["models"]) == 1

        (tmp_path / "tiny.onnx").write_bytes(b"half a copy")
        r = await client.post("/models/tiny/det/load")
        body = await r.json()
        assert r.status == 409 and body["error"]["code"] == "model_error", body
        assert "from the file as it was then, stays in use" in body["error"]["message"]
        sync_redis.xadd("frames:{w}", {"image": encode(gradient)})
        await wait_for(lambda: labels() == ["dog", "cat", "cat"])


async def test_a_plug_ins_failures_are_its_models_errors_never_a_500(redis_url, tmp_path):
    settings = settings_for(redis_url, tmp_path, fakes={
        "badopt": {"threshold": "abc"}, "badload": {"fail_load": True}, "badunload": {"fail_unload": True},
        "noclass": {"adapter": "Nope"}})
    async with serving(settings) as (daemon, client):
        for route, status in (("/models/fake/badopt/load", 409), ("/predict/fake/badopt", 422)):
            r = await client.post(route, data=encode(np.zeros((8, 8, 3), np.uint8)))
            body = await r.json()
            assert r.status == status and body["error"]["code"] == "model_error", body
            assert "could not be set up with its options: ValueError" in body["error"]["message"]
        r = await client.post("/models/fake/badload/load")
        body = await r.json()
        assert r.status == 409 and "failed to load on cpu: KeyError" in body["error"]["message"], body
        r = await client.post("/predict/fake/badload", data=encode(np.zeros((8, 8, 3), np.uint8)))
        assert r.status == 422 and "failed to load" in (await r.json())["error"]["message"]
        r = await client.post("/predict/fake/noclass", data=encode(np.zeros((8, 8, 3), np.uint8)))
        body = await r.json()  # no prompt was sent: the message is about the adapter, not a prompt
        assert r.status == 409 and body["error"]["message"].startswith("cannot import adapter"), body
        assert (await client.post("/models/fake/badunload/load")).status == 200
        r = await client.post("/models/fake/badunload/unload")  # unloaded all the same, and said
        assert r.status == 200 and not daemon.manager.is_loaded("fake/badunload")
        await client.post("/models/fake/badunload/load")
        r = await client.post("/models/cleanup?inactive_seconds=0")  # also the idle pipeline's model
        assert r.status == 200 and {"model": "fake/badunload", "device": "cpu"} in (await r.json())["unloaded"]
        assert (await client.get("/health")).status == 200
        await client.post("/models/fake/badunload/load")  # still loaded at stop: the stop goes on


async def test_a_load_past_its_timeout_is_given_up_and_its_device_serves_other_models(redis_url, tmp_path):
    # a load that hangs used to hold its device thread, and every model's calls on it, for ever
    settings = settings_for(redis_url, tmp_path, fakes={"slow": {"load_s": 3, "memory_mb": 300}, "quick": {}},
                            manager={"load_timeout_s": 0.5})
    image = encode(np.zeros((8, 8, 3), np.uint8))
    async with serving(settings) as (daemon, client):
        assert (await client.post("/models/fake/quick/load")).status == 200
        slow = [asyncio.ensure_future(client.post("/predict/fake/slow", data=image)),
                asyncio.ensure_future(client.post("/models/fake/slow/load"))]  # a second load, behind it
        await asyncio.sleep(0.1)
        quick = await client.post("/predict/fake/quick", data=image)  # queued behind the load
        assert quick.status in (200, 504)  # abandoned with the stuck thread, or run on a new one
        answers = [(r.status, (await r.json())["error"]["message"]) for r in await asyncio.gather(*slow)]
        assert [status for status, _ in answers] == [504, 504], answers
        said = sorted(m.split(" on cpu")[0].split("slow ")[1] for _, m in answers)
        assert said == ["did not load", "is still loading"], answers  # one stuck load, not one per try
        assert daemon.manager._reserved_mb["cpu"] == 300  # its room is still promised while it runs
        r = await client.post("/predict/fake/quick", data=image)
        assert r.status == 200, await r.text()  # a fresh device thread
        r = await client.post("/models/fake/slow/unload")
        assert r.status == 409 and "being loaded" in (await r.json())["error"]["message"]
        # once it ends, late, it is taken in, and its room counted as a loaded model's
        await wait_for(lambda: daemon.manager.is_loaded("fake/slow"), 10, "the late load taken in")
        # (and the pipeline's tiny model, loaded at start)
        assert daemon.manager._reserved_mb["cpu"] == 0 and daemon.manager.used_mb("cpu") == pytest.approx(300, abs=1)
        assert (await client.post("/predict/fake/slow", data=image)).status == 200


async def test_unloading_a_model_being_loaded_says_so(redis_url, tmp_path):
    settings = settings_for(redis_url, tmp_path, fakes={"slow": {"load_s": 1}})
    async with serving(settings) as (daemon, client):
        loading = asyncio.ensure_future(client.post("/models/fake/slow/load"))
        await wait_for(lambda: (lock := daemon.manager._locks.get(("fake/slow", "cpu"))) is not None
                       and lock.locked(), 5)
        r = await client.post("/models/fake/slow/unload")  # was 404 not_loaded, then loaded after
        body = await r.json()
        assert r.status == 409 and "is being loaded on cpu" in body["error"]["message"], body
        assert (await loading).status == 200
        assert (await client.post("/models/fake/slow/unload")).status == 200


async def test_a_model_larger_than_the_budget_is_507(redis_url, tmp_path):
    settings = settings_for(redis_url, tmp_path, fakes={"huge": {"memory_mb": 5000}},
                            manager={"max_memory_mb": {"cpu": 1000}})
    async with serving(settings) as (daemon, client):
        r = await client.post("/models/fake/huge/load")
        body = await r.json()
        assert r.status == 507 and body["error"]["code"] == "insufficient_memory"
        assert "5000 MB" in body["error"]["message"]
        r = await client.post("/predict/fake/huge", data=encode(np.zeros((8, 8, 3), np.uint8)))
        body = await r.json()  # was a 422 model_error
        assert r.status == 507 and body["error"]["code"] == "insufficient_memory" and "5000 MB" in body["error"]["message"]


async def test_a_request_that_is_not_valid_http_is_a_400_and_one_log_line(redis_url, tmp_path, capfd):
    """aiohttp answers it before any route, and would log it with a traceback."""
    from structlog.testing import capture_logs

    async with serving(settings_for(redis_url, tmp_path)) as (daemon, client):
        with capture_logs() as logged:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        assert answer.split(b" ", 2)[1] == b"400"
    said = [e for e in logged if e["event"] != "model_loaded"]  # the pipeline's, loaded at start
    assert [e["event"] for e in said] == ["bad_http_request"] and "8190 bytes" in said[0]["error"]
    assert "Traceback" not in capfd.readouterr().err


async def test_a_body_is_refused_from_its_headers_before_it_is_read(redis_url, tmp_path):
    async with serving(settings_for(redis_url, tmp_path, control={"max_upload_mb": 1})) as (daemon, client):
        # a declared length over max_upload_mb: answered at once, nothing of the body sent
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"POST /predict/tiny/det HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999\r\n"
                     b"Content-Type: image/jpeg\r\n\r\n")
        await writer.drain()
        answer = b""
        while b"bytes declared" not in answer:  # answered before any of the body is sent
            answer += await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        assert answer.split(b" ", 2)[1] == b"413" and b"999999999 bytes declared" in answer
        r = await client.post("/predict/tiny/det", data=b"\xff\xd8 plain bytes", headers={"Content-Encoding": "banana"})
        body = await r.json()  # was read as plain bytes
        assert r.status == 415 and "Content-Encoding 'banana'" in body["error"]["message"], body


async def test_a_client_gone_mid_upload_and_a_long_body_that_is_not_gzip_log_no_traceback(
        redis_url, tmp_path, capfd):
    from structlog.testing import capture_logs

    async with serving(settings_for(redis_url, tmp_path)) as (daemon, client):
        with capture_logs() as logged:
            _, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(b"POST /predict/tiny/det HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000000\r\n"
                         b"Content-Type: image/jpeg\r\n\r\n\xff\xd8" + b"x" * 100_000)
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
            await wait_for(lambda: any(e["event"] == "client_disconnected" for e in logged), timeout=3, what=str(logged))
            # 3 MB that is not gzip: the handler answers 400, then aiohttp reads the rest and fails
            r = await client.post("/predict/tiny/det", data=io.BytesIO(b"x" * 3_000_000),
                                  headers={"Content-Encoding": "gzip"})
            assert r.status == 400 and "cannot be read" in (await r.json())["error"]["message"]
            await asyncio.sleep(0.5)
        assert (await client.get("/health/live")).status == 200
    assert "control_handler_failed" not in [e["event"] for e in logged]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Unhandled exception" not in err


async def test_a_client_that_never_ends_its_headers_is_let_go(redis_url, tmp_path, monkeypatch):
    """A header line every few seconds held a socket for ever (aiohttp's default: an hour),
    before any token was asked: a thousand such clients took the daemon's file descriptors."""
    from sightstream.control import app

    monkeypatch.setitem(app.SERVER_OPTIONS, "keepalive_timeout", 1.0)
    async with serving(settings_for(redis_url, tmp_path, control={"token": "s3cret"})) as (d, client):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(b"POST /predict/tiny/det HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        for _ in range(20):  # 5 s of a header line every 0.25 s
            await asyncio.sleep(0.25)
            if reader.at_eof():
                closed = True
                break
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
        writer.close()
        assert closed, "still open after 5 s of headers"
        assert (await client.get("/health/live")).status == 200  # others are served meanwhile
