"""What the dev-test sidecar costs: its idle RSS, and its CPU per 1,000 requests.

    python -m benchmarks.sidecar [--duration 5] [--connections 16] [--quick]

`mlfe sidecar` (key auth on) in front of a synthetic replica that answers at once
(`mlfe score-server --synthetic latency=0`), with the access log off and on; wrk POSTs the
same 44-byte JSON body as benchmarks.overhead. Prints a markdown table; writes the numbers to
benchmarks/results/sidecar-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    Processes,
    answers_200,
    cpu_seconds,
    find_wrk,
    free_port,
    rss_kib,
    run_wrk,
    wait_until,
)

KEY = "sidecar-bench-key-" + "s" * 30
RESULTS = Path(__file__).resolve().parent / "results"


def measure(procs: Processes, wrk: str, access_log: bool, duration_s: int,
            connections: int) -> dict[str, float]:
    replica_port, port, admin_port = free_port(), free_port(), free_port()
    replica = procs.start(f"replica-{access_log}", [
        sys.executable, "-m", "deploy.cli", "score-server",
        "--synthetic", "latency=0,concurrency=64", "--port", str(replica_port)])
    wait_until(answers_200(replica_port, "/"), "the synthetic replica", [replica])
    state = Path(tempfile.mkdtemp(prefix="mlfe-sidecar-bench-"))
    env = {**os.environ, "MLFE_UPSTREAM": f"127.0.0.1:{replica_port}",
           "MLFE_SERVICE_NAME": "model", "MLFE_PRIMARY_KEY": KEY,
           "MLFE_LISTEN": f"127.0.0.1:{port}", "MLFE_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
           "MLFE_STATE_DIR": str(state), "MLFE_ACCESS_LOG": "true" if access_log else "false",
           "MLFE_REPLICA_MAX_CONCURRENT_REQUESTS": "64", "MLFE_PERIOD_SECONDS": "1"}
    sidecar = procs.start(f"sidecar-{access_log}", [sys.executable, "-m", "deploy.cli", "sidecar"],
                          env=env)
    wait_until(answers_200(port, "/-/ready"), "the sidecar ready", [sidecar, replica])
    idle_rss = rss_kib(sidecar.pid) or 0
    url = f"http://127.0.0.1:{port}/api/v1/service/model/score"
    before = cpu_seconds(sidecar.pid)
    result, _ = run_wrk(wrk, url, connections=connections, threads=2, duration_s=duration_s,
                        headers=[f"Authorization: Bearer {KEY}"])
    spent = cpu_seconds(sidecar.pid) - before
    procs.stop(sidecar)
    procs.stop(replica)
    return {"access_log": access_log, "idle_rss_mib": idle_rss / 1024, "rps": result.rps,
            "requests": result.requests, "errors": result.errors,
            "cpu_ms_per_1k": spent * 1e6 / max(result.requests, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sidecar", description=__doc__)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="1 s runs (for the test suite)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    duration = 1 if args.quick else args.duration
    wrk = find_wrk()
    logs = Path(tempfile.mkdtemp(prefix="mlfe-sidecar-bench-logs-"))
    with Processes(logs) as procs:
        rows = [measure(procs, wrk, log, duration, args.connections) for log in (False, True)]
    print("| access log | idle RSS MiB | req/s | CPU ms per 1k requests | errors |")
    print("| --- | --: | --: | --: | --: |")
    for r in rows:
        print(f"| {'on' if r['access_log'] else 'off'} | {r['idle_rss_mib']:.1f} | "
              f"{r['rps']:,.0f} | {r['cpu_ms_per_1k']:.1f} | {r['errors']} |")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.results_dir / f"sidecar-{stamp}.json").write_text(json.dumps(rows, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
