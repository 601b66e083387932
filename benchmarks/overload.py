"""What mlfe does when offered more than its replicas can do: refuse fast, bound the queue.

    python -m benchmarks.overload [--quick] [--duration 30] [--factor 2]

A fixed replica pool: `--replicas` (2) `mlfe score-server --entry-script examples/slow/score.py`
processes, run() sleeping `--run-ms` (50 ms), WORKER_COUNT=1, in front of which `mlfe serve`
routes service `slow` with them as static upstreams, `replica_max_concurrent_requests: 1`
(capacity: replicas x 1000 / run-ms = 40 req/s), key auth on, one router process. An open-loop
generator (benchmarks.common.open_loop_load: requests start on a schedule, whether or not
earlier ones were answered) offers `--factor` (2) x that capacity for `--duration` seconds, in
two scenarios, each with its own router:

- `deadline`: azureml's defaults, `max_request_wait_time` 500 ms and a long queue (1024): the
  excess waits in the FIFO queue and is refused with 503 when its wait is over;
- `queue-full`: the same with `max_queue_length: --short-queue` (4): the excess is refused at
  once when the queue is full.

Reported per scenario: the share answered 200 vs 503 (and anything else), the served rate
against the capacity, the latency of 503s (p50/p99/max: must be bounded by the wait, or
immediate) and of 200s, the queue length observed (max `queued` of `GET /v1/stats`, sampled
every 100 ms) against its limit, the share of 503s with `Retry-After`, and the router's RSS
(VmRSS of /proc/<pid>/status, sampled every 100 ms) before, at most and after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    BenchmarkError,
    Child,
    LoadRecord,
    Processes,
    answers_200,
    cpu_seconds,
    fmt_num,
    free_port,
    http_get_json_async,
    http_request,
    interrupt_on_signals,
    machine_info,
    markdown_table,
    open_loop_load,
    percentile,
    rss_kib,
    run_record,
    wait_until,
    write_json,
)

SERVICE = "slow"
SCORE_PATH = f"/api/v1/service/{SERVICE}/score"
KEY = "mlfeBenchKey_0123456789abcdefghijklmnopqrst"
ADMIN_TOKEN = "mlfe-bench-admin-token-0123456789"
SLOW_SCRIPT = REPO / "examples" / "slow" / "score.py"
SAMPLE_S = 0.1
DEFAULT_QUEUE = 1024
# A 503 at the deadline may come this much after max_request_wait_time and still count as
# on time (one event-loop turn, the answer's trip, the generator's own scheduling).
DEADLINE_SLACK_MS = 50.0
IMMEDIATE_MS = 20.0  # a refusal with a full queue is "at once" under this


@dataclass(frozen=True)
class Settings:
    replicas: int
    run_ms: float
    factor: float
    duration_s: float
    max_wait_ms: int
    short_queue: int
    scenarios: tuple[str, ...]
    results_dir: Path
    quick: bool

    @property
    def capacity(self) -> float:
        return self.replicas * 1000 / self.run_ms

    @property
    def rate(self) -> float:
        return self.capacity * self.factor

    def queue_limit(self, scenario: str) -> int:
        return self.short_queue if scenario == "queue-full" else DEFAULT_QUEUE

    def to_json(self) -> dict[str, Any]:
        return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()},
                "capacity": self.capacity, "rate": self.rate}


SCENARIOS = {
    "deadline": "long queue: the excess is refused when max_request_wait_time is over",
    "queue-full": "short queue: the excess is refused at once when the queue is full",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mlfe_config(tmp: Path, s: Settings, scenario: str, port: int, admin_port: int,
                upstreams: Sequence[int]) -> dict[str, Any]:
    return {
        "router": {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
            "state_dir": str(tmp / f"mlfe-state-{scenario}"),
            "cluster_purpose": "DevTest",  # one router process: its RSS is the router's
        },
        "services": {
            SERVICE: {
                "upstreams": [f"127.0.0.1:{p}" for p in upstreams],
                "primary_key": KEY,
                "replica_max_concurrent_requests": 1,
                "max_request_wait_time": s.max_wait_ms,
                "max_queue_length": s.queue_limit(scenario),
            }
        },
    }


@dataclass
class Run:
    scenario: str
    records: list[LoadRecord]
    scheduled: int
    queued: list[tuple[float, int, int]]  # (t, queued, busy) from /v1/stats
    rss_kib: list[tuple[float, int]]
    rss_before_kib: int
    rss_after_kib: int
    router_cpu_s: float
    stats_missed: int


async def drive(s: Settings, port: int, admin_port: int, router: Child,
                scenario: str) -> Run:
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.1
    records: list[LoadRecord] = []
    queued: list[tuple[float, int, int]] = []
    rss: list[tuple[float, int]] = []
    missed = 0
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    end = s.duration_s + 0.5

    async def sampler() -> None:
        nonlocal missed
        n = 0
        while n * SAMPLE_S <= end:
            delay = t0 + n * SAMPLE_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            kib = rss_kib(router.pid)
            if kib is not None:
                rss.append((loop.time() - t0, kib))
            data = await http_get_json_async(admin_port, "/v1/stats", headers=headers,
                                             timeout_s=SAMPLE_S * 5)
            svc = (data or {}).get("services", {}).get(SERVICE)
            if svc is None:
                missed += 1
            else:
                queued.append((loop.time() - t0, int(svc["queued"]), int(svc["busy"])))
            n = max(n + 1, math.ceil((loop.time() - t0) / SAMPLE_S))

    cpu_before = cpu_seconds(router.pid)
    sampling = loop.create_task(sampler())
    rate = s.rate
    scheduled = await open_loop_load(
        port, SCORE_PATH, rate_at=lambda _t: rate, duration_s=s.duration_s, records=records,
        headers={"Authorization": f"Bearer {KEY}"}, body=b'{"data": [1]}', timeout_s=10.0,
        t0=t0,
    )
    await sampling
    return Run(scenario, records, scheduled, queued, rss, 0, 0,
               cpu_seconds(router.pid) - cpu_before, missed)


def run_scenario(s: Settings, tmp: Path, procs: Processes, scenario: str,
                 upstreams: Sequence[int], replicas: Sequence[Child]) -> Run:
    port, admin_port = free_port(), free_port()
    cfg_path = tmp / f"overload-{scenario}.yaml"
    cfg_path.write_text(yaml.safe_dump(mlfe_config(tmp, s, scenario, port, admin_port,
                                                   upstreams)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFE_ADMIN_TOKEN": ADMIN_TOKEN}
    router = procs.start(f"mlfe-serve-{scenario}",
                         [sys.executable, "-m", "deploy.cli", "serve", "--config", str(cfg_path)],
                         env=env)
    wait_until(answers_200(port, "/-/ready"), "mlfe serve: GET /-/ready", [router, *replicas])
    reply = http_request(port, "POST", SCORE_PATH, body=b'{"data": [1]}', timeout_s=5,
                         headers={"Content-Type": "application/json",
                                  "Authorization": f"Bearer {KEY}"})
    if reply is None or reply.status != 200:
        raise BenchmarkError(f"a probe request was not answered 200: {reply}\n"
                             f"{router.describe()}")
    log(f"[{scenario}] offering {s.rate:.0f} req/s ({s.factor:g} x {s.capacity:.0f} req/s "
        f"capacity) for {s.duration_s:g} s; queue limit {s.queue_limit(scenario)}")
    before = rss_kib(router.pid) or 0
    run = asyncio.run(drive(s, port, admin_port, router, scenario))
    run.rss_before_kib = before
    run.rss_after_kib = rss_kib(router.pid) or 0
    for child in (router, *replicas):
        if not child.alive():
            raise BenchmarkError(f"{child.name} died during the run\n{child.describe()}")
    procs.stop(router)
    return run


def run_benchmark(s: Settings, tmp: Path) -> list[Run]:
    with Processes(tmp) as procs:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WORKER_COUNT": "1",
               "SLOW_RUN_MS": f"{s.run_ms:g}"}
        ports, replicas = [], []
        for i in range(s.replicas):
            port = free_port()
            replicas.append(procs.start(
                f"replica-{i}",
                [sys.executable, "-m", "deploy.cli", "score-server", "--entry-script",
                 str(SLOW_SCRIPT), "--host", "127.0.0.1", "--port", str(port)], env=env))
            ports.append(port)
        for port, child in zip(ports, replicas, strict=True):
            wait_until(answers_200(port, "/"), f"{child.name} healthy", [child])
        return [run_scenario(s, tmp, procs, sc, ports, replicas) for sc in s.scenarios]


# --- summary -------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    queue_limit: int
    offered_rps: float
    capacity_rps: float
    served_rps: float
    requests: int
    ok: int
    refused: int
    other: int
    refused_p50_ms: float | None
    refused_p99_ms: float | None
    refused_max_ms: float | None
    ok_p50_ms: float | None
    ok_p99_ms: float | None
    max_queued: int | None
    max_busy: int | None
    retry_after_share: float | None
    rss_before_mib: float
    rss_max_mib: float
    rss_after_mib: float
    router_cpu_us_per_req: float | None
    router_cores: float

    @property
    def ok_share(self) -> float | None:
        return self.ok / self.requests if self.requests else None

    @property
    def refused_share(self) -> float | None:
        return self.refused / self.requests if self.requests else None

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "ok_share": self.ok_share, "refused_share": self.refused_share}


def summarise(run: Run, s: Settings) -> Row:
    recs = run.records
    ok = [r for r in recs if r[2] == 200]
    refused = [r for r in recs if r[2] == 503]
    ok_ms = [r[1] * 1e3 for r in ok]
    refused_ms = [r[1] * 1e3 for r in refused]
    done_in_run = sum(1 for r in ok if r[0] + r[1] <= s.duration_s)
    rss = [k for _, k in run.rss_kib] + [run.rss_before_kib, run.rss_after_kib]
    return Row(
        scenario=run.scenario,
        queue_limit=s.queue_limit(run.scenario),
        offered_rps=len(recs) / s.duration_s,
        capacity_rps=s.capacity,
        served_rps=done_in_run / s.duration_s,
        requests=len(recs),
        ok=len(ok),
        refused=len(refused),
        other=len(recs) - len(ok) - len(refused),
        refused_p50_ms=percentile(refused_ms, 50),
        refused_p99_ms=percentile(refused_ms, 99),
        refused_max_ms=max(refused_ms, default=None),
        ok_p50_ms=percentile(ok_ms, 50),
        ok_p99_ms=percentile(ok_ms, 99),
        max_queued=max((q for _, q, _ in run.queued), default=None),
        max_busy=max((b for _, _, b in run.queued), default=None),
        retry_after_share=(sum(1 for r in refused if r[3]) / len(refused)) if refused else None,
        rss_before_mib=run.rss_before_kib / 1024,
        rss_max_mib=max(rss) / 1024,
        rss_after_mib=run.rss_after_kib / 1024,
        router_cpu_us_per_req=run.router_cpu_s * 1e6 / len(recs) if recs else None,
        router_cores=run.router_cpu_s / s.duration_s,
    )


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def verdicts(rows: Sequence[Row], s: Settings) -> list[str]:
    out = []
    for r in rows:
        if r.refused_p99_ms is None:
            out.append(f"- {r.scenario}: no 503s (the overload did not reach the limits)")
            continue
        if r.scenario == "queue-full":
            bound, what = IMMEDIATE_MS, "at once"
        else:
            bound, what = s.max_wait_ms + DEADLINE_SLACK_MS, (
                f"by the deadline ({s.max_wait_ms} ms + {DEADLINE_SLACK_MS:g} ms)")
        fast = "yes" if r.refused_p99_ms <= bound else "NO"
        bounded = "yes" if r.max_queued is not None and r.max_queued <= r.queue_limit else "NO"
        out.append(
            f"- {r.scenario}: 503s answered {what}: {fast} (p99 {r.refused_p99_ms:.1f} ms); "
            f"queue within its limit {r.queue_limit}: {bounded} (max seen "
            f"{fmt_num(r.max_queued)}); served {r.served_rps / r.capacity_rps:.2f} x capacity")
    return out


HEADERS = ("scenario", "queue limit", "offered req/s", "capacity req/s", "served req/s",
           "200 %", "503 %", "other", "503 p50 ms", "503 p99 ms", "503 max ms", "200 p50 ms",
           "200 p99 ms", "max queued", "Retry-After %", "RSS MiB before/max/after",
           "router CPU µs/req", "router CPU cores")


def report(rows: Sequence[Row], s: Settings, machine: dict[str, Any]) -> str:
    cells = [
        [r.scenario, str(r.queue_limit), fmt_num(r.offered_rps, 1), fmt_num(r.capacity_rps, 1),
         fmt_num(r.served_rps, 1), pct(r.ok_share), pct(r.refused_share), str(r.other),
         fmt_num(r.refused_p50_ms, 1), fmt_num(r.refused_p99_ms, 1),
         fmt_num(r.refused_max_ms, 1), fmt_num(r.ok_p50_ms, 1), fmt_num(r.ok_p99_ms, 1),
         fmt_num(r.max_queued), pct(r.retry_after_share),
         f"{r.rss_before_mib:.1f}/{r.rss_max_mib:.1f}/{r.rss_after_mib:.1f}",
         fmt_num(r.router_cpu_us_per_req, 0), fmt_num(r.router_cores, 3)]
        for r in rows
    ]
    return "\n".join([
        f"Machine: {machine['cpu_model']}, {machine['nproc']} cores, Python {machine['python']}",
        f"Settings: {s.replicas} replicas x 1 slot, run() {s.run_ms:g} ms (capacity "
        f"{s.capacity:.0f} req/s), offered {s.factor:g} x capacity = {s.rate:.0f} req/s open "
        f"loop for {s.duration_s:g} s per scenario, max_request_wait_time {s.max_wait_ms} ms, "
        f"one router process; /v1/stats and VmRSS every {SAMPLE_S * 1e3:g} ms",
        "",
        markdown_table(HEADERS, cells, ["l", *["r"] * (len(HEADERS) - 1)]),  # type: ignore[list-item]
        "",
        *(f"- {sc}: {SCENARIOS[sc]}" for sc in s.scenarios),
        "",
        "router CPU: utime + stime of the `mlfe serve` process over the run (its admin API "
        "answering the 10 /v1/stats polls a second included), per offered request and in "
        "cores. At a few dozen requests a second, per-request CPU is dominated by waking "
        "processes up (each request crosses idle CPUs), not by the work itself: compare the "
        "~40 µs/req the same router spends at saturation (benchmarks.workers).",
        "",
        "Verdicts:",
        *verdicts(rows, s),
    ])


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overload",
                                description="A fixed replica pool offered more than it can do.")
    p.add_argument("--replicas", type=int, default=2, help="replicas, 1 slot each (default 2)")
    p.add_argument("--run-ms", type=float, default=50, help="run() time in ms (default 50)")
    p.add_argument("--factor", type=float, default=2.0,
                   help="offered load as a multiple of capacity (default 2)")
    p.add_argument("--duration", type=float, default=30, help="seconds per scenario (30)")
    p.add_argument("--max-wait-ms", type=int, default=500,
                   help="max_request_wait_time (default 500, azureml's)")
    p.add_argument("--short-queue", type=int, default=4,
                   help="max_queue_length of the queue-full scenario (default 4)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="smoke test: 3 s per scenario")
    a = p.parse_args(argv)
    scenarios = tuple(x.strip() for x in a.scenarios.split(","))
    unknown = [x for x in scenarios if x not in SCENARIOS]
    if unknown:
        p.error(f"--scenarios: unknown {', '.join(unknown)}")
    if a.replicas < 1 or a.run_ms <= 0 or a.factor <= 0 or a.duration <= 0 or a.short_queue < 1:
        p.error("--replicas, --run-ms, --factor, --duration and --short-queue must be > 0")
    duration = 3.0 if a.quick else a.duration
    return Settings(a.replicas, a.run_ms, a.factor, duration, a.max_wait_ms, a.short_queue,
                    scenarios, a.results_dir, a.quick)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    interrupt_on_signals()
    started = dt.datetime.now(dt.UTC)
    machine = machine_info()
    try:
        with tempfile.TemporaryDirectory(prefix="mlfe-bench-overload-") as tmp_name:
            runs = run_benchmark(s, Path(tmp_name))
    except BenchmarkError as e:
        print(f"benchmarks.overload: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks.overload: interrupted; every started process was stopped",
              file=sys.stderr)
        return 130
    rows = [summarise(r, s) for r in runs]
    print(report(rows, s, machine), flush=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = s.results_dir / f"overload-{stamp}.json"
    write_json(out, {
        **run_record("overload", started, argv, s.to_json()),
        "machine": machine,
        "mlfe_config": {sc: mlfe_config(Path("<tmp>"), s, sc, 0, 0, [0] * s.replicas)
                        for sc in s.scenarios},
        "summary": [r.to_json() for r in rows],
        "runs": [{
            "scenario": r.scenario, "scheduled": r.scheduled, "stats_missed": r.stats_missed,
            "router_cpu_s": r.router_cpu_s,
            "queued": [[round(t, 3), q, b] for t, q, b in r.queued],
            "rss_kib": [[round(t, 3), k] for t, k in r.rss_kib],
            "records": {"fields": ["scheduled_s", "latency_s", "status", "retry_after"],
                        "rows": [[round(a, 4), round(b, 5), c, d] for a, b, c, d in r.records]},
        } for r in runs],
    })
    shown = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    print(f"\nRaw data: {shown}")
    return 0


if __name__ == "__main__":
    t_start = time.monotonic()
    status = main()
    log(f"done in {time.monotonic() - t_start:.0f} s")
    sys.exit(status)
