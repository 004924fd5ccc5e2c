"""`sightstream bench` keeps working: its pipeline modes run end to end and account for every
frame. Its figures are not asserted (timings are the bench's business, not the suite's)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

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
