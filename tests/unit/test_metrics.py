"""Counters whose label values are known exist at 0 from the start: Prometheus' rate() and
increase() take a series' first sample as its start, so an event that created its own series
(the first dead-letter, the first abandoned batch, the first lost lease) went unseen by alerts."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from sightstream.metrics import DEAD_LETTER_REASONS, Metrics

ROOT = Path(__file__).parent.parent.parent


def series(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_counters_that_alerts_use_exist_at_zero_for_every_pipeline_and_jobs():
    seen = series(Metrics(pipelines=["people", "cars"]))
    for pipeline in ("people", "cars", "jobs"):
        assert seen[f'sightstream_frames_abandoned_total{{pipeline="{pipeline}"}}'] == 0
        assert seen[f'sightstream_frames_in_total{{pipeline="{pipeline}"}}'] == 0
        assert seen[f'sightstream_frames_dead_lettered_total{{pipeline="{pipeline}",reason="bad_image"}}'] == 0
        assert seen[f'sightstream_model_retries_total{{pipeline="{pipeline}",reason="timeout"}}'] == 0
        assert seen[f'sightstream_frames_acked_without_result_total{{pipeline="{pipeline}",reason="stale"}}'] == 0
    for kind in ("consumer", "source", "job"):
        assert seen[f'sightstream_leases_lost_total{{kind="{kind}"}}'] == 0
    for status in ("completed", "failed", "cancelled"):
        assert seen[f'sightstream_jobs_finished_total{{status="{status}"}}'] == 0


def test_model_load_counters_exist_at_zero_for_each_device():
    m = Metrics()
    m.start_devices(["cuda:0", "cuda:1"])
    seen = series(m)
    assert seen['sightstream_model_loads_total{device="cuda:1"}'] == 0
    assert seen['sightstream_model_unloads_total{device="cuda:0",reason="idle"}'] == 0


def test_the_dead_letter_reasons_are_those_the_contract_lists_and_the_code_gives():
    table = (ROOT / "docs" / "contract.md").read_text().split("## Dead-letter entries")[1].split("\n## ")[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
    assert documented == set(DEAD_LETTER_REASONS)
    given = set()
    for path in (ROOT / "sightstream").rglob("*.py"):
        given |= set(re.findall(r'FrameError\(\s*"([a-z_]+)"', path.read_text()))
    assert given and given <= set(DEAD_LETTER_REASONS), given - set(DEAD_LETTER_REASONS)


def test_capture_latency_is_measured_past_a_minute():
    """A backlog of minutes read as 60 s (the last bucket), flat on the dashboard."""
    m = Metrics(pipelines=["people"])
    m.e2e_latency_seconds.labels("people").observe(150)
    seen = series(m)
    assert seen['sightstream_e2e_latency_seconds_bucket{le="120.0",pipeline="people"}'] == 0
    assert seen['sightstream_e2e_latency_seconds_bucket{le="300.0",pipeline="people"}'] == 1
