"""A soak: mlfe at full load for a long time with a mix of answers, and a model too slow for
its deadline. Does anything grow, leak or stop answering?

    python -m benchmarks.soak [--duration 600] [--connections 64] [--quick]

One `mlfe serve` (one router process, key auth on, access log on as by default: its stdout to a
file) in front of two synthetic replicas (`mlfe score-server --synthetic`):

- `fast`: answers at once; wrk loads it closed-loop with `--connections` for the whole run, in
  back-to-back chunks of `--chunk` seconds (a p99 per chunk), with a mix per 16 requests of
  13 good ones (200), 2 with a wrong key (401) and 1 with a body over `router.max_body_bytes`
  (413, refused before its body is read; the connection closes);
- `slow`: a model that takes `--slow-ms` (400) per call, more than the service's
  `scoring_timeout_ms` (100), with the router's per-replica cap at 2
  (`replica_max_concurrent_requests`) and `max_request_wait_time` 300 ms; `--slow-clients` (8)
  loop on it. Each gets a 504 (timed out on the replica) or a 503 (waited its 300 ms). The
  synthetic replica runs up to 64 calls at once and reports the most it saw (`GET /stats`
  `maxRunning`): with the cap holding, never more than 2;
- client aborts: `--abort-rate` (20) a second, alternately a request cut off halfway through
  its body and a whole request to `slow` whose client leaves 20 ms later.

Sampled every `--sample` seconds: the router's RSS (VmRSS), its open file descriptors
(/proc/<pid>/fd), its asyncio Tasks (`mlfe_event_loop_tasks` from the admin `/metrics`).
Reported: a table per chunk (req/s, p50/p99, RSS, fds, tasks), the answers by status, the slow
clients' answer times against the deadline (scoring_timeout_ms + max_request_wait_time + 200 ms
of slack), the replica's max concurrency against the cap, and verdicts: RSS flat (the last
minute's median within 5 % of the first minute's after warm-up), fds and Tasks flat, every slow
request answered by its deadline, the cap held. A plot of RSS, fds, Tasks and p99 over time goes
to benchmarks/results/soak-<timestamp>.png (matplotlib, the `bench` extra), every sample to
the JSON beside it. `--quick` (a few seconds) only checks that it all runs: its verdicts are
printed, not held against it. Exit status 1 when a full run misses a verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    BenchmarkError,
    Child,
    Processes,
    _read_response,
    answers_200,
    find_wrk,
    fmt_num,
    free_port,
    http_get_json_async,
    interrupt_on_signals,
    machine_info,
    markdown_table,
    median,
    mlfe_build,
    percentile,
    rss_kib,
    run_record,
    run_wrk,
    wait_until,
    write_json,
)

KEY = "mlfeSoakKey_0123456789abcdefghijklmnopqrstu"
ADMIN_TOKEN = "mlfe-soak-admin-token-0123456789"
CAP = 2
TIMEOUT_MS = 100
MAX_WAIT_MS = 300
DEADLINE_SLACK_MS = 200
MAX_BODY = 16 * 1024
FLAT_RSS = 0.05


@dataclass(frozen=True)
class Settings:
    duration_s: float
    chunk_s: int
    connections: int
    slow_clients: int
    slow_ms: int
    abort_rate: float
    sample_s: float
    warmup_s: float
    results_dir: Path
    quick: bool

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


@dataclass
class Chunk:
    t: float  # seconds since the load started, at the chunk's end
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    socket_errors: dict[str, int]


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    tasks: int | None


@dataclass
class Soak:
    chunks: list[Chunk] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    slow: list[tuple[float, float, int]] = field(default_factory=list)  # t, ms, status
    aborts: Counter[str] = field(default_factory=Counter)
    replica_stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


WRK_SCRIPT = """\
-- the soak's mix, per 16 requests: 13 good (200), 2 wrong key (401), 1 too large (413)
local good, bad, big  -- built in init(): wrk knows the Host header only by then
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args)
  counts = {{}}; n = 0
  local json = {{["Host"] = wrk.headers["Host"], ["Content-Type"] = "application/json"}}
  local function with(auth)
    local h = {{}}
    for k, v in pairs(json) do h[k] = v end
    h["Authorization"] = auth
    return h
  end
  good = wrk.format("POST", "{path}", with("Bearer {key}"), '{{"data": [[1, 2, 3, 4]]}}')
  bad = wrk.format("POST", "{path}", with("Bearer wrong-{key}"), '{{"data": [[1, 2, 3, 4]]}}')
  big = wrk.format("POST", "{path}", with("Bearer {key}"), string.rep("x", {big}))
