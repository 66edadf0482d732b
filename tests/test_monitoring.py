"""configs/monitoring against the code: every metric the alert rules and the Grafana
dashboard read is one the node exports, and every alert has a unit test.

(promtool itself checks and unit-tests the rules: ``make monitoring``, part of
``make test``.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "configs" / "monitoring"
METRIC = re.compile(r"\bjoynode_[a-z0-9_]+")
# What Prometheus appends to a counter's or a histogram's series.
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def exported_metrics() -> set[str]:
    """Metric names the package defines (a counter's with and without ``_total``)."""
    names: set[str] = set()
    for source in (ROOT / "joynode").rglob("*.py"):
        names.update(re.findall(r'"(joynode_[a-z0-9_]+)"', source.read_text()))
    return names | {n.removesuffix("_total") for n in names}


def base_name(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


@pytest.mark.parametrize("config", ["joynode-alerts.yml", "grafana-dashboard.json"])
def test_every_metric_read_is_exported(config: str) -> None:
    text = (MONITORING / config).read_text()
    read = set(METRIC.findall(text))
    assert read, f"{config} reads no joynode metric"
    exported = exported_metrics()
    missing = sorted(m for m in read if m not in exported and base_name(m) not in exported)
    assert missing == [], f"{config} reads metrics no code exports: {missing}"


def test_every_alert_has_a_unit_test() -> None:
    rules = (MONITORING / "joynode-alerts.yml").read_text()
    tests = (MONITORING / "joynode-alerts.test.yml").read_text()
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", rules, re.MULTILINE))
    tested = set(re.findall(r"^\s*alertname: (\w+)$", tests, re.MULTILINE))
    assert len(alerts) >= 10
    assert alerts - tested == set()
    # ... and one where it fires (a case expecting exp_labels for it).
    firing = set(re.findall(r"alertname: (\w+)\n\s*exp_alerts:\n\s*- exp_labels", tests))
    assert alerts - firing == set()


def test_the_dashboard_is_grafana_json_with_a_node_selector() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
