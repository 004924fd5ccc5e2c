"""Producers' clocks as their frames show them: said once per source every 10 minutes."""

from __future__ import annotations

from structlog.testing import capture_logs

from sightstream.stages.clock_skew import SAY_EVERY_S, ClockSkews


def test_a_skewed_source_is_said_once_per_period_and_its_latest_skew_kept():
    now = [1000.0]
    skews = ClockSkews(clock=lambda: now[0])
    with capture_logs() as logged:
        for _ in range(50):
            skews.note("p", "cam1", -30_500)
            skews.note("p", "cam2", 300)  # an encoder's delay: not said
        now[0] += SAY_EVERY_S - 1
        skews.note("p", "cam1", -30_400)
        now[0] += 1
        skews.note("p", "cam1", 5_000_000)
    said = [(e["source"], e["problem"]) for e in logged if e["event"] == "source_clock_skew"]
    assert said == [("cam1", "its frames' ts is 30.5 s before they reached Redis"),
                    ("cam1", "its frames' ts is 1.4 hours after they reached Redis")]
    assert skews.of("p", "cam1") == 5_000_000 and skews.of("p", "cam2") == 300
    assert skews.of("p", "cam3") is None and skews.of("q", "cam1") is None