end
function request()
  n = n + 1
  local i = n % 16
  if i == 5 or i == 11 then return bad end
  if i == 15 then return big end
  return good
end
function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {{}}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    for s, k in pairs(c) do total[s] = (total[s] or 0) + k end
  end
  for s, k in pairs(total) do io.write(string.format("status %d %d\\n", s, k)) end
end
"""


def mlfe_config(tmp: Path, port: int, admin_port: int, fast: int, slow: int) -> dict[str, Any]:
    return {
        "router": {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
            "state_dir": str(tmp / "mlfe-state"),
            "cluster_purpose": "DevTest",  # one router process: its RSS and fds are the router's
            "max_body_bytes": MAX_BODY,
        },
        "services": {
            "fast": {"upstreams": [f"127.0.0.1:{fast}"], "primary_key": KEY,
                     "replica_max_concurrent_requests": 256, "max_queue_length": 4096},
            "slow": {"upstreams": [f"127.0.0.1:{slow}"], "primary_key": KEY,
                     "replica_max_concurrent_requests": CAP, "scoring_timeout_ms": TIMEOUT_MS,
                     "max_request_wait_time": MAX_WAIT_MS},
        },
    }


def _request(path: str, body: bytes, key: str = KEY) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def slow_client(port: int, t0: float, until: float, out: list[tuple[float, float, int]]
                      ) -> None:
    """Loops on the slow service over one kept-alive connection (a new one when it closes)."""
    loop = asyncio.get_running_loop()
    request = _request("/api/v1/service/slow/score", b'{"data": [1]}')
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while loop.time() < until:
        start = loop.time()
        status = 0
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            conn[1].write(request)
            async with asyncio.timeout(5):
                status, hdrs, _ = await _read_response(conn[0])
            if hdrs.get("connection", "").lower() == "close":
                conn[1].close()
                conn = None
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            if conn is not None:
                conn[1].close()
            conn = None
        out.append((start - t0, (loop.time() - start) * 1e3, status))
        if status == 0:
            await asyncio.sleep(0.05)  # a failed connection: do not spin
    if conn is not None:
        conn[1].close()


async def aborter(port: int, rate: float, until: float, counts: Counter[str]) -> None:
    """Clients that leave: half a body then gone; or a whole request to `slow`, gone 20 ms on."""
    loop = asyncio.get_running_loop()
    n = 0
    start = loop.time()
    while loop.time() < until:
        n += 1
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_failed"] += 1
            continue
        if n % 2:
            body = b'{"data": [' + b"1, " * 200 + b"1]}"
            req = _request("/api/v1/service/fast/score", body)
            writer.write(req[: len(req) - len(body) // 2])
            counts["mid_body"] += 1
        else:
            writer.write(_request("/api/v1/service/slow/score", b'{"data": [1]}'))
            await asyncio.sleep(0.02)  # the client's patience: leaves while the model works
            counts["awaiting_answer"] += 1
        writer.transport.abort()


async def sampler(router: Child, admin_port: int, t0: float, until: float, every: float,
                  out: list[Sample]) -> None:
    loop = asyncio.get_running_loop()
    n = 0
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    while True:
        at = t0 + n * every
        if at > until:
            return
        if at > loop.time():
            await asyncio.sleep(at - loop.time())
        n += 1
        kib = rss_kib(router.pid)
        try:
            fds = len(os.listdir(f"/proc/{router.pid}/fd"))
        except OSError:
            fds = -1
        tasks = await scrape(admin_port, headers)
        n_tasks = tasks.get("mlfe_event_loop_tasks")
        if kib is not None:
            out.append(Sample(loop.time() - t0, kib, fds,
                              None if n_tasks is None else int(n_tasks)))


async def scrape(admin_port: int, headers: dict[str, str]) -> dict[str, float]:
    """The admin /metrics as {name{labels}: value} (text format, unlabelled names bare)."""
    reader = writer = None
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
            writer.write((f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                          f"Authorization: {headers['Authorization']}\r\n\r\n").encode())
            status, _, body = await _read_response(reader)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return {}
    finally:
        if writer is not None:
            writer.close()
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


async def drive(s: Settings, wrk: str, script: Path, port: int, admin_port: int,
                router: Child, slow_port: int) -> Soak:
    loop = asyncio.get_running_loop()
    soak = Soak()
    t0 = loop.time()
    until = t0 + s.duration_s
    background = [
        loop.create_task(sampler(router, admin_port, t0, until, s.sample_s, soak.samples)),
        loop.create_task(aborter(port, s.abort_rate, until, soak.aborts)),
        *(loop.create_task(slow_client(port, t0, until, soak.slow))
          for _ in range(s.slow_clients)),
    ]
    url = f"http://127.0.0.1:{port}/api/v1/service/fast/score"
    while True:
        left = until - loop.time()
        if left < 1:
            break
        chunk_s = max(1, min(s.chunk_s, int(left)))
        result, raw = await asyncio.to_thread(
            run_wrk, wrk, url, connections=s.connections, threads=2, duration_s=chunk_s,
            script=script, timeout_s=5)
        statuses: dict[str, int] = {}
        for line in raw.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "status":
                statuses[parts[1]] = int(parts[2])
        soak.chunks.append(Chunk(loop.time() - t0, result.rps, result.percentiles_ms["50"],
                                 result.percentiles_ms["99"], statuses, result.socket_errors))
        c = soak.chunks[-1]
        log(f"t={c.t:6.1f}s  {fmt_num(c.rps)} req/s  p99 {c.p99_ms:.2f} ms  "
            f"statuses {statuses}  rss {soak.samples[-1].rss_kib // 1024 if soak.samples else 0}"
            f" MiB  fds {soak.samples[-1].fds if soak.samples else 0}")
    await asyncio.gather(*background)
    soak.replica_stats = await http_get_json_async(slow_port, "/stats") or {}
    soak.metrics = await scrape(admin_port, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    return soak


# --- verdicts and output --------------------------------------------------------------------


def window(samples: Sequence[Sample], start: float, end: float) -> list[Sample]:
    return [x for x in samples if start <= x.t < end]


def verdicts(s: Settings, soak: Soak) -> list[tuple[str, bool, str]]:
    out: list[tuple[str, bool, str]] = []
    if soak.samples:
        minute = min(60.0, s.duration_s / 4)
        first = window(soak.samples, s.warmup_s, s.warmup_s + minute) or soak.samples[:1]
        last = window(soak.samples, s.duration_s - minute, s.duration_s + 1) or soak.samples[-1:]
        rss0 = median(x.rss_kib for x in first) or 1
        rss1 = median(x.rss_kib for x in last) or 0
        growth = rss1 / rss0 - 1
        out.append(("RSS flat", abs(growth) <= FLAT_RSS,
                    f"{rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB ({growth:+.1%}; "
                    f"max {max(x.rss_kib for x in soak.samples) / 1024:.1f}; limit "
                    f"±{FLAT_RSS:.0%})"))
        fd0, fd1 = median(x.fds for x in first) or 0, median(x.fds for x in last) or 0
        # Open fds follow the connections in use: flat means no steady climb, within the
        # load's own connections (wrk's, the slow clients', the aborters').
        fd_slack = s.connections + s.slow_clients + 16
        out.append(("fds flat", fd1 - fd0 <= fd_slack,
                    f"{fd0:.0f} -> {fd1:.0f} (max {max(x.fds for x in soak.samples)}; "
                    f"slack {fd_slack})"))
        tasks = [x.tasks for x in soak.samples if x.tasks is not None]
        t0 = median(x.tasks for x in first if x.tasks is not None)
        t1 = median(x.tasks for x in last if x.tasks is not None)
        if tasks and t0 is not None and t1 is not None:
            out.append(("Tasks flat", t1 - t0 <= fd_slack,
                        f"{t0:.0f} -> {t1:.0f} (max {max(tasks)})"))
    deadline = TIMEOUT_MS + MAX_WAIT_MS + DEADLINE_SLACK_MS
    late = [r for r in soak.slow if r[1] > deadline or r[2] == 0]
    out.append(("slow model answered by its deadline", bool(soak.slow) and not late,
                f"{len(soak.slow) - len(late)}/{len(soak.slow)} within {deadline} ms "
                f"(max {max((r[1] for r in soak.slow), default=0):.0f} ms; statuses "
                f"{dict(Counter(r[2] for r in soak.slow))})"))
    seen = soak.replica_stats.get("maxRunning")
    out.append(("replica concurrency within its cap", seen is not None and seen <= CAP,
                f"max {seen} running at once on the slow replica, cap {CAP}"))
    return out


def chunk_table(soak: Soak) -> str:
    rows = []
    for c in soak.chunks:
        near = [x for x in soak.samples if x.t <= c.t]
        last = near[-1] if near else None
        rows.append([
            f"{c.t:.0f}", fmt_num(c.rps), f"{c.p50_ms:.2f}", f"{c.p99_ms:.2f}",
            " ".join(f"{k}:{v}" for k, v in sorted(c.statuses.items())),
            fmt_num(last.rss_kib / 1024, 1) if last else "-",
            str(last.fds) if last else "-",
            str(last.tasks) if last and last.tasks is not None else "-",
        ])
    return markdown_table(("t s", "req/s", "p50 ms", "p99 ms", "statuses", "RSS MiB", "fds",
                           "Tasks"), rows, ("r", "r", "r", "r", "l", "r", "r", "r"))


def plot(soak: Soak, s: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(11, 9))
    t = [x.t for x in soak.samples]
    axes[0].plot(t, [x.rss_kib / 1024 for x in soak.samples], color="tab:blue")
    axes[0].set_ylabel("router RSS MiB")
    axes[1].plot(t, [x.fds for x in soak.samples], color="tab:purple")
    axes[1].set_ylabel("open fds")
    axes[2].plot(t, [x.tasks if x.tasks is not None else float("nan") for x in soak.samples],
                 color="tab:orange")
    axes[2].set_ylabel("asyncio Tasks")
    axes[3].step([0.0] + [c.t for c in soak.chunks],
                 [c.p99_ms for c in soak.chunks[:1]] + [c.p99_ms for c in soak.chunks],
                 where="pre",
                 color="tab:red", label="fast: wrk p99 per chunk")
    slow_t = [r[0] for r in soak.slow]
    if slow_t:
        axes[3].plot(slow_t, [r[1] for r in soak.slow], ".", ms=1.5, color="tab:gray",
                     label="slow: each answer's time")
    axes[3].set_ylabel("ms")
    axes[3].set_yscale("log")
    axes[3].legend(loc="upper right", fontsize=8)
    axes[3].set_xlabel("seconds since the load started")
    axes[0].set_title(f"mlfe soak: {s.duration_s:.0f} s, {s.connections} connections + "
                      f"{s.slow_clients} slow clients + {s.abort_rate:g} aborts/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(s: Settings) -> tuple[Soak, dict[str, Any]]:
    wrk = find_wrk()
    with tempfile.TemporaryDirectory(prefix="mlfe-soak-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "soak.lua"
        with Processes(tmp) as procs:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFE_ADMIN_TOKEN": ADMIN_TOKEN}
            ports = {}
            for name, spec in (("fast", "latency=0,concurrency=64"),
                               ("slow", f"latency={s.slow_ms},concurrency=64")):
                ports[name] = free_port()
                child = procs.start(f"replica-{name}", [
                    sys.executable, "-m", "deploy.cli", "score-server", "--synthetic", spec,
                    "--host", "127.0.0.1", "--port", str(ports[name])], env=env)
                wait_until(answers_200(ports[name], "/"), f"the {name} replica", [child])
            port, admin_port = free_port(), free_port()
            cfg = mlfe_config(tmp, port, admin_port, ports["fast"], ports["slow"])
            (tmp / "mlfe.yaml").write_text(yaml.safe_dump(cfg))
            router = procs.start("mlfe-serve", [sys.executable, "-m", "deploy.cli", "serve",
                                                "--config", str(tmp / "mlfe.yaml")],
                                 env=env, stdout_path=tmp / "access.log")
            wait_until(answers_200(port, "/-/healthy"), "mlfe serve", [router])
            path = "/api/v1/service/fast/score"
            script.write_text(WRK_SCRIPT.format(path=path, key=KEY, big=MAX_BODY + 4096))
            log(f"soak: {s.duration_s:.0f} s at c={s.connections} + {s.slow_clients} slow "
                f"clients + {s.abort_rate:g} aborts/s")
            soak = asyncio.run(drive(s, wrk, script, port, admin_port, router, ports["slow"]))
            if not router.alive():
                raise BenchmarkError(f"mlfe serve died\n{router.describe()}")
    return soak, cfg


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak",
                                description="mlfe at full load for a long time: does it leak?")
    p.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    p.add_argument("--chunk", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--slow-clients", type=int, default=8)
    p.add_argument("--slow-ms", type=int, default=400, help="the slow model's time per call")
    p.add_argument("--abort-rate", type=float, default=20, help="client aborts per second")
    p.add_argument("--sample", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=30,
                   help="seconds left out of the RSS baseline (default 30)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="a few seconds: checks that it runs")
    a = p.parse_args(argv)
    if a.quick:
        return Settings(6, 2, 16, 4, a.slow_ms, 10, 0.25, 1, a.results_dir, True)
    if a.duration < 2 or a.chunk < 1 or a.connections < 1 or a.sample <= 0:
        p.error("--duration >= 2, --chunk >= 1, --connections >= 1, --sample > 0")
    return Settings(a.duration, a.chunk, a.connections, a.slow_clients, a.slow_ms,
                    a.abort_rate, a.sample, a.warmup, a.results_dir, False)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    interrupt_on_signals()
    started = dt.datetime.now(dt.UTC)
    build = mlfe_build()  # before the run: the build its processes load
    try:
        soak, cfg = run(s)
    except BenchmarkError as e:
        print(f"benchmarks.soak: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks.soak: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    machine = machine_info({"wrk": [find_wrk(), "-v"]})
    checks = verdicts(s, soak)
    statuses: Counter[str] = Counter()
    for c in soak.chunks:
        statuses.update(c.statuses)
    errors: Counter[str] = Counter()
    for c in soak.chunks:
        errors.update(c.socket_errors)
    slow_ms = [r[1] for r in soak.slow]
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    png = s.results_dir / f"soak-{stamp}.png"
    s.results_dir.mkdir(parents=True, exist_ok=True)
    plot(soak, s, png)
    dropped = soak.metrics.get('mlfe_access_log_lines_total{result="dropped"}', 0)
    print("\n".join([
        f"Machine: {machine['cpu_model']}, {machine['nproc']} cores, Python {machine['python']}"
        f"; mlfe build: {build}",
        f"Soak: {s.duration_s:.0f} s; fast: wrk c={s.connections} in {s.chunk_s} s chunks; "
        f"slow: {s.slow_clients} clients, model {s.slow_ms} ms vs scoring_timeout_ms "
        f"{TIMEOUT_MS}, cap {CAP}; aborts {s.abort_rate:g}/s",
        "",
        chunk_table(soak),
        "",
        f"fast answers by status: {dict(sorted(statuses.items()))}; wrk socket errors: "
        f"{dict(errors)}",
        f"slow answers: {dict(Counter(r[2] for r in soak.slow))}, time p50 "
        f"{fmt_num(percentile(slow_ms, 50), 0)} ms, p99 {fmt_num(percentile(slow_ms, 99), 0)}"
        f" ms, max {fmt_num(max(slow_ms, default=None), 0)} ms",
        f"client aborts: {dict(soak.aborts)}",
        f"slow replica saw: {soak.replica_stats}",
        f"access log lines dropped: {dropped:.0f}",
        "",
        "Verdicts" + (" (--quick: shown, not held against the run)" if s.quick else "") + ":",
        *(f"- {name}: {'met' if ok else 'NOT met'}: {detail}" for name, ok, detail in checks),
        "",
        f"Plot: {png.relative_to(REPO) if png.is_relative_to(REPO) else png}",
    ]), flush=True)
    write_json(s.results_dir / f"soak-{stamp}.json", {
        **run_record("soak", started, argv, s.to_json()),
        "machine": machine,
        "mlfe_build": build,
        "mlfe_config": {**cfg, "note": "ports and state_dir are chosen per run"},
        "chunks": [c.__dict__ for c in soak.chunks],
        "samples": [x.__dict__ for x in soak.samples],
        "slow": soak.slow,
        "aborts": dict(soak.aborts),
        "replica_stats": soak.replica_stats,
        "metrics": soak.metrics,
        "verdicts": [{"name": n, "met": ok, "detail": d} for n, ok, d in checks],
    })
    if not s.quick and not all(ok for _, ok, _ in checks):
        return 1
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    status = main()
    log(f"done in {time.monotonic() - t0:.0f} s")
    sys.exit(status)
