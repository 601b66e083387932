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
import json

def init():
    pass

def run(raw_data):
    if json.loads(raw_data).get("fail"):
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
        call("gone", {}, auth, 502)  # the only replica stays in rotation: it fails fast

        m = scrape(admin)

        def req(service: str, cls: str) -> float:
            return m.get(("mlfe_requests_total", (("service", service), ("status_class", cls),
                                                  ("version", ""))), 0.0)

        assert req("obs", "2xx") == 3
        assert req("obs", "5xx") == 1
        assert req("obs", "4xx") == 2
        assert req("", "4xx") == 1  # the unknown service, without its name as a label
        assert req("gone", "5xx") == 2
        assert m[("mlfe_upstream_errors_total", (("kind", "refused"), ("service", "gone")))] == 2
        assert m[("mlfe_request_duration_seconds_count", (("service", "obs"),))] == 6
        assert m[("mlfe_upstream_duration_seconds_count", (("service", "obs"),))] == 4
        assert m[("mlfe_in_flight_requests", (("service", "obs"),))] == 0
        assert m[("mlfe_replicas", (("service", "obs"), ("state", "ready")))] == 1
        assert m[("mlfe_replicas", (("service", "gone"), ("state", "ready")))] == 1
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
        assert lines[-2]["error"] == "refused" and lines[-1]["error"] == "refused"
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


def test_model_data_is_collected_and_flushed_on_sigterm(tmp_path: Path) -> None:
    import asyncio

    from tests.support import Reader, post_many, raw_conn

    rep = start_replica(tmp_path, EXAMPLES / "echo" / "score.py")
    data_dir = tmp_path / "modeldata"
    router = start_router(tmp_path, {
        "router": {"data_dir": str(data_dir)},
        "services": {"dcs": {"upstreams": [f"127.0.0.1:{rep.port}"], "auth_enabled": False,
                            "collect_model_data": True},
                     "plain": {"upstreams": [f"127.0.0.1:{rep.port}"], "auth_enabled": False}},
    })
    try:
        ids: list[str] = []
        asyncio.run(post_many(router.port, "/api/v1/service/dcs/score", 300, {},
                              body=b'{"data": [[1, 2]]}', concurrency=8,
                              on_response=lambda s, h: ids.append(h["x-ms-request-id"])))
        httpx.post(f"{router.url}/api/v1/service/plain/score", json={"x": 1})
        # A body that is not JSON: an undecorated run() takes any body (as a str), and the
        # router records it as base64.
        with raw_conn(router.port) as s:
            s.sendall(b"POST /api/v1/service/dcs/score HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/octet-stream\r\nContent-Length: 5\r\n\r\n"
                      b"\x00\x01raw")
            status, headers, _ = Reader(s).response()
        assert status == 200
        ids.append(headers["x-ms-request-id"])
        router.signal()  # SIGTERM: what is still queued is written before exit
        assert router.wait_exit() == 0
    finally:
        router.stop()
        rep.stop()
    files = sorted(data_dir.glob("dcs/default/*/*/*/data-*.jsonl"))
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["requestId"] for r in records) == sorted(ids)
    assert not (data_dir / "plain").exists()
    by_id = {r["requestId"]: r for r in records}
    first = by_id[ids[0]]
    assert first["request"] == {"data": [[1, 2]]} and first["response"] == {"result": [1]}
    assert first["status"] == 200 and first["service"] == "dcs"
    raw = by_id[ids[-1]]["request"]
    assert raw == {"base64": "AAFyYXc=", "contentType": "application/octet-stream"}
