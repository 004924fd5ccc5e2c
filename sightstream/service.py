"""`sightstream run`: the daemon and its control plane in one process, with a two-stage exit.

The first SIGTERM/SIGINT starts a graceful drain (bounded by shutdown_timeout_s); a second one
exits at once. Under systemd (Type=notify): READY=1 once the daemon reads its pipelines,
STATUS= lines (sources, frames/s) every few seconds, WATCHDOG=1 from the event loop itself
when the unit sets WatchdogSec= (so a blocked loop, or a stage that died, gets the daemon
restarted), and STOPPING=1 when it drains."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time

from aiohttp import web

from sightstream import log
from sightstream.config import Settings
from sightstream.control.app import SERVER_OPTIONS, make_app
from sightstream.control.browser_guard import is_loopback
from sightstream.daemon.daemon import Daemon
from sightstream.errors import SightstreamError

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


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec= (WATCHDOG_USEC), when it is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def status_line(daemon: Daemon, redis_problem: str | None = None) -> str:
    """`systemctl status`'s line: the flow, and first what stops it where Redis cannot be used
    ("0.0 frames/s in" alone said nothing of why)."""
    sources = sum(len(run.ingest.streams) for run in daemon.runs.values())
    fps_in = fps_out = 0.0
    for p in daemon.settings.pipelines:
        i, o = daemon.rates.fps(p.name)
        fps_in, fps_out = fps_in + i, fps_out + o
    flow = f"{sources} sources, {fps_in:.1f} frames/s in, {fps_out:.1f} results/s out"
    # what, not the whole error (readiness and the logs give that): one line stays readable
    return flow if redis_problem is None else f"{redis_problem.split(': ', 1)[0]}; {flow}"


async def tell_systemd(daemon: Daemon, stop: asyncio.Event) -> None:
    """WATCHDOG=1 while the loop runs and no stage has failed; STATUS= every 5 s. Sent from
    the loop itself: when it blocks, the pings stop and systemd restarts the daemon."""
    interval = watchdog_interval()
    step = min(interval, 5.0) if interval else 5.0
    next_status = 0.0
    loop = asyncio.get_running_loop()
    probe: asyncio.Task | None = None  # Redis asked aside (up to 1 s): the pings never wait for it
    try:
        while not stop.is_set():
            if interval and daemon.failed() is None:
                sd_notify("WATCHDOG=1")
            if loop.time() >= next_status:
                try:
                    problem = probe.result() if probe is not None and probe.done() else None
                    sd_notify(f"STATUS={status_line(daemon, problem)}")
                except Exception:  # a status line must never stop the watchdog pings
                    _log.exception("status_line_failed")
                if probe is None or probe.done():
                    probe = asyncio.create_task(daemon.redis_problem(), name="status-redis-probe")
                next_status = loop.time() + 5.0
            try:
                await asyncio.wait_for(stop.wait(), step)
            except TimeoutError:
                pass
    finally:
        if probe is not None:
            probe.cancel()


def leave_running_calls(code: int, wait_s: float = 1.0) -> None:
    """After the daemon has stopped: exit with `code` now, if a model call that was given up
    (stuck, or a text call past shutdown_timeout_s) still runs on its thread. Such a thread
    cannot be stopped, and the interpreter waits for every executor thread at exit: the
    process would linger for as long as the call lasts, minutes for a text model on a CPU,
    long after it said "stopped" (systemd would kill it past TimeoutStopSec). Everything is
    published and closed by now; threads that are merely ending get `wait_s`."""
    deadline = time.monotonic() + wait_s
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    running = [t.name for t in threading.enumerate()
               if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if running:
        _log.warning("exiting_past_running_calls", threads=running)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _detach_from_terminal() -> None:
    """A hang-up of the terminal the daemon writes to: writing there fails from now on (EIO),
    which would end the stage that logs next. Its output goes nowhere while it drains."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if os.isatty(fd):
            os.dup2(devnull, fd)
    os.close(devnull)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Run until signalled (or `stop` is set). Returns the process exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            stop.set()  # first: the log line below can fail
            if signum == signal.SIGHUP:
                _detach_from_terminal()
            _log.info("stopping", signal=signal.Signals(signum).name)
        else:
            _log.warning("second_signal_exiting_now")
            os._exit(1)

    # SIGHUP (the terminal that started it closed) drains as SIGTERM does: it ended the daemon
    # at once, its frames left for a reclaim. There is no configuration reload to ask for.
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)

    daemon = Daemon(settings)
    runner = web.AppRunner(make_app(daemon), access_log=None, **SERVER_OPTIONS)
    await runner.setup()
    host, port = settings.control.host, settings.control.port
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:  # a port in use, a host that is no address of this machine
        await runner.cleanup()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        # exit 1, not a bad setting's 2: a port still held by the daemon before, an address not
        # up yet at boot pass, and systemd restarts on 1
        raise SightstreamError(f"cannot listen on {host}:{port} (control.host, control.port): "
                               f"{e.strerror or e}") from None
    _log.info("control_listening", host=host, port=port)
    if not settings.control.auth and not is_loopback(host):
        _log.warning("control_open_without_token", host=host, port=port,
                     why="anyone who reaches this address may set prompts, load models and start jobs "
                         "that fetch URLs: set control.token, or listen on 127.0.0.1")

    async def watch_stop() -> None:
        await stop.wait()
        daemon.stop_event.set()

    watcher = asyncio.create_task(watch_stop())
    code = 0
    notifier: asyncio.Task | None = None
    try:
        await daemon.start()
        sd_notify("READY=1")
        notifier = asyncio.create_task(tell_systemd(daemon, stop), name="systemd")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                if (error := daemon.failed()) is not None:
                    # a bug: its stage and its traceback, to report
                    stage = " ".join(getattr(error, "__notes__", ()))
                    _log.error("stage_failed", error=repr(error), stage=stage, exc_info=error)
                    code = 1
                    break
    finally:
        sd_notify("STOPPING=1")
        watcher.cancel()
        if notifier is not None:
            notifier.cancel()
        await daemon.stop()
        await runner.cleanup()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    _log.info("stopped", exit_code=code)
    return code
