"""Running `sightstream run` as subprocesses, as a user or systemd does."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sightstream.daemon.embedded_redis import free_port

CLI = [sys.executable, "-m", "sightstream"]
REPO = Path(__file__).parent.parent.parent


def wait_until(check, timeout: float = 30, what: str = "condition") -> None:
    """Poll `check` (synchronous) until it is true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def write_config(path: Path, redis_url: str, port: int, pipeline: str = "", top: str = "",
                 fake: str = "", tables: str = "") -> Path:
    """A config with one pipeline `people` (extra lines in `pipeline`), if `fake` is given, a
    `fake/slow` model of the scripted test adapter with those options, and `tables` last."""
    text = f"""
redis_url = "{redis_url}"
devices = ["cpu"]
reclaim_min_idle_ms = 1000
log_format = "json"
{top}
[control]
port = {port}

[[pipelines]]
name = "people"
input = ["frames:*"]
{pipeline}
"""
    if fake:
        text += f"""
[models.fake.slow]
backend = "torch"
task = "detect"
adapter = "tests.fake_adapters:Scripted"
{fake}
"""
    path.write_text(text + tables)
    return path


class Daemon:
    """One `sightstream run` subprocess, its control port, and its captured output."""

    def __init__(self, config_dir: Path, redis_url: str, name: str = "d", text: str | None = None,
                 **config: str) -> None:
        """`text`: a whole config of your own (its `{port}` is filled in); else write_config's."""
        self.port = free_port()
        self.config = config_dir / f"{name}.toml"
        if text is not None:
            self.config.write_text(text.replace("{port}", str(self.port)))
        else:
            write_config(self.config, redis_url, self.port, **config)
        self.log = (config_dir / f"{name}.log").open("w+")
        self.proc = subprocess.Popen([*CLI, "run", "--config", str(self.config)], cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=2) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited: {self.output()}"
            try:
                if self.get("/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready within {timeout}s: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
