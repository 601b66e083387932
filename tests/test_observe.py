"""Observing a running router the ways its users expect: a stock Prometheus scraping the
metrics-only listener (no token), the Grafana dashboard's queries against what is exported, and
`mlfe top` in a terminal during load."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.top import Sample, parse_metrics, quantile, rows, table
from tests.support import EXAMPLES, REPO, Proc, free_port, post_many, start_replica, start_router

ADMIN = "admin-token-for-observe"
DASHBOARD = REPO / "deploy" / "grafana" / "mlfe-router.json"
SCORE = "/api/v1/service/obs/score"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A router with the metrics listener on, in front of one echo replica, after some traffic
    (2xx and 503s, so that every family has samples)."""
    tmp = tmp_path_factory.mktemp("observe")
    rep = start_replica(tmp, EXAMPLES / "echo" / "score.py")
    metrics_port = free_port()
    router = start_router(tmp, {
        "router": {"metrics_listen": f"127.0.0.1:{metrics_port}"},
        "services": {
            "obs": {"upstreams": [f"127.0.0.1:{rep.port}"], "auth_enabled": False},
            "gone": {"upstreams": [f"127.0.0.1:{free_port()}"], "auth_enabled": False},
        },
    }, env={"MLFE_ADMIN_TOKEN": ADMIN})
    router.extra["metrics_url"] = f"http://127.0.0.1:{metrics_port}"
    try:
        statuses = asyncio.run(post_many(router.port, SCORE, 50, {}, concurrency=4))
        assert set(statuses) == {200}
        r = httpx.post(f"{router.url}/api/v1/service/gone/score", json={})
        assert r.status_code in (502, 503)
        yield router
    finally:
        router.stop()
        rep.stop()


def admin_url(router: Proc) -> str:
    config = router.extra["config_path"].read_text()
    m = re.search(r"admin_listen: (\S+)", config)
    assert m is not None
    return "http://" + m.group(1).strip("'\"")


# ---- the metrics listener ---------------------------------------------------------------------


def test_metrics_listener_serves_the_exposition_without_a_token(router: Proc) -> None:
    r = httpx.get(router.extra["metrics_url"] + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")  # the text format
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"mlfe_requests", "mlfe_request_duration_seconds", "mlfe_replicas",
            "mlfe_router_workers", "mlfe_router_cpu_seconds"} <= names
    ok = sum(s.value for f in text_string_to_metric_families(r.text) for s in f.samples
             if s.name == "mlfe_requests_total" and s.labels["service"] == "obs"
             and s.labels["status_class"] == "2xx")
    assert ok == 50


def test_metrics_listener_exposes_nothing_else(router: Proc) -> None:
    """No admin route, key or token is reachable on it, with or without the admin token."""
    base = router.extra["metrics_url"]
    auth = {"Authorization": f"Bearer {ADMIN}"}
    for path in ("/v1/stats", "/v1/services", "/v1/services/obs/keys", "/v1/jwks.json", "/"):
        assert httpx.get(base + path, headers=auth).status_code == 404, path
    assert httpx.post(base + "/v1/services/obs/regen-key", headers=auth,
                      json={"keyType": "Primary"}).status_code in (404, 405)
    # The admin port keeps its token.
    assert httpx.get(admin_url(router) + "/metrics").status_code == 401
    assert httpx.get(admin_url(router) + "/metrics", headers=auth).status_code == 200


