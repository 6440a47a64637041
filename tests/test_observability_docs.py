"""The dashboard, the alert rules and docs/observability.md name the metrics the
code exports, and only those: a metric renamed in code fails here, not on a
dashboard that silently goes blank."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import ledgerflow.gauges  # noqa: F401 - the gauges are registered with the metrics
from ledgerflow import metrics  # noqa: F401

DOCS = Path(__file__).parent.parent / "docs"
NAME = re.compile(r"\bledgerflow_[a-z_]+")


def exported() -> set[str]:
    """Every sample name ledgerflow's metrics can have (histograms' _bucket, _sum
    and _count; counters' _total), and the family names."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("ledgerflow_"):
            continue
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
    return names


def families() -> set[str]:
    found = set()
    for family in REGISTRY.collect():
        if family.name.startswith("ledgerflow_"):
            found.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return found


def test_the_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DOCS / "grafana" / "ledgerflow-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(dashboard["panels"]) >= 12
    used = {name for expr in expressions for name in NAME.findall(expr)}
    assert used <= exported(), used - exported()
    # Every metric is on the dashboard somewhere.
    assert {n for n in families() if n != "ledgerflow_ledger_head_position"} <= {
        n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used
    } | {n for n in used if n.endswith("_total")}


def test_the_three_alert_rules_are_well_formed_and_use_exported_metrics() -> None:
    document = yaml.safe_load((DOCS / "prometheus" / "ledgerflow-alerts.yml").read_text())
    (group,) = document["groups"]
    rules = group["rules"]
    assert [r["alert"] for r in rules] == [
        "LedgerflowInstancesStuck",
        "LedgerflowProjectionLagging",
        "LedgerflowBreakerOpenTooLong",
    ]
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        assert set(NAME.findall(rule["expr"])) <= exported()


def test_the_docs_list_every_metric() -> None:
    text = (DOCS / "observability.md").read_text()
    listed = set(re.findall(r"`(ledgerflow_[a-z_]+)`", text))
    assert families() <= listed, families() - listed
    assert listed <= exported(), listed - exported()
