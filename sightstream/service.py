"""`sightstream run`: the daemon and its control plane in one process, with a two-stage exit.

The first SIGTERM/SIGINT starts a graceful drain (bounded by shutdown_timeout_s); a second one
exits at once. Under systemd (Type=notify), READY=1 is sent once the daemon is up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from aiohttp import web

from sightstream import log
from sightstream.config import Settings
from sightstream.control.app import make_app
from sightstream.daemon.daemon import Daemon

_log = log.get(__name__)


def sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(address)
            s.sendall(message.encode())
        except OSError:
            pass


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Run until signalled (or `stop` is set). Returns the process exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            _log.info("stopping", signal=signal.Signals(signum).name)
            stop.set()
        else:
            _log.warning("second_signal_exiting_now")
            os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    daemon = Daemon(settings)
    runner = web.AppRunner(make_app(daemon), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.control.host, settings.control.port)
    await site.start()
    _log.info("control_listening", host=settings.control.host, port=settings.control.port)

    async def watch_stop() -> None:
        await stop.wait()
        daemon.stop_event.set()

    watcher = asyncio.create_task(watch_stop())
    code = 0
    try:
        await daemon.start()
        sd_notify("READY=1")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                if (error := daemon.failed()) is not None:
                    _log.error("stage_failed", error=repr(error))
                    code = 1
                    break
    finally:
        sd_notify("STOPPING=1")
        watcher.cancel()
        await daemon.stop()
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    _log.info("stopped", exit_code=code)
    return code
