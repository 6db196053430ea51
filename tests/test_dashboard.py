"""The Grafana dashboard queries exactly what ray_jobs/metrics.py exports: every PromQL expression's series exist,
and every label it matches, groups by or puts in a legend is one the series carries (the metrics' own tags, or a
label Ray adds to every custom metric)."""

from __future__ import annotations

import json
import re

import pytest

from ray_jobs.metrics import EXPORTED, TAGS
from tests.k8s_schemas import ROOT
from tests.promql import legend_labels, selectors

DASHBOARD = json.loads((ROOT / "manifests/base/monitoring/scopeforge-dashboard.json").read_text())
RAY_LABELS = {"SessionName", "WorkerId", "NodeAddress", "Component", "Version"}
"""Labels Ray's metrics agent adds to every ray.util.metrics series (test_submit checks them on a real scrape)."""
RAY_OWN = {"ray_node_cpu_count"}
"""Ray's own series the dashboard uses for its session selector."""


def targets():
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target


def dashboard_queries() -> list[tuple[str, str, set[str]]]:
    """(where, PromQL, labels its legend names) of every panel target and templating query."""
    out = [(f"panel {title!r}", t["expr"], legend_labels(t.get("legendFormat", ""))) for title, t in targets()]
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_]\w*)\)", var["query"])
        assert m, var["query"]
        out.append((f"variable ${var['name']}", m.group(1), {m.group(2)}))
    return out


def dashboard_labels() -> set[str]:
    """Every label any dashboard query matches, groups by or puts in a legend."""
    return set().union(*(set().union(*(s.labels() for s in selectors(expr))) | legend
                         for _, expr, legend in dashboard_queries()))


@pytest.mark.parametrize(("where", "expr", "legend"), dashboard_queries(), ids=lambda v: v if isinstance(v, str)
                         and v.startswith(("panel", "variable")) else "")
def test_every_query_reads_exported_series_and_labels(where, expr, legend):
    sels = selectors(expr)
    assert sels, (where, expr)
    for sel in sels:
        names = sel.names(set(EXPORTED) | RAY_OWN)
        assert names, f"{where}: {expr} selects no series that ray_jobs/metrics.py exports"
        for name in names:
            carried = set(EXPORTED.get(name, ())) | RAY_LABELS
            unknown = (sel.labels() | (legend - {"__name__"})) - carried
            assert not unknown, f"{where}: {name} has no label {sorted(unknown)} (it has {sorted(carried)})"


def test_no_query_uses_the_job_label_prometheus_owns():
    assert "job" not in TAGS
    assert not dashboard_labels() & {"job", "exported_job"}
    assert {"scopeforge_job", "stage", "SessionName", "WorkerId"} <= dashboard_labels()


def test_every_exported_series_is_plotted():
    plotted = set()
    for _, target in targets():
        for sel in selectors(target["expr"]):
            plotted |= sel.names(set(EXPORTED))
    assert plotted == set(EXPORTED)


@pytest.mark.parametrize(("expr", "names", "labels"), [
    ('sum by (a, b) (rate(m_total{x=~"$v", y="1"}[1m]))', {"m_total"}, {"a", "b", "x", "y"}),
    ('{__name__=~"m_(p|q)", z!="2"}', {"m_p", "m_q"}, {"z"}),
    ("max by (a) (m_p) / min by (b) (m_q)", {"m_p", "m_q"}, None),
])
def test_the_promql_reader(expr, names, labels):
    sels = selectors(expr)
    assert set().union(*(s.names({"m_total", "m_p", "m_q", "other"}) for s in sels)) == names
    if labels is not None:
        assert set().union(*(s.labels() for s in sels)) == labels
    else:
        assert [s.grouped_by for s in sels] == [{"a"}, {"b"}]  # each side keeps its own aggregation's labels


def test_the_promql_reader_refuses_what_it_cannot_follow():
    with pytest.raises(ValueError, match="by clause after"):
        selectors("sum(m_p) by (a)")
    with pytest.raises(ValueError, match="cannot read"):
        selectors("m_p @ 5")
