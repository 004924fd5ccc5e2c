"""The CLI as a user runs it: `sightstream run` in a subprocess, frames from `redis-cli`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from sightstream.daemon.embedded_redis import EmbeddedRedis, free_port, redis_binary
from tests.conftest import encode
from tests.e2e.daemons import wait_until
from tests.integration.helpers import entries, pending

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "sightstream"]


def write_config(tmp_path: Path, redis_url: str, port: int, extra: str = "") -> Path:
    path = tmp_path / "sightstream.toml"
    path.write_text(f"""
redis_url = "{redis_url}"
devices = ["cpu"]
shutdown_timeout_s = 10
[control]
port = {port}
[[pipelines]]
name = "people"
input = ["frames:*"]
batch_size = 4
{extra}
""")
    return path


def wait_http(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout}s")


@pytest.fixture
def daemon(redis_url, tmp_path):
    port = free_port()
    config = write_config(tmp_path, redis_url, port)
    proc = subprocess.Popen([*CLI, "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health/ready")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_redis_cli_frames_get_results_and_sigterm_exits_cleanly(daemon, redis_server, sync_redis, tmp_path, astronaut_jpeg):
    proc, port = daemon
    photo = tmp_path / "f.jpg"
    photo.write_bytes(astronaut_jpeg)
    for _ in range(3):
        with photo.open("rb") as f:
            subprocess.run([redis_binary("redis-cli"), "-p", str(redis_server.port), "-x",
                            "XADD", "frames:{cam1}", "*", "image"], stdin=f, check=True,
                           capture_output=True)
    wait_until(lambda: sync_redis.xlen("results:people:frames:{cam1}") == 3, 60)
    for _, fields in entries(sync_redis, "results:people:frames:{cam1}"):
        assert {"source", "frame_id", "ts", "pipeline", "model", "task", "result", "latency_ms"} <= set(fields)
        assert json.loads(fields["result"])["detections"][0]["label"] == "face"
        assert fields["model"] == b"retinaface/mobilenet"
    assert pending(sync_redis, "frames:{cam1}") == 0
    health = wait_http(f"http://127.0.0.1:{port}/health")
    assert health["status"] == "ok"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err and "daemon_drained" in err


@pytest.mark.timeout(90)  # a daemon's start (torch, the model) and three CLI runs: slow on a loaded machine
def test_publish_and_tail(daemon, redis_url, tmp_path, gradient, astronaut):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(encode(astronaut if i % 2 else gradient, "PNG"))
    pub = subprocess.run([*CLI, "publish", str(folder), "--stream", "frames:{dir}",
                          "--redis-url", redis_url, "--quiet"], capture_output=True, text=True, timeout=60)
    assert pub.returncode == 0 and pub.stderr == ""  # --quiet: not even the closing count
    pub = subprocess.run([*CLI, "publish", str(folder), "--stream", "frames:{dir}", "--max-frames", "0",
                          "--redis-url", redis_url], capture_output=True, text=True, timeout=60)
    assert pub.returncode == 0 and "published 4 frames" in pub.stderr
    tail = subprocess.run([*CLI, "tail", "results:people:frames:{dir}", "--from", "0", "--count", "8",
                           "--timeout", "60", "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=90)
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.strip().splitlines()
    assert len(lines) == 8  # the folder, twice
    assert sum("1 x face" in line for line in lines) == 4
    assert sum("nothing detected" in line for line in lines) == 4


def test_tail_into_a_reader_that_goes_away_ends_quietly(redis_url, sync_redis):
    """`sightstream tail … | head`: exit 141 as a Unix tool ended by SIGPIPE, and no error."""
    pipe = sync_redis.pipeline()
    for i in range(20_000):
        pipe.xadd("results:x", {"source": "s", "frame_id": str(i), "result": "{}"})
    pipe.execute()
    tail = subprocess.Popen([*CLI, "tail", "results:x", "--from", "0", "--count", "20000", "--timeout", "5",
                             "--redis-url", redis_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tail.stdout.readline()
    tail.stdout.close()  # as head does once it has its lines
    assert tail.wait(60) == 141
    with tail.stderr:
        assert tail.stderr.read() == b""


def test_tail_stopped_by_ctrl_c_exits_130_quietly(redis_url, sync_redis):
    sync_redis.xadd("results:ctrl", {"source": "s", "frame_id": "1", "result": "{}"})
    tail = subprocess.Popen([*CLI, "tail", "results:ctrl", "--from", "0", "--redis-url", redis_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tail.stdout.readline()  # it is following the stream now
    tail.send_signal(signal.SIGINT)
    assert tail.wait(30) == 130  # it used to exit 0, as if it had ended by itself
    with tail.stdout, tail.stderr:
        assert tail.stderr.read() == b""


def test_publish_a_video_at_a_target_fps(redis_url, sync_redis, tmp_path):
    from sightstream.publish import make_sample_video

    video = make_sample_video(tmp_path / "v.mp4", seconds=2, fps=10, size=(320, 240))
    pub = subprocess.run([*CLI, "publish", str(video), "--stream", "frames:{v}", "--fps", "5",
                          "--redis-url", redis_url, "--quiet"], capture_output=True, text=True, timeout=60)
    assert pub.returncode == 0, pub.stderr
    frames = entries(sync_redis, "frames:{v}")
    assert len(frames) == 10  # 2 s sampled to 5 fps
    assert all(f["image"][:3] == b"\xff\xd8\xff" and int(f["ts"]) > 0 for _, f in frames)
    assert [json.loads(f["meta"])["index"] for _, f in frames] == list(range(10))


def test_a_bad_setting_stops_start_up_with_one_line(redis_url, tmp_path):
    config = write_config(tmp_path, redis_url, free_port(), extra="fps = -2")
    run = subprocess.run([*CLI, "run", "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert run.stderr.strip() == "sightstream: invalid setting pipelines[0].fps: Input should be greater than or equal to 0"


def test_an_unknown_model_stops_start_up_with_one_line(redis_url, tmp_path):
    config = write_config(tmp_path, redis_url, free_port(), extra='model = "no/such"')
    run = subprocess.run([*CLI, "run", "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "unknown model 'no/such'" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_environment_overrides_reach_the_daemon(redis_url, tmp_path):
    env = {**os.environ, "SIGHTSTREAM_PIPELINES": '[{"name": "Bad!"}]'}
    run = subprocess.run([*CLI, "run"], capture_output=True, text=True, timeout=30, env=env)
    assert run.returncode == 2 and "pipelines[0].name" in run.stderr


def test_models_lists_the_catalogue():
    out = subprocess.run([*CLI, "models"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "retinaface/mobilenet" in out.stdout and "licence: MIT" in out.stdout
    listed = json.loads(subprocess.run([*CLI, "models", "--json"], capture_output=True, text=True).stdout)
    assert {"model", "task", "backend", "available", "licence"} <= set(listed[0])


def test_help_imports_no_model_framework():
    """`--help` (and every command's parser) must not pay for importing torch or onnxruntime:
    the frameworks load only where a model does."""
    code = ("import sys, sightstream.cli\n"
            "try:\n    sightstream.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers', 'av', 'PIL')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "usage: sightstream" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", [["tail", "frames:x", "--timeout", "1"],
                                     ["publish", "sightstream/data", "--stream", "frames:x"]])
def test_redis_down_is_one_line_and_exit_1(command):
    env = {**os.environ, "SIGHTSTREAM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    run = subprocess.run([*CLI, *command], capture_output=True, text=True, timeout=60, env=env,
                         cwd=Path(__file__).parent.parent.parent)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("sightstream: ") and "Connection refused" in last


def test_publishing_from_a_host_that_does_not_resolve_says_so(redis_url):
    run = subprocess.run([*CLI, "publish", "https://no-such-host.invalid/clip.mp4", "--stream", "frames:x"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "SIGHTSTREAM_REDIS_URL": redis_url})
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "the host no-such-host.invalid cannot be resolved" in run.stderr, run.stderr


def test_demo_publishes_a_sample_video_and_shows_its_results(redis_url, sync_redis, tmp_path):
    """`sightstream demo` on a configured Redis that answers: the daemon with the built-in model,
    a sample video published, one result (or dead-letter) per frame, its own keys cleaned up.
    Control port 0 in the config: the demo picks a free port it can ask."""
    config = tmp_path / "demo.toml"
    config.write_text(f'redis_url = "{redis_url}"\ndevices = ["cpu"]\n[control]\nport = 0\n')
    sync_redis.xadd("frames:{cam1}", {"image": b"a user's frame"})
    run = subprocess.run([*CLI, "demo", "--config", str(config), "--seconds", "1"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"Redis: using {redis_url}" in run.stdout
    assert "(the built-in default)" in run.stdout
    assert "Summary: 10 frames published, 10 results, 0 dead-lettered" in run.stdout
    assert not sync_redis.keys("*sightstream-demo*")  # its keys are gone
    assert sync_redis.xlen("frames:{cam1}") == 1 and not sync_redis.keys("results:*")  # a user's untouched


def _until_kept(demo: subprocess.Popen) -> list[str]:
    """`demo --keep`'s lines up to the one saying it keeps running (the demo itself is done)."""
    lines: list[str] = []
    while not any("Still running" in line for line in lines):
        line = demo.stdout.readline()
        assert line, "".join(lines) + demo.stderr.read()
        lines.append(line)
    return lines


@pytest.mark.timeout(120)
def test_demo_keep_stays_up_for_the_live_page_until_ctrl_c(redis_url, sync_redis, tmp_path):
    config = tmp_path / "demo.toml"
    config.write_text(f'redis_url = "{redis_url}"\ndevices = ["cpu"]\n[control]\nport = 0\n')
    demo = subprocess.Popen([*CLI, "demo", "--config", str(config), "--seconds", "1", "--keep"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _until_kept(demo)
        url = re.search(r"open (http://\S+/) to watch", lines[-1]).group(1)
        results = "results:demo:demo-frames:{sightstream-demo}"
        before = sync_redis.xlen(results)
        with urllib.request.urlopen(url, timeout=10) as page:  # the live page answers
            assert page.status == 200 and b"<html" in page.read().lower()
        deadline = time.monotonic() + 20
        while sync_redis.xlen(results) <= before:  # the video goes round again
            assert time.monotonic() < deadline, "no new result after the summary"
            time.sleep(0.2)
    finally:
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=60)
    assert demo.returncode == 0 and "Traceback" not in err, err
    assert "Stopped the daemon." in out and not sync_redis.keys("*sightstream-demo*")


@pytest.mark.timeout(120)
def test_demo_keep_on_its_own_redis_ends_cleanly_on_a_terminal_s_ctrl_c(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the embedded Redis quits at once
    while the daemon drains. The demo still ends as it should, with its Redis gone."""
    config = tmp_path / "demo.toml"
    config.write_text('devices = ["cpu"]\n[control]\nport = 0\n')
    script = ("import sys\nimport sightstream.demo as demo\n"
              "async def unreachable(url):\n    return 'nothing answers (a test)'\n"
              "demo.why_unreachable = unreachable  # as on a machine with no Redis\n"
              "from sightstream.cli import main\n"
              f"sys.exit(main(['demo', '--keep', '--seconds', '1', '--config', {str(config)!r}]))\n")
    demo = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own group, as a terminal's job
    try:
        lines = _until_kept(demo)
        port = int(re.search(r"embedded redis-server on port (\d+)", "".join(lines)).group(1))
        time.sleep(1)  # a round under way
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        out, err = demo.communicate(timeout=60)
    assert demo.returncode == 0 and "Traceback" not in err and "sightstream: " not in err, err
    assert "Stopped the daemon and the embedded Redis." in out
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_demo_with_a_set_redis_url_that_does_not_answer_says_so_and_starts_no_redis(tmp_path):
    env = {**os.environ, "SIGHTSTREAM_REDIS_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0"}
    run = subprocess.run([*CLI, "demo", "--seconds", "1"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "cannot be used" in run.stdout and "leave redis_url at its default" in run.stdout
    assert "s3cret" not in run.stdout + run.stderr and "embedded" not in run.stdout


def test_publish_a_url_and_a_url_that_does_not_answer(redis_url, sync_redis, tmp_path):
    """A video URL is published like a file; one whose server never answers is one line and
    exit 1 after --timeout, not a hung producer; so is a URL that is not a video."""
    from tests.hls import make_clip, static_server

    make_clip(tmp_path / "clip.mp4", 1, 10)
    (tmp_path / "notes.txt").write_text("not a video")
    env = {**os.environ, "SIGHTSTREAM_REDIS_URL": redis_url}
    with static_server(tmp_path, hang_once=["hung.mp4"]) as server:
        ok = subprocess.run([*CLI, "publish", server.url("clip.mp4"), "--stream", "frames:{url}", "--fps", "0",
                             "-q"], capture_output=True, text=True, timeout=60, env=env)
        assert ok.returncode == 0, ok.stderr
        assert sync_redis.xlen("frames:{url}") == 10
        for name, needle in (("hung.mp4", "did not answer within 1 s"),
                             ("notes.txt", "notes.txt: Invalid data found when processing input"),
                             ("missing.mp4", "cannot open")):
            started = time.monotonic()
            url = server.url(name).replace("http://", "http://cam:s3cret@")  # never shown
            run = subprocess.run([*CLI, "publish", url, "--stream", "frames:{bad}", "--timeout", "1",
                                  "-q"], capture_output=True, text=True, timeout=60, env=env)
            assert "s3cret" not in run.stderr and "cam:" not in run.stderr  # user and password both gone
            assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
            assert run.stderr.strip().startswith("sightstream: ") and needle in run.stderr, run.stderr
            assert len(run.stderr.strip().splitlines()) == 1
            assert time.monotonic() - started < 30


def test_publish_a_stream_that_stops_answering_midway(redis_url, sync_redis, tmp_path):
    """A server that sends half of a stream, then nothing: the frames it sent are published,
    then one line and exit 1 after --timeout, not a producer hung on a dead connection."""
    import asyncio

    from aiohttp import web

    from tests.hls import ThreadServer, make_hls_vod

    playlist = make_hls_vod(tmp_path / "vod", seconds=4, fps=10)
    stream = b"".join((playlist.parent / f"index{i}.ts").read_bytes() for i in range(4))  # one MPEG-TS

    async def half_then_silence(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        await response.prepare(request)
        await response.write(stream[: len(stream) // 2])
        await asyncio.sleep(3600)  # cancelled when the server shuts down
        return response

    app = web.Application()
    app.router.add_get("/live.ts", half_then_silence)
    env = {**os.environ, "SIGHTSTREAM_REDIS_URL": redis_url}
    with ThreadServer(app) as server:
        started = time.monotonic()
        run = subprocess.run([*CLI, "publish", server.url("live.ts"), "--stream", "frames:{cut}", "--fps", "0",
                              "--timeout", "1", "-q"], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "stopped answering (no data for 1 s)" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    sent = sync_redis.xlen("frames:{cut}")
    assert 0 < sent < 40  # what came before the silence was published, and the line says how much
    assert f"(after {sent} frames were published to frames:{{cut}})" in run.stderr
    assert time.monotonic() - started < 30


def test_publish_an_rtsp_camera(redis_url, sync_redis):
    from tests.rtsp import rtsp_camera

    env = {**os.environ, "SIGHTSTREAM_REDIS_URL": redis_url}
    with rtsp_camera() as camera:
        run = subprocess.run([*CLI, "publish", camera.url(), "--stream", "frames:{door}", "--max-frames", "5",
                              "-q"], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    frames = entries(sync_redis, "frames:{door}")
    assert len(frames) == 5 and all(f["image"][:3] == b"\xff\xd8\xff" for _, f in frames)


def test_tail_waits_out_a_redis_restart_and_goes_on(tmp_path):
    """A consumer left following results must not die with Redis: it says Redis went, waits,
    says it is back, and prints what comes after."""
    server = EmbeddedRedis().start()
    try:
        client = redis.Redis.from_url(server.url)
        client.xadd("results:r", {"source": "s", "frame_id": "before", "result": "{}"})
        tail = subprocess.Popen([*CLI, "tail", "results:r", "--from", "0", "--count", "2", "--timeout", "60",
                                 "--redis-url", server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        with tail.stdout, tail.stderr:
            assert tail.stdout.readline().startswith("before")
            server.stop()
            assert "Redis unreachable" in tail.stderr.readline()
            server.start()
            client = redis.Redis.from_url(server.url)
            client.xadd("results:r", {"source": "s", "frame_id": "after", "result": "{}"})
            assert tail.wait(60) == 0
            assert tail.stdout.read().startswith("after")
            assert "Redis is back" in tail.stderr.read()
        client.close()
    finally:
        server.close()


def publishing(tmp_path: Path, server: EmbeddedRedis, seconds: int) -> tuple[subprocess.Popen, redis.Redis]:
    """`sightstream publish` of a sample video (10 fps) to frames:{v}, its stderr piped, once
    its first frames are in; and a client of `server`."""
    from sightstream.publish import make_sample_video

    video = make_sample_video(tmp_path / "v.mp4", seconds=seconds, fps=10, size=(160, 120))
    pub = subprocess.Popen([*CLI, "publish", str(video), "--stream", "frames:{v}", "--fps", "10",
                            "--redis-url", server.url, "--quiet"], stderr=subprocess.PIPE, text=True)
    client = redis.Redis.from_url(server.url)
    wait_until(lambda: client.xlen("frames:{v}") >= 3, 30)
    return pub, client


def test_publish_waits_out_a_redis_restart_and_skips_no_frame(tmp_path):
    """A producer left publishing must not die with Redis: it says Redis went, pauses its
    source, says it is back, and goes on with the frame it was sending (appendonly: the Redis
    comes back with what it had, so every frame can be counted)."""
    server = EmbeddedRedis(appendonly=True).start()
    try:
        pub, client = publishing(tmp_path, server, 3)
        with pub.stderr:
            client.close()
            server.stop()
            assert "Redis unreachable" in pub.stderr.readline()
            time.sleep(2)  # a file's frames wait; the pacing does not burst to catch up after
            server.start()
            assert pub.wait(60) == 0
            assert "Redis is back" in pub.stderr.read()
        client = redis.Redis.from_url(server.url)
        frames = [(entry_id, json.loads(f[b"meta"])["index"], int(f[b"ts"]))
                  for entry_id, f in client.xrange("frames:{v}")]
        client.close()
    finally:
        server.close()
    indices = [i for _, i, _ in frames]
    assert sorted(set(indices)) == list(range(30)), indices  # none skipped (one may be twice)
    gaps = [b - a for (_, _, a), (_, _, b) in zip(frames, frames[1:])]
    assert max(gaps) >= 2000 and sorted(gaps)[-2] < 500, gaps  # one pause, then the same pace


def test_publish_waits_out_a_failover_that_made_its_node_a_replica(tmp_path):
    """After a failover the node a plain redis:// URL names is a replica: XADD says READONLY
    (an error, not a lost connection), and publish exited although it waits out failovers."""
    server = EmbeddedRedis().start()
    try:
        pub, client = publishing(tmp_path, server, 2)
        with pub.stderr:
            client.replicaof("127.0.0.1", free_port())  # demoted: its master never answers
            assert "read only replica" in pub.stderr.readline()
            client.replicaof("NO", "ONE")  # promoted again
            assert pub.wait(60) == 0
            assert "Redis is back" in pub.stderr.read()
        indices = {json.loads(f[b"meta"])["index"] for _, f in client.xrange("frames:{v}")}
        client.close()
    finally:
        server.close()
    assert indices == set(range(20))


def test_tail_whose_timeout_runs_out_while_redis_is_away_says_so_and_exits_1():
    """A script waiting for results with --timeout must not read an outage as "no results"."""
    server = EmbeddedRedis().start()
    try:
        tail = subprocess.Popen([*CLI, "tail", "results:r", "--timeout", "3", "--redis-url", server.url],
                                stderr=subprocess.PIPE, text=True)
        with tail.stderr:
            time.sleep(1)  # it has answered: followed
            server.stop()
            assert tail.wait(30) == 1
            lines = tail.stderr.read()
    finally:
        server.close()
    assert "Redis unreachable" in lines and "Redis still unreachable when --timeout (3 s) ran out" in lines
    assert "Traceback" not in lines


def test_tail_of_a_redis_that_never_answers_says_so_and_exits_1():
    tail = subprocess.run([*CLI, "tail", "results:*", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
                          capture_output=True, text=True, timeout=60)
    assert tail.returncode == 1 and "Connection refused" in tail.stderr and "Traceback" not in tail.stderr
