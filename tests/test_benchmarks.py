"""The overhead benchmark runs end to end: real nginx, wrk, `mlfe score-server` and `mlfe serve`.

nginx and wrk are installed by CI (`apt-get install nginx-light wrk`), so nothing here is skipped.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import (
    lua_body,
    markdown_table,
    nginx_proxy,
    parse_wrk,
    render_nginx_conf,
)

REPO = Path(__file__).resolve().parents[1]
# mlfe+log:py (the pure-Python build beside a compiled one) only when this checkout is compiled.
PATHS = ("direct", "nginx", "bare", "mlfe", "mlfe+log") + (
    ("mlfe+log:py",) if list((REPO / "router").glob("*.so")) else ())

WRK_REPORT = """\
Running 5s test @ http://127.0.0.1:8080/api/v1/service/bench/score
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.05us  401.30us  12.50ms   91.20%
    Req/Sec    19.01k     1.20k   21.30k    70.00%
  Latency Distribution
     50%  750.00us
     75%    0.90ms
     90%    1.10ms
     99%    2.05ms
  189210 requests in 5.00s, 27.60MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 17
Requests/sec:  37838.52
Transfer/sec:      5.52MB
"""


def test_parse_wrk_reads_numbers_and_errors() -> None:
    r = parse_wrk(WRK_REPORT)
    assert r.requests == 189210
    assert r.duration_s == pytest.approx(5.0)
    assert r.rps == pytest.approx(37838.52)
    assert r.percentiles_ms["50"] == pytest.approx(0.75)
    assert r.percentiles_ms["99"] == pytest.approx(2.05)
    assert r.latency_max_ms == pytest.approx(12.5)
    assert r.non_2xx == 17
    assert r.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 1}
    assert not r.valid
    assert r.error_summary() == "17 non-2xx, 2 read, 1 timeout"


def test_parse_wrk_clean_run_is_valid() -> None:
    clean = "\n".join(
        line for line in WRK_REPORT.splitlines()
        if not line.lstrip().startswith(("Socket errors", "Non-2xx"))
    )
    assert parse_wrk(clean).valid


def test_request_body_is_44_bytes_of_json() -> None:
    body = lua_body()
    assert len(body) == 44
    json.loads(body)


def test_nginx_conf_keeps_every_path_under_its_prefix(tmp_path: Path) -> None:
    http_extra, location = nginx_proxy("127.0.0.1:5001", rewrite_to="/score")
    conf = render_nginx_conf(tmp_path, listen_port=9999, location=location, http_extra=http_extra)
    for directive in ("pid", "error_log", "client_body_temp_path", "proxy_temp_path"):
        m = re.search(rf"^\s*{directive} (\S+)", conf, re.M)
        assert m is not None and m.group(1).startswith(str(tmp_path)), directive
    assert "access_log off;" in conf
    assert "worker_processes 1;" in conf
    assert "keepalive 256;" in conf


def test_markdown_table_aligns_columns() -> None:
    out = markdown_table(["path", "req/s"], [["direct", "1,000"], ["mlfe", "12"]], ["l", "r"])
    assert out.splitlines() == [
        "| path   | req/s |",
        "| ------ | ----: |",
        "| direct | 1,000 |",
        "| mlfe   |    12 |",
    ]


def test_overhead_quick_prints_a_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--quick", "--results-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows: dict[str, list[float]] = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0] in PATHS:
            rows.setdefault(cells[0], []).append(float(cells[2].replace(",", "")))
            if cells[0] not in ("direct", "nginx"):  # CPU per request, and over bare's
                assert float(cells[8]) > 0 and float(cells[9]) > 0, proc.stdout
    assert set(rows) == set(PATHS), proc.stdout
    for path, rps in rows.items():
        assert len(rps) == 2, (path, proc.stdout)  # c=1 and c=32
        assert all(v > 0 for v in rps), (path, proc.stdout)
    assert "upstream nginx, mlfe+log: c=32 req/s" in proc.stdout

    results = list(tmp_path.glob("overhead-*.json"))
    assert len(results) == 1
    data = json.loads(results[0].read_text())
    assert data["machine"]["nproc"] >= 1
    assert {r["path"] for r in data["runs"]} == set(PATHS)
    assert all(r["valid"] for r in data["runs"])
