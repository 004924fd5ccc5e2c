"""The Grafana dashboard and the alert rules in docs/ speak of metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from sightstream.metrics import Metrics

DOCS = Path(__file__).parent.parent.parent / "docs"


def exported_names() -> set[str]:
    names = set()
    for metric in Metrics().registry.collect():
        names |= {sample.name for sample in metric.samples} | {metric.name}
    # histograms' series exist once observed; counters are exported with _total
    for metric in Metrics().registry.collect():
        if metric.type == "histogram":
            names |= {f"{metric.name}_{s}" for s in ("bucket", "sum", "count")}
        if metric.type == "counter":
            names.add(f"{metric.name}_total")
    return names


def used(text: str) -> set[str]:
    return set(re.findall(r"\bsightstream_[a-z0-9_]+", text))


def test_every_metric_the_dashboard_and_alerts_use_exists():
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    rules = yaml.safe_load((DOCS / "alerts.yml").read_text())["groups"][0]["rules"]
    alerts = " ".join(r["expr"] for r in rules)
    names = exported_names()
    missing = sorted((used(exprs) | used(alerts)) - names)
    assert not missing, f"metrics the dashboard or alerts use that sightstream does not export: {missing}"
    assert {"sightstream_source_lag", "sightstream_gpu_utilization_percent"} <= used(exprs)
    assert all(r["alert"].startswith("Sightstream") and r["annotations"]["summary"] for r in rules)
