"""Metrics and the access log after known traffic, read from a real router; no secret leaks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support import EXAMPLES, free_port, start_replica, start_router

ADMIN = "admin-token-for-tests"
KEY = "observed-key-" + "o" * 32
ERRORS_SCRIPT = '''
def init():
    pass

def run(data):
    if data.get("fail"):
        raise RuntimeError("boom")
    return {"ok": True}
'''


def scrape(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{admin}/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def access_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        if line.startswith("{") and '"requestId"' in line:
            lines.append(json.loads(line))
    return lines


def test_metrics_and_access_log_after_known_traffic(tmp_path: Path) -> None:
    script = tmp_path / "errs.py"
    script.write_text(ERRORS_SCRIPT)
    rep = start_replica(tmp_path, script)
    admin_port = free_port()
    router = start_router(tmp_path, {
        "router": {"admin_listen": f"127.0.0.1:{admin_port}"},
        "services": {
            "obs": {"upstreams": [f"127.0.0.1:{rep.port}"], "primary_key": KEY},
            "gone": {"upstreams": [f"127.0.0.1:{free_port()}"], "primary_key": KEY},
        },
    }, env={"MLFE_ADMIN_TOKEN": ADMIN})
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        base = f"{router.url}/api/v1/service"
        auth = {"Authorization": f"Bearer {KEY}"}
        sent: list[tuple[str, int]] = []

        def call(service: str, body: dict[str, Any], headers: dict[str, str], expect: int) -> None:
            r = httpx.post(f"{base}/{service}/score", json=body,
                           headers={**headers, "x-ms-client-request-id": f"c{len(sent)}"})
            assert r.status_code == expect, r.text
            sent.append((r.headers["x-ms-request-id"], expect))

        for _ in range(3):
            call("obs", {}, auth, 200)
        call("obs", {"fail": True}, auth, 500)
        call("obs", {}, {"Authorization": "Bearer wrong-" + KEY}, 401)
        call("obs", {}, {}, 401)
        call("nope", {}, auth, 404)
        call("gone", {}, auth, 502)
        call("gone", {}, auth, 503)

        m = scrape(admin)

        def req(service: str, cls: str) -> float:
            return m.get(("mlfe_requests_total", (("service", service), ("status_class", cls),
                                                  ("version", ""))), 0.0)

        assert req("obs", "2xx") == 3
        assert req("obs", "5xx") == 1
        assert req("obs", "4xx") == 2
        assert req("", "4xx") == 1  # the unknown service, without its name as a label
        assert req("gone", "5xx") == 2
        assert m[("mlfe_upstream_errors_total", (("kind", "refused"), ("service", "gone")))] == 1
        assert m[("mlfe_rejected_requests_total",
                  (("reason", "no_replica"), ("service", "gone")))] == 1
        assert m[("mlfe_request_duration_seconds_count", (("service", "obs"),))] == 6
        assert m[("mlfe_upstream_duration_seconds_count", (("service", "obs"),))] == 4
        assert m[("mlfe_in_flight_requests", (("service", "obs"),))] == 0
        assert m[("mlfe_replicas", (("service", "obs"), ("state", "ready")))] == 1
        assert m[("mlfe_replicas", (("service", "gone"), ("state", "ready")))] == 0
        assert not any("nope" in str(labels) for _, labels in m)

        # Stopping the router flushes its access log: one line per request, in order.
        router.signal()
        assert router.wait_exit() == 0
        log = router.log()
        lines = access_lines(log)
        assert [(line["requestId"], line["status"]) for line in lines] == sent
        first = lines[0]
        assert first["service"] == "obs" and first["method"] == "POST"
        assert first["clientRequestId"] == "c0" and first["replica"] == f"127.0.0.1:{rep.port}"
        assert first["bytesIn"] == 2 and first["bytesOut"] > 0
        for k in ("authMs", "queueMs", "upstreamMs", "totalMs"):
            assert isinstance(first[k], float) and first[k] >= 0
        assert first["totalMs"] >= first["upstreamMs"]
        assert lines[-2]["error"] == "refused" and lines[-1]["error"] == "no_replica"
        # No key appears in any log line or metric.
        keys = json.loads((router.extra["state_dir"] / "keys.json").read_text())
        secrets = [KEY, ADMIN] + [v for k in keys.values() for n, v in k.items()
                                  if n in ("primaryKey", "secondaryKey")]
        text = log + "\n".join(str(x) for x in m)
        for secret in secrets:
            assert secret not in text
    finally:
        router.stop()
        rep.stop()


def test_metrics_need_the_admin_token(tmp_path: Path) -> None:
    admin_port = free_port()
    rep = start_replica(tmp_path, EXAMPLES / "echo" / "score.py")
    router = start_router(tmp_path, {
        "router": {"admin_listen": f"127.0.0.1:{admin_port}"},
        "services": {"obs": {"upstreams": [f"127.0.0.1:{rep.port}"]}},
    }, env={"MLFE_ADMIN_TOKEN": ADMIN})
    try:
        r = httpx.get(f"http://127.0.0.1:{admin_port}/metrics")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    finally:
        router.stop()
        rep.stop()