def test_the_router_reports_its_workers_and_cpu(router: Proc) -> None:
    text = httpx.get(router.extra["metrics_url"] + "/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("mlfe_router_workers", (("state", "current"),))] == 1
    assert samples[("mlfe_router_workers", (("state", "desired"),))] == 1
    assert samples[("mlfe_router_cpu_seconds_total", ())] > 0


# ---- the Grafana dashboard --------------------------------------------------------------------

# The parts of Grafana's dashboard model this dashboard uses, closed (no unknown keys), so that a
# typo or a panel without a query fails here rather than show an empty graph.
_TARGET = {
    "type": "object",
    "required": ["refId", "expr", "datasource"],
    "additionalProperties": False,
    "properties": {"refId": {"type": "string", "pattern": "^[A-Z]$"},
                   "expr": {"type": "string", "minLength": 1},
                   "legendFormat": {"type": "string"}, "range": {"type": "boolean"},
                   "datasource": {"$ref": "#/$defs/datasource"}},
}
_GRID = {
    "type": "object", "required": ["h", "w", "x", "y"], "additionalProperties": False,
    "properties": {"h": {"type": "integer", "minimum": 1},
                   "w": {"type": "integer", "minimum": 1, "maximum": 24},
                   "x": {"type": "integer", "minimum": 0, "maximum": 23},
                   "y": {"type": "integer", "minimum": 0}},
}
DASHBOARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {"datasource": {"type": "object", "required": ["type", "uid"],
                             "additionalProperties": False,
                             "properties": {"type": {"const": "prometheus"},
                                            "uid": {"const": "${datasource}"}}}},
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "refresh": {"type": "string"},
        "time": {"type": "object", "required": ["from", "to"]},
        "templating": {"type": "object", "required": ["list"],
                       "properties": {"list": {"type": "array", "items": {
                           "type": "object", "required": ["type", "name"],
                           "properties": {"type": {"enum": ["datasource", "query"]}}}}}},
        "panels": {"type": "array", "minItems": 1, "items": {"oneOf": [
            {"type": "object", "additionalProperties": False,
             "required": ["id", "type", "title", "gridPos", "panels", "collapsed"],
             "properties": {"id": {"type": "integer"}, "type": {"const": "row"},
                            "title": {"type": "string"}, "collapsed": {"type": "boolean"},
                            "gridPos": _GRID, "panels": {"type": "array", "maxItems": 0}}},
            {"type": "object", "additionalProperties": False,
             "required": ["id", "type", "title", "gridPos", "datasource", "targets",
                          "fieldConfig"],
             "properties": {"id": {"type": "integer"}, "type": {"const": "timeseries"},
                            "title": {"type": "string", "minLength": 1},
                            "description": {"type": "string"},
                            "gridPos": _GRID, "datasource": {"$ref": "#/$defs/datasource"},
                            "targets": {"type": "array", "minItems": 1, "items": _TARGET},
                            "fieldConfig": {"type": "object", "required": ["defaults"]},
                            "options": {"type": "object"}}},
        ]}},
    },
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def expressions(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(METRIC, LABEL)
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["query"]["query"])
            assert m, var
            exprs.append(f"count by ({m.group(2)}) ({m.group(1)})")
    return exprs


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """The series names and label names an expression reads, from PromQL's own grammar (the
    dashboard's variables replaced by what Grafana puts in their place)."""
    concrete = expr.replace("$__rate_interval", "1m").replace("$service", ".*")
    metrics: set[str] = set()
    labels: set[str] = set()

    def walk(node: Any) -> None:
        kind = type(node).__name__
        if kind == "VectorSelector":
            if node.name:
                metrics.add(node.name)
            for group in (node.matchers.matchers, *node.matchers.or_matchers):
                labels.update(m.name for m in group if m.name != "__name__")
        elif kind == "MatrixSelector":
            walk(node.vector_selector)
        elif kind == "AggregateExpr":
            if node.modifier is not None:
                labels.update(node.modifier.labels)
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif kind == "Call":
            for arg in node.args:
                walk(arg)
        elif kind == "BinaryExpr":
            walk(node.lhs)
            walk(node.rhs)
        elif kind in ("ParenExpr", "UnaryExpr"):
            walk(node.expr)
        elif kind not in ("NumberLiteral", "StringLiteral"):
            raise AssertionError(f"unexpected PromQL node {kind} in {expr!r}")

    walk(promql_parser.parse(concrete))
    return metrics, labels


def test_dashboard_is_a_valid_grafana_dashboard() -> None:
    dash = dashboard()
    jsonschema.validate(dash, DASHBOARD_SCHEMA)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("status class", "queue wait", "replica time", "routing", "queue depth",
                  "desired", "ready", "refused", "errors", "workers", "cpu"):
        assert topic in titles, topic


