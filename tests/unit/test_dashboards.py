"""The Grafana dashboard and the alert rules in docs/ speak of metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from sightstream.metrics import Metrics

DOCS = Path(__file__).parent.parent.parent / "docs"


def exported_names() -> set[str]:
    """The series names Prometheus sees: counters with _total, histograms' _bucket/_sum/_count,
    gauges as they are."""
    names = set()
    for metric in Metrics().registry.collect():
        if metric.type == "counter":
            names.add(f"{metric.name}_total")
        elif metric.type == "histogram":
            names |= {f"{metric.name}_{s}" for s in ("bucket", "sum", "count")}
        else:
            names.add(metric.name)
    return names


def labels_of() -> dict[str, set[str]]:
    """Each metric's label names (plus what Prometheus adds), by its base name."""
    out: dict[str, set[str]] = {}
    for wrapper in vars(Metrics()).values():
        if hasattr(wrapper, "_labelnames"):
            out[wrapper._name] = set(wrapper._labelnames) | {"le", "instance", "job"}
    return out


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
    # every `by (...)` label is one the metrics carry
    known = set().union(*(ls for name, ls in labels_of().items() if name.startswith("sightstream_")))
    grouped = {label.strip() for by in re.findall(r"by \(([^)]*)\)", exprs + alerts) for label in by.split(",")}
    assert grouped <= known, grouped - known
    assert all(r["alert"].startswith("Sightstream") and r["annotations"]["summary"] for r in rules)
