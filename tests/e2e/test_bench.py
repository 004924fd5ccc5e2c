"""`sightstream bench` keeps working: its pipeline modes run end to end and account for every
frame. Its figures are not asserted (timings are the bench's business, not the suite's)."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sightstream import bench

pytestmark = pytest.mark.e2e


def test_null_mode_reports_every_size_and_batch(monkeypatch):
    monkeypatch.setattr(bench, "NULL_SIZES", {"1kb": ((40, 30), 300), "1280x720": ((1280, 720), 40)})
    figures = bench.run_null(argparse.Namespace(batch_sizes="1,8"))
    assert set(figures["sizes"]) == {"1kb", "1280x720"}
    for rows in figures["sizes"].values():
        assert rows["jpeg_bytes"] > 0
        for batch in ("1", "8"):
            row = rows[batch]
            assert row["daemon_fps"] > 0
            assert 0 < row["daemon_loop_cpu_ms_per_frame"] <= row["daemon_cpu_ms_per_frame"]
    assert figures["sizes"]["1kb"]["jpeg_bytes"] < 2000  # "1 KB" frames are that small


@pytest.mark.timeout(120)
def test_daemons_mode_runs_n_processes_and_loses_nothing(tmp_path):
    out = tmp_path / "scaling.json"
    run = subprocess.run(
        [sys.executable, "-m", "sightstream", "bench", "--daemons", "2", "--frames", "400",
         "--batch-sizes", "8", "--sleep-ms", "5", "--json", str(out)],
        capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["daemons"] == 2 and figures["results_one"] == 400 and figures["results_many"] == 400
    assert figures["one_fps"] > 0 and figures["many_fps"] > 0 and figures["scaling"] > 0
    assert "scaling:" in run.stdout


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`: their command names."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(rest[1]) == pid and rest[0] != "Z":
            out[int(stat.parent.name)] = name
    return out


@pytest.mark.timeout(120)
def test_a_sigterm_stops_the_bench_and_everything_it_started():
    """A plain SIGTERM (a CI job cancelled, `timeout`) left the bench's redis-server running,
    and its data directory behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sightstream", "bench", "--daemons", "2", "--frames", "200000",
         "--batch-sizes", "8", "--sleep-ms", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            started = _children(proc.pid)
            if "redis-server" in started.values() and len(started) >= 3:  # Redis and the daemons
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the bench did not start its Redis and daemons: {started}")
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    # multiprocessing's resource tracker leaves once it reads its parent's end: a moment after
    deadline = time.monotonic() + 10
    while [pid for pid in started if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in started if _alive(pid)], f"left running: {started}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
