"""The shipped alert rules (docs/alerts.yml) evaluated by Prometheus' own `promtool test rules`
against series shaped as a daemon exports them (counters created at 0 at start). Skipped where
promtool is not installed (Debian: the prometheus package; .ci/run installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).parent.parent.parent / "docs" / "alerts.yml"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def summary(alert: str, labels: dict[str, str]) -> str:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    (template,) = [r["annotations"]["summary"] for r in rules if r["alert"] == alert]
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)


def fires(alert: str, at: str, **labels: str) -> dict:
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": labels, "exp_annotations": {"summary": summary(alert, labels)}}]}


def silent(alert: str, at: str) -> dict:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def promtool(tmp_path: Path, series: dict[str, str], checks: list[dict]) -> None:
    test = {"rule_files": [str(RULES)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m",  # Prometheus' default scrape interval, the coarsest we support
                       "input_series": [{"series": s, "values": v} for s, v in series.items()],
                       "alert_rule_test": checks}]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(test))
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_file_is_valid():
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_first_abandoned_batch_and_the_first_lost_job_lease_fire(tmp_path):
    """Counted from a series that exists at 0: a series born at 1 was invisible to increase()."""
    promtool(tmp_path, {
        'sightstream_frames_abandoned_total{instance="d1",job="sightstream",pipeline="people"}': "0 0 0 1 1 1 1 1 1 1",
        'sightstream_leases_lost_total{instance="d1",job="sightstream",kind="job"}': "0 0 0 0 1 1 1 1 1 1",
    }, [
        silent("SightstreamAbandonedBatches", "2m"),
        fires("SightstreamAbandonedBatches", "4m", instance="d1", pipeline="people"),
        fires("SightstreamLeasesLost", "5m", instance="d1", kind="job"),
    ])


def test_dead_letters_are_a_share_of_the_frames_processed_not_of_those_read(tmp_path):
    """A 30 fps camera sampled to 1 fps: 2 % of its processed frames dead-lettered fires; with
    frames read as the denominator it was 0.07 % and never would."""
    minutes = 40
    per_min = lambda rate: " ".join(str(round(rate * 60 * i, 3)) for i in range(minutes))  # noqa: E731
    promtool(tmp_path, {
        'sightstream_frames_in_total{instance="d1",job="sightstream",pipeline="cams"}': per_min(30),
        'sightstream_frames_published_total{instance="d1",job="sightstream",pipeline="cams"}': per_min(0.98),
        'sightstream_frames_dead_lettered_total{instance="d1",job="sightstream",pipeline="cams",reason="bad_image"}':
            per_min(0.02),
        'sightstream_frames_in_total{instance="d1",job="sightstream",pipeline="fine"}': per_min(30),
        'sightstream_frames_published_total{instance="d1",job="sightstream",pipeline="fine"}': per_min(0.995),
        'sightstream_frames_dead_lettered_total{instance="d1",job="sightstream",pipeline="fine",reason="bad_image"}':
            per_min(0.005),
    }, [fires("SightstreamDeadLetters", "35m", pipeline="cams")])


def test_redis_errors_fire_when_they_go_on_not_for_one_burst(tmp_path):
    promtool(tmp_path, {
        'sightstream_redis_errors_total{instance="d1",job="sightstream",op="read"}': "0 5 5 5 5 5 5 5 5 5 5 5",
        'sightstream_redis_errors_total{instance="d2",job="sightstream",op="read"}': "0 5 10 15 20 25 30 35 40 45 50",
    }, [fires("SightstreamRedisErrors", "8m", instance="d2", op="read")])  # d1's one burst: not


def test_a_daemon_whose_scrape_fails_is_down(tmp_path):
    promtool(tmp_path, {'up{instance="d1",job="sightstream"}': "1 1 0 0 0 0"},
             [fires("SightstreamDown", "5m", instance="d1", job="sightstream")])


def test_a_pipeline_paused_for_its_model_fires_once_it_stays_paused(tmp_path):
    """Paused 1 min (a file being replaced): silent; paused on: fires."""
    promtool(tmp_path, {
        'sightstream_pipeline_paused{instance="d1",job="sightstream",pipeline="people"}': "0 1 0 0 1 1 1 1 1",
    }, [silent("SightstreamPipelinePaused", "3m"), fires("SightstreamPipelinePaused", "7m", instance="d1",
                                                        pipeline="people")])


def test_models_evicting_each_other_fire_a_few_evictions_do_not(tmp_path):
    promtool(tmp_path, {
        'sightstream_model_unloads_total{instance="d1",job="sightstream",device="cpu",reason="evicted"}':
            " ".join(str(20 * i) for i in range(15)),  # 20 a minute
        'sightstream_model_unloads_total{instance="d2",job="sightstream",device="cpu",reason="evicted"}':
            " ".join(str(i // 3) for i in range(15)),  # one every 3 minutes
    }, [fires("SightstreamModelsThrashing", "12m", instance="d1", device="cpu")])
