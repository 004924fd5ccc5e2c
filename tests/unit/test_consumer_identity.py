"""When a consumer name's lease may be taken from its holder at once: only when the holder is
a process of this boot and PID namespace that surely no longer runs (a daemon that crashed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sightstream.daemon.consumer import holder_is_gone, process_identity

mine = process_identity(os.getpid())
pytestmark = pytest.mark.skipif(mine is None, reason="needs Linux's /proc, of this PID namespace")


def ended() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = process_identity(proc.pid)
    proc.wait()
    assert identity is not None
    return identity


def test_a_process_that_ended_is_gone_and_a_live_one_is_not():
    assert holder_is_gone(f"{ended()}#0123")
    assert not holder_is_gone(f"{mine}#0123")


def test_a_reused_pid_is_gone_and_a_live_process_of_another_user_is_not(monkeypatch):
    boot, namespace, pid, started = str(mine).split("|")
    assert holder_is_gone(f"{boot}|{namespace}|{pid}|{int(started) - 1}#0123")  # same PID, started at another time
    # hidepid: another user's /proc entry cannot be read, but kill(pid, 0) says it lives
    def hidden(pid: int) -> str | None:
        return mine if pid == os.getpid() else None

    monkeypatch.setattr("sightstream.daemon.consumer.process_identity", hidden)
    monkeypatch.setattr("os.kill", lambda pid, sig: (_ for _ in ()).throw(PermissionError()))
    assert not holder_is_gone(f"{boot}|{namespace}|1|1#0123")


@pytest.mark.parametrize("token", [
    "0123456789abcdef",  # an older version's token: no identity
    "#0123456789abcdef",  # a host without /proc
    "other-boot|pid:[1]|1|1#0123",  # another machine, or a reboot
    "garbage|||#x",
])
def test_a_token_that_does_not_say_enough_is_never_gone(token):
    assert not holder_is_gone(token)


def test_another_pid_namespace_is_never_judged():
    boot, _, _, _ = str(mine).split("|")
    assert not holder_is_gone(f"{boot}|pid:[4026531836999]|999999|1#0123")  # a container's process