def test_every_dashboard_query_names_only_exported_series(router: Proc) -> None:
    text = httpx.get(router.extra["metrics_url"] + "/metrics").text
    series: set[str] = set()
    labels: set[str] = {"le"}  # histogram buckets' own label
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            series.add(s.name)
            labels.update(s.labels)
    exprs = expressions(dashboard())
    assert len(exprs) >= 15
    for expr in exprs:
        used_metrics, used_labels = names_in(expr)
        assert used_metrics, expr
        assert used_metrics <= series, (expr, used_metrics - series)
        assert used_labels <= labels, (expr, used_labels - labels)


def test_the_name_check_catches_a_wrong_name() -> None:
    """The check above can fail: a misspelt series or a label the router never sets."""
    assert names_in('sum by (pod) (rate(mlfe_request_total{service=~"$service"}[$__rate_interval]))'
                    ) == ({"mlfe_request_total"}, {"pod", "service"})


# ---- mlfe top ---------------------------------------------------------------------------------


def test_quantile_interpolates_within_the_interval_s_buckets() -> None:
    before = [(0.1, 10.0), (0.2, 10.0), (float("inf"), 10.0)]
    after = [(0.1, 10.0), (0.2, 110.0), (float("inf"), 110.0)]  # 100 new ones, all 0.1-0.2 s
    assert quantile(0.5, before, after) == pytest.approx(0.15)
    assert quantile(0.99, before, after) == pytest.approx(0.199)
    assert quantile(0.5, after, after) is None  # nothing new
    # Beyond the last finite bound: that bound (as histogram_quantile does).
    assert quantile(0.99, [], [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1


def test_rows_are_rates_over_the_interval() -> None:
    buckets = [(0.01, 0.0), (float("inf"), 0.0)]
    prev = Sample(10.0, {"a": {"completed": 100, "replicas": 1, "busy": 0, "queued": 0}},
                  {"a": buckets}, {"a": 3.0})
    cur = Sample(12.0, {"a": {"completed": 140, "replicas": 2, "desired": 3, "busy": 4,
                              "queued": 5}},
                 {"a": [(0.01, 40.0), (float("inf"), 40.0)]}, {"a": 7.0})
    (row,) = rows(prev, cur)
    assert row == ("a", "20.0", "5.0", "9.9", "4", "5", "2/3", "2.0")
    assert "READY/DESIRED" in table([row]).splitlines()[0]


def test_parse_metrics_reads_latency_and_503s(router: Proc) -> None:
    latency, rejected = parse_metrics(httpx.get(router.extra["metrics_url"] + "/metrics").text)
    assert latency["obs"][-1] == (float("inf"), 50.0)
    assert rejected["obs"] == 0 and "gone" in rejected


def test_mlfe_top_shows_the_service_and_its_rate_under_load(router: Proc, tmp_path: Path) -> None:
    stop = threading.Event()

    def load() -> None:
        async def go() -> None:
            while not stop.is_set():
                await post_many(router.port, SCORE, 20, {}, concurrency=2)

        asyncio.run(go())

    loader = threading.Thread(target=load)
    loader.start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "top", "-n", "3", "--interval", "0.5",
             "--admin-url", admin_url(router), "--state-dir", str(tmp_path)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env={"MLFE_ADMIN_TOKEN": ADMIN, "PATH": "/usr/bin:/bin"},
        )
    finally:
        stop.set()
        loader.join(timeout=30)
    assert out.returncode == 0, out.stderr
    frames = [f for f in out.stdout.split("\n\n") if f.strip()]
    assert len(frames) == 3
    assert "\x1b[" not in out.stdout  # not a terminal: plain frames, no screen control
    obs = [line.split() for line in out.stdout.splitlines() if line.startswith("obs ")]
    assert len(obs) == 3
    rates = [float(cols[1]) for cols in obs]
    assert max(rates) > 0, out.stdout
    assert any(cols[2] != "-" for cols in obs)  # a p50 from the interval's requests
    assert ADMIN not in out.stdout + out.stderr


def test_mlfe_top_without_a_token_says_how_to_give_one(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "top", "-n", "1", "--state-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 1 and "no admin token" in out.stderr
