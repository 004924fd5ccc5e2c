"""The systemd units: systemd's own checker accepts them, and a template instance's
environment file sets what differs between daemons on one host."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sightstream.config import Settings

UNITS = Path(__file__).parent.parent.parent / "systemd"


def test_systemd_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    sightstream = Path(sys.executable).parent / "sightstream"  # the installed entry point
    for unit in ("sightstream.service", "sightstream@.service", "sightstream.target"):
        text = (UNITS / unit).read_text().replace("/opt/sightstream/.venv/bin/sightstream", str(sightstream))
        (tmp_path / unit).write_text(text)
    (tmp_path / "sightstream@gpu0.service").symlink_to(tmp_path / "sightstream@.service")
    run = subprocess.run(
        [analyze, "verify", *(str(tmp_path / u) for u in
                              ("sightstream.service", "sightstream@gpu0.service", "sightstream.target"))],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr


def test_the_template_reads_a_per_instance_environment_file():
    unit = (UNITS / "sightstream@.service").read_text()
    assert "EnvironmentFile=/etc/sightstream/%i.env" in unit
    single = (UNITS / "sightstream.service").read_text()
    exec_start = next(line for line in single.splitlines() if line.startswith("ExecStart="))
    assert exec_start in unit  # the same command and shared config as the single daemon
    for text in (unit, single):  # the config (token, Redis password) reaches it as a credential
        assert "LoadCredential=sightstream.toml:/etc/sightstream/sightstream.toml" in text
        assert "--config ${CREDENTIALS_DIRECTORY}/sightstream.toml" in text
        # a bad setting (exit 2) is not restarted every 2 s for ever; a crash (exit 1) is
        assert "Restart=on-failure" in text and "RestartPreventExitStatus=2" in text
        assert "LimitNOFILE=65536" in text  # many clients' sockets: 1,024 is soon spent


def test_an_instance_environment_file_sets_devices_and_port(monkeypatch):
    # what the docs' example gpu1.env holds
    monkeypatch.setenv("SIGHTSTREAM_DEVICES", '["cuda:1"]')
    monkeypatch.setenv("SIGHTSTREAM_CONTROL__PORT", "8001")
    settings = Settings()
    assert settings.devices == ["cuda:1"] and settings.control.port == 8001
