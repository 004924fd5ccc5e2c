"""The soak (`make soak`) in a short window, so the script keeps working between real runs: every
fault once, and nothing lost, doubled or left pending. Memory is judged only by the real run."""

from __future__ import annotations

import pytest

from tests.soak import soak

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(240)
def test_a_short_soak_loses_and_doubles_nothing(tmp_path):
    report = soak(30, 0.2, tmp_path, log=lambda line: None)
    steady, live = report["pipelines"]["steady"], report["pipelines"]["live"]
    assert report["d0_killed"] >= 2 and report["redis_restarts"] == ["aof", "none"]
    assert steady["published"] > 200 and steady["malformed"] > 10 and live["published"] > 1000
    assert steady["lost"] == 0 and steady["doubled"] == 0 and live["doubled"] == 0
    assert steady["wrong_reason"] == 0  # each malformed frame dead-lettered with its reason
    assert steady["results"] + steady["dead_letters"] + steady["wiped_with_redis"] == steady["published"]
    assert report["pending_at_end"] == 0 and report["left_in_redis"] == 0
    assert not report["unexpected_exits"]
