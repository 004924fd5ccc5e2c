"""`sightstream run` under systemd: sd_notify messages over a real datagram socket, in order."""

from __future__ import annotations

import asyncio
import re
import socket

import pytest

from sightstream.service import serve
from tests.integration.helpers import settings_for

pytestmark = pytest.mark.integration


@pytest.fixture
def listener(tmp_path, monkeypatch):
    """systemd's end: a datagram socket named in NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


async def test_systemd_hears_ready_then_status_and_watchdog_then_stopping(redis_url, tmp_path, monkeypatch,
                                                                           listener):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2: a ping every 0.1 s
    messages: list[str] = []

    def drain() -> None:
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except BlockingIOError:
                return

    stop = asyncio.Event()
    running = asyncio.create_task(serve(settings_for(redis_url, tmp_path, control={"port": 0}), stop))
    try:
        for _ in range(200):
            drain()
            if messages.count("WATCHDOG=1") >= 3:
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        code = await asyncio.wait_for(running, 20)
        drain()
    assert code == 0
    assert messages[0] == "READY=1" and messages[-1] == "STOPPING=1"
    assert messages.count("WATCHDOG=1") >= 3
    (status, *_) = [m for m in messages if m.startswith("STATUS=")]
    assert re.fullmatch(r"STATUS=\d+ sources, [\d.]+ frames/s in, [\d.]+ results/s out", status), status


async def test_no_watchdog_pings_for_another_process(redis_url, tmp_path, monkeypatch):
    from sightstream.service import watchdog_interval

    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # systemd meant another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() == 0.1


async def test_watchdog_pings_stop_while_the_loop_is_blocked(redis_url, tmp_path, monkeypatch, listener):
    """The pings come from the event loop: while it is blocked, systemd hears none."""
    import time

    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 0.05 s
    heard: list[float] = []

    def drain() -> None:
        while True:
            try:
                if listener.recv(4096) == b"WATCHDOG=1":
                    heard.append(time.monotonic())
            except BlockingIOError:
                return

    stop = asyncio.Event()
    running = asyncio.create_task(serve(settings_for(redis_url, tmp_path, control={"port": 0}), stop))
    try:
        while len(heard) < 3:
            drain()
            await asyncio.sleep(0.01)
        blocked_at = time.monotonic()
        time.sleep(0.6)  # the loop is blocked: no task runs, no ping is sent
        drain()
        assert not [t for t in heard if t > blocked_at]
        await asyncio.sleep(0.2)
        drain()
        assert [t for t in heard if t > blocked_at + 0.6]  # pings again once the loop runs
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)


async def test_a_control_address_that_cannot_be_had_is_a_setting_named(redis_url, tmp_path):
    """A port in use was '[Errno 98] error while attempting to bind on address …', exit 1."""
    from sightstream.errors import ConfigError, SightstreamError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SightstreamError, match=rf"^cannot listen on 127.0.0.1:{port} \(control.host, "
                                                   rf"control.port\): ") as refused:
            await serve(settings_for(redis_url, tmp_path, control={"port": port}), asyncio.Event())
        assert not isinstance(refused.value, ConfigError)  # exit 1: systemd restarts it (the port may free up)


async def test_listening_beyond_loopback_without_a_token_is_warned_of(redis_url, tmp_path):
    from structlog.testing import capture_logs

    stop = asyncio.Event()
    with capture_logs() as logs:
        running = asyncio.create_task(serve(settings_for(redis_url, tmp_path, control={"port": 0,
                                                                                      "host": "0.0.0.0"}), stop))
        for _ in range(100):
            if any(e["event"] == "control_listening" for e in logs):
                break
            await asyncio.sleep(0.05)
        stop.set()
        assert await asyncio.wait_for(running, 20) == 0
    (warned,) = [e for e in logs if e["event"] == "control_open_without_token"]
    assert warned["host"] == "0.0.0.0" and "set control.token" in warned["why"]


async def test_systemctl_status_says_redis_is_unreachable(tmp_path, listener):
    """It said "0.0 frames/s in" alone while Redis was down."""
    from sightstream.daemon.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis().start()
    stop = asyncio.Event()
    running = asyncio.create_task(serve(settings_for(server.url, tmp_path, control={"port": 0}), stop))
    statuses: list[str] = []
    try:
        for _ in range(100):
            try:
                if listener.recv(4096) == b"READY=1":
                    break
            except BlockingIOError:
                await asyncio.sleep(0.05)
        server.stop()
        for _ in range(300):  # a status every 5 s; the Redis probe is the one before's
            try:
                message = listener.recv(4096).decode()
            except BlockingIOError:
                await asyncio.sleep(0.05)
                continue
            if message.startswith("STATUS="):
                statuses.append(message)
                if message.startswith("STATUS=redis is unreachable; "):
                    break
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        server.close()
    assert re.fullmatch(r"STATUS=redis is unreachable; \d+ sources, [\d.]+ frames/s in, [\d.]+ results/s out",
                        statuses[-1]), statuses
