"""What one proxy hop costs: wrk straight to a trivial replica, through nginx, and through mlfe.

    python -m benchmarks.overhead [--rounds 3] [--duration 5] [--quick]

Upstream kinds (the replica that answers `{"result":[1]}`):
- `nginx`:  nginx `return 200` — the fastest possible replica;
- `python`: `mlfe score-server --entry-script examples/echo/score.py` (aiohttp, no-op run()).

Paths to it, all on 127.0.0.1: `direct` (wrk → replica), `nginx` (`proxy_pass`, 1 worker,
upstream keep-alive 256, HTTP/1.1) and `mlfe` (`mlfe serve`, service `bench` with the replica as
its static upstream, key auth on). wrk POSTs a 44-byte JSON body (benchmarks/wrk/post.lua) to
`/api/v1/service/bench/score` with `Authorization: Bearer <key>` — the same request on every path;
the proxies send it to the replica's `/score`, and `direct` asks for `/score` itself.

Paths are interleaved (A B C A B C) at each concurrency in every round; the tables show medians.
Proxy CPU is utime + stime from /proc before and after each run: nginx's worker, mlfe's serve
process. Tables go to stdout, progress to stderr, every raw run to
benchmarks/results/overhead-<timestamp>.json. Exit status 1 if any run had errors (non-2xx
responses or socket errors): such a run is flagged and left out of the medians. On a shared
machine, a run that other processes disturbed is measured again (`--max-others-load`,
`--retries`, `--quiet-wait`); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import (
    CLK_TCK,
    REPO,
    RESULTS_DIR,
    BenchmarkError,
    Child,
    Processes,
    WrkResult,
    accepts_connections,
    answers_200,
    cpu_seconds_total,
    find_nginx,
    find_wrk,
    fmt_num,
    free_port,
    http_request,
    interrupt_on_signals,
    lua_body,
    machine_busy,
    machine_info,
    markdown_table,
    median,
    mlfe_build,
    nginx_proxy,
    nginx_return_location,
    nginx_worker_pids,
    reaped_children_cpu_s,
    render_nginx_conf,
    run_record,
    run_wrk,
    start_nginx,
    wait_for_quiet,
    wait_until,
    write_json,
)

SERVICE = "bench"
SCORE_PATH = f"/api/v1/service/{SERVICE}/score"
REPLICA_PATH = "/score"
# A fixed 43-character key (the length of azureml's keys: 32 random bytes, base64url).
KEY = "mlfeBenchKey_0123456789abcdefghijklmnopqrst"
AUTH_HEADER = f"Authorization: Bearer {KEY}"
ANSWER = '{"result":[1]}'
ECHO_SCRIPT = REPO / "examples" / "echo" / "score.py"

UPSTREAM_KINDS = {
    "nginx": "nginx `return 200` (the fastest possible replica)",
    "python": "mlfe score-server, examples/echo/score.py (aiohttp, no-op run())",
}
PATHS = ("direct", "nginx", "bare", "mlfe", "mlfe+log", "mlfe+log:py")
# mlfe+log:py: the same as mlfe+log from a copy of the sources without the compiled modules;
# run only when this checkout is compiled (make compile), to compare the two builds.
MLFE_PATHS = ("mlfe", "mlfe+log", "mlfe+log:py")
PURE_DIRS = ("router", "deploy", "autoscaler", "mlfe")
ISSUE_TARGET = 0.6  # one mlfe worker at c=32, x nginx's proxied req/s
FOUNDATION_TARGET = 0.5
TARGET_CONCURRENCY = 32
CPU_TARGET = 1.3  # mlfe+log's CPU per request over the bare proxy's
ADDED_P50_SLACK_MS = 0.03  # mlfe's added p50 at c=1 over the bare proxy's
P99_TARGET = 1.5  # mlfe+log's p99 at c=128 over nginx's


@dataclass(frozen=True)
class Settings:
    rounds: int
    duration_s: int
    warmup_s: int
    concurrencies: tuple[int, ...]
    upstreams: tuple[str, ...]
    results_dir: Path
    quick: bool
    max_others_load: float
    retries: int
    quiet_wait_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "concurrencies": list(self.concurrencies),
            "upstreams": list(self.upstreams),
            "quick": self.quick,
            "max_others_load": self.max_others_load,
            "retries": self.retries,
            "quiet_wait_s": self.quiet_wait_s,
            "threads": {str(c): threads_for(c) for c in self.concurrencies},
        }


@dataclass(frozen=True)
class Target:
    """One way to the replica: where wrk sends the request, and whose CPU is the proxy's."""

    path: str  # "direct", "nginx" or "mlfe"
    port: int
    url_path: str
    proxy_pids: Callable[[], list[int]] | None


@dataclass
class Run:
    upstream: str
    path: str
    concurrency: int
    threads: int
    round: int
    result: WrkResult
    proxy_cpu_s: float | None
    upstream_cpu_s: float
    wrk_cpu_s: float
    machine_busy_s: float  # all CPUs, everyone's processes
    machine_cpu_s: float  # all CPUs' time that passed (busy or not)
    others_cpu_s: float  # busy time not spent by wrk, the proxy or the replica
    attempt: int = 0
    superseded: bool = False  # disturbed by others' load and measured again

    @property
    def proxy_cpu_ms_per_1k(self) -> float | None:
        if self.proxy_cpu_s is None or self.result.requests == 0:
            return None
        return self.proxy_cpu_s * 1e3 / (self.result.requests / 1e3)

    def to_json(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream,
            "path": self.path,
            "concurrency": self.concurrency,
            "threads": self.threads,
            "round": self.round,
            **self.result.to_json(),
            "proxy_cpu_s": self.proxy_cpu_s,
            "proxy_cpu_ms_per_1k": self.proxy_cpu_ms_per_1k,
            "upstream_cpu_s": self.upstream_cpu_s,
            "wrk_cpu_s": self.wrk_cpu_s,
            "machine_busy_s": self.machine_busy_s,
            "machine_cpu_s": self.machine_cpu_s,
            "others_cpu_s": self.others_cpu_s,
            "others_load_cores": others_load(self),
            "attempt": self.attempt,
            "superseded": self.superseded,
        }


def threads_for(concurrency: int) -> int:
    return 1 if concurrency == 1 else 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- starting the pieces -----------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mlfe_argv(*args: str) -> list[str]:
    """`mlfe ...` with this interpreter (the venv's), independent of PATH."""
    return [sys.executable, "-m", "deploy.cli", *args]


def start_upstream(
    kind: str, procs: Processes, nginx: str, tmp: Path
) -> tuple[Child, int, Callable[[], list[int]]]:
    port = free_port()
    if kind == "nginx":
        conf = render_nginx_conf(
            tmp / "upstream-nginx", listen_port=port, location=nginx_return_location(ANSWER)
        )
        child = start_nginx(procs, "upstream-nginx", nginx, tmp / "upstream-nginx", conf)
        wait_until(answers_200(port, "/"), "the upstream nginx to answer", [child])
        workers = nginx_worker_pids(child)
        return child, port, lambda: workers
    if kind == "python":
        child = procs.start(
            "upstream-score-server",
            mlfe_argv(
                "score-server", "--entry-script", str(ECHO_SCRIPT),
                "--host", "127.0.0.1", "--port", str(port),
            ),
            env=child_env(),
        )
        wait_until(answers_200(port, "/"), "the score server to report healthy", [child])
        return child, port, lambda: [child.pid]
    raise ValueError(kind)


def mlfe_config(
    tmp: Path, listen_port: int, upstream_port: int, admin_port: int | None = None,
    access_log: bool = False, name: str = "mlfe",
) -> dict[str, Any]:
    return {
        "router": {
            "listen": f"127.0.0.1:{listen_port}",
            "admin_listen": f"127.0.0.1:{free_port() if admin_port is None else admin_port}",
            "state_dir": str(tmp / f"{name}-state"),
            # One router worker: no router self-scaling (what the target is stated for).
            "cluster_purpose": "DevTest",
            # `mlfe` runs like nginx (`access_log off`); `mlfe+log` with the log on, as
            # mlfe runs by default, its stdout to a file.
            "access_log": access_log,
        },
        "services": {
            SERVICE: {
                "upstreams": [f"127.0.0.1:{upstream_port}"],
                "auth_enabled": True,
                "primary_key": KEY,
                # High enough never to queue: the point is the hop's overhead, not admission.
                "replica_max_concurrent_requests": 1024,
                "max_queue_length": 100_000,
            }
        },
    }


def pure_copy(dest: Path) -> Path:
    """The Python sources (no compiled modules) copied to `dest`: `python -m deploy.cli` run
    there imports them, not the checkout's .so files."""
    if not dest.exists():
        for d in PURE_DIRS:
            shutil.copytree(REPO / d, dest / d,
                            ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return dest


def _pids(pid: int) -> Callable[[], list[int]]:
    return lambda: [pid]


def start_targets(
    kind: str, procs: Processes, nginx: str, tmp: Path, upstream_port: int
) -> list[Target]:
    direct = Target("direct", upstream_port, REPLICA_PATH, None)

    proxy_port = free_port()
    http_extra, location = nginx_proxy(f"127.0.0.1:{upstream_port}", rewrite_to=REPLICA_PATH)
    conf = render_nginx_conf(
        tmp / "proxy-nginx", listen_port=proxy_port, location=location, http_extra=http_extra
    )
    proxy = start_nginx(procs, "proxy-nginx", nginx, tmp / "proxy-nginx", conf)
    # Connections only: check_answer then checks what it answers.
    wait_until(accepts_connections(proxy_port), "the proxy nginx to accept connections", [proxy])
    nginx_workers = nginx_worker_pids(proxy)

    bare_port = free_port()
    bare = procs.start(
        "bare-proxy",
        [sys.executable, "-m", "benchmarks.bareproxy", "--port", str(bare_port),
         "--upstream", f"127.0.0.1:{upstream_port}", "--path", REPLICA_PATH],
        env=child_env(),
    )
    wait_until(accepts_connections(bare_port), "the bare proxy to accept connections", [bare])

    targets = [
        direct,
        Target("nginx", proxy_port, SCORE_PATH, lambda: nginx_workers),
        Target("bare", bare_port, SCORE_PATH, lambda: [bare.pid]),
    ]
    for path in MLFE_PATHS:
        cwd = REPO
        if path.endswith(":py"):
            if mlfe_build() == "pure Python":
                continue
            cwd = pure_copy(tmp / "pure-src")
        name = path.replace("+", "-").replace(":", "-")
        port = free_port()
        cfg_path = tmp / f"{name}-{kind}.yaml"
        cfg_path.write_text(yaml.safe_dump(
            mlfe_config(tmp, port, upstream_port, access_log="+log" in path, name=name)))
        router = procs.start(name, mlfe_argv("serve", "--config", str(cfg_path)),
                             env=child_env(), stdout_path=tmp / f"{name}.access.log", cwd=cwd)
        wait_until(answers_200(port, "/-/healthy"), f"{path} serve: GET /-/healthy", [router])
        targets.append(Target(path, port, SCORE_PATH, _pids(router.pid)))
    return targets


def check_answer(target: Target, body: bytes, children: Sequence[Child]) -> None:
    """The request wrk will send must be answered 200 with the replica's answer."""
    reply = http_request(
        target.port,
        "POST",
        target.url_path,
        body=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    if reply is None or reply.status != 200 or reply.body.strip() != ANSWER.encode():
        got = "no answer" if reply is None else f"{reply.status} {reply.body[:300]!r}"
        logs = "\n".join(c.describe() for c in children)
        raise BenchmarkError(
            f"{target.path}: POST {target.url_path} should answer 200 {ANSWER}, got {got}\n{logs}"
        )


# --- measuring ---------------------------------------------------------------------------------


def measure(
    wrk: str,
    target: Target,
    *,
    kind: str,
    concurrency: int,
    duration_s: int,
    round_no: int,
    upstream_pids: Callable[[], list[int]],
) -> Run:
    proxy_pids = target.proxy_pids() if target.proxy_pids else []
    up_pids = upstream_pids()
    busy_before, total_before = machine_busy()
    wrk_before = reaped_children_cpu_s()
    proxy_before = cpu_seconds_total(proxy_pids)
    up_before = cpu_seconds_total(up_pids)
    result, _ = run_wrk(
        wrk,
        f"http://127.0.0.1:{target.port}{target.url_path}",
        connections=concurrency,
        threads=threads_for(concurrency),
        duration_s=duration_s,
        headers=[AUTH_HEADER],
    )
    proxy_cpu = cpu_seconds_total(proxy_pids) - proxy_before
    up_cpu = cpu_seconds_total(up_pids) - up_before
    wrk_cpu = reaped_children_cpu_s() - wrk_before
    busy_after, total_after = machine_busy()
    # What the rest of the machine used meanwhile (other users' load is noise in the numbers).
    others = (busy_after - busy_before) / CLK_TCK - wrk_cpu - proxy_cpu - up_cpu
    return Run(
        kind, target.path, concurrency, threads_for(concurrency), round_no, result,
        proxy_cpu if target.proxy_pids else None, up_cpu, wrk_cpu,
        machine_busy_s=(busy_after - busy_before) / CLK_TCK,
        machine_cpu_s=(total_after - total_before) / CLK_TCK,
        others_cpu_s=max(others, 0.0),
    )


def measure_quietly(
    wrk: str,
    target: Target,
    settings: Settings,
    *,
    kind: str,
    concurrency: int,
    round_no: int,
    upstream_pids: Callable[[], list[int]],
) -> list[Run]:
    """One measurement on a shared machine: wait (a while) for others' load to drop, measure,
    and measure again if others used more than `max_others_load` meanwhile. Others' load is
    noise, not the proxy's doing: the least disturbed attempt counts; the rest stay in the JSON
    marked superseded. A run with errors always counts: errors are never retried away."""
    attempts: list[Run] = []
    for attempt in range(settings.retries + 1):
        if settings.quiet_wait_s > 0:
            wait_for_quiet(settings.max_others_load, settings.quiet_wait_s)
        run = measure(
            wrk, target, kind=kind, concurrency=concurrency, duration_s=settings.duration_s,
            round_no=round_no, upstream_pids=upstream_pids,
        )
        run.attempt = attempt
        attempts.append(run)
        disturbed = others_load(run) > settings.max_others_load
        again = run.result.valid and disturbed and attempt < settings.retries
        log(progress(run, settings) + ("  (disturbed: measuring again)" if again else ""))
        if not again:
            break
    counted = run if not run.result.valid else min(attempts, key=others_load)
    for r in attempts:
        r.superseded = r is not counted
    return attempts


def progress(run: Run, settings: Settings) -> str:
    r = run.result
    line = (
        f"[{run.upstream}] round {run.round}/{settings.rounds} c={run.concurrency:<3} "
        f"{run.path:<6} {fmt_num(r.rps):>9} req/s  p50 {fmt_num(r.percentiles_ms.get('50'), 3)}"
        f" ms  p99 {fmt_num(r.percentiles_ms.get('99'), 3)} ms"
    )
    if run.proxy_cpu_ms_per_1k is not None:
        line += f"  cpu {fmt_num(run.proxy_cpu_ms_per_1k, 1)} µs/req"
    line += f"  others {others_load(run):.0%} of a core"
    if not r.valid:
        line += f"  INVALID: {r.error_summary()}"
    return line


def others_load(run: Run) -> float:
    """Cores' worth of CPU that processes not in the measurement used during the run."""
    return run.others_cpu_s / run.result.duration_s if run.result.duration_s else 0.0


def bench_upstream(
    kind: str, settings: Settings, nginx: str, wrk: str, tmp: Path, body: bytes
) -> list[Run]:
    runs: list[Run] = []
    tmp = tmp / kind  # each upstream kind: its own configs, logs and nginx prefixes
    tmp.mkdir()
    with Processes(tmp) as procs:
        log(f"[{kind}] starting {UPSTREAM_KINDS[kind]}, nginx proxy and mlfe serve")
        _, upstream_port, upstream_pids = start_upstream(kind, procs, nginx, tmp)
        targets = start_targets(kind, procs, nginx, tmp, upstream_port)
        for target in targets:
            check_answer(target, body, procs.children)
        if settings.warmup_s > 0:
            for target in targets:
                run_wrk(
                    wrk,
                    f"http://127.0.0.1:{target.port}{target.url_path}",
                    connections=max(settings.concurrencies),
                    threads=threads_for(max(settings.concurrencies)),
                    duration_s=settings.warmup_s,
                    headers=[AUTH_HEADER],
                    latency=False,
                )
        for round_no in range(1, settings.rounds + 1):
            for concurrency in settings.concurrencies:
                for target in targets:
                    runs += measure_quietly(
                        wrk, target, settings, kind=kind, concurrency=concurrency,
                        round_no=round_no, upstream_pids=upstream_pids,
                    )
        for child in list(procs.children):
            if not child.alive():
                raise BenchmarkError(f"{child.name} died during the runs\n{child.describe()}")
    return runs


# --- summarising -------------------------------------------------------------------------------


@dataclass
class Row:
    upstream: str
    path: str
    concurrency: int
    runs: int
    invalid: list[str]
    rps: float | None
    p50_ms: float | None
    p99_ms: float | None
    cpu_ms_per_1k: float | None
    others_max: float  # cores' worth of CPU others used during the row's noisiest run
    x_nginx: float | None = None
    x_bare_cpu: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarise(runs: Sequence[Run], settings: Settings) -> list[Row]:
    rows: list[Row] = []
    for kind in settings.upstreams:
        for c in settings.concurrencies:
            group: dict[str, Row] = {}
            for path in PATHS:
                mine = [
                    r for r in runs
                    if (r.upstream, r.path, r.concurrency) == (kind, path, c) and not r.superseded
                ]
                if not mine:
                    continue
                ok = [r for r in mine if r.result.valid]
                cpu = [r.proxy_cpu_ms_per_1k for r in ok if r.proxy_cpu_ms_per_1k is not None]
                group[path] = Row(
                    upstream=kind,
                    path=path,
                    concurrency=c,
                    runs=len(mine),
                    invalid=[f"round {r.round}: {r.result.error_summary()}"
                             for r in mine if not r.result.valid],
                    rps=median(r.result.rps for r in ok),
                    p50_ms=median(r.result.percentiles_ms["50"] for r in ok),
                    p99_ms=median(r.result.percentiles_ms["99"] for r in ok),
                    cpu_ms_per_1k=median(cpu),
                    others_max=max(others_load(r) for r in mine),
                )
            nginx_row, direct, bare = group.get("nginx"), group.get("direct"), group.get("bare")
            for row in group.values():
                if bare and bare.cpu_ms_per_1k and row.cpu_ms_per_1k is not None:
                    row.x_bare_cpu = row.cpu_ms_per_1k / bare.cpu_ms_per_1k
                if nginx_row and nginx_row.rps and row.rps is not None:
                    row.x_nginx = row.rps / nginx_row.rps
                if row.path != "direct" and direct:
                    if row.p50_ms is not None and direct.p50_ms is not None:
                        row.added_p50_ms = row.p50_ms - direct.p50_ms
                    if row.p99_ms is not None and direct.p99_ms is not None:
                        row.added_p99_ms = row.p99_ms - direct.p99_ms
                rows.append(row)
    return rows


TABLE_HEADERS = ("path", "c", "req/s", "p50 ms", "p99 ms", "x nginx", "+p50 ms", "+p99 ms",
                 "proxy CPU µs/req", "x bare CPU", "others' CPU", "errors")
TABLE_ALIGN = ("l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "l")


def table(rows: Sequence[Row]) -> str:
    cells = []
    for r in rows:
        if r.invalid:
            errors = f"INVALID: {len(r.invalid)}/{r.runs} runs invalid ({'; '.join(r.invalid)})"
        else:
            errors = "-"
        cells.append([
            r.path,
            str(r.concurrency),
            fmt_num(r.rps) if r.rps is not None else "invalid",
            fmt_num(r.p50_ms, 3),
            fmt_num(r.p99_ms, 3),
            fmt_num(r.x_nginx, 2),
            fmt_num(r.added_p50_ms, 3, signed=True),
            fmt_num(r.added_p99_ms, 3, signed=True),
            fmt_num(r.cpu_ms_per_1k, 1),
            fmt_num(r.x_bare_cpu, 2),
            f"{r.others_max:.0%}",
            errors,
        ])
    return markdown_table(TABLE_HEADERS, cells, TABLE_ALIGN)  # type: ignore[arg-type]


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def verdicts(rows: Sequence[Row]) -> list[str]:
    """The issue's goals, per upstream, for each mlfe path (log off and on)."""
    lines = []
    by = {(r.upstream, r.path, r.concurrency): r for r in rows}
    for upstream in dict.fromkeys(r.upstream for r in rows):
        for path in MLFE_PATHS:
            checks: list[str] = []
            r = by.get((upstream, path, TARGET_CONCURRENCY))
            if r is not None and r.x_nginx is not None:
                checks.append(f"c={TARGET_CONCURRENCY} req/s {r.x_nginx:.2f}x nginx (>= "
                              f"{ISSUE_TARGET}: {_met(r.x_nginx >= ISSUE_TARGET)})")
            if r is not None and r.x_bare_cpu is not None:
                checks.append(f"c={TARGET_CONCURRENCY} CPU/req {r.x_bare_cpu:.2f}x bare (<= "
                              f"{CPU_TARGET}: {_met(r.x_bare_cpu <= CPU_TARGET)})")
            r1, b1 = by.get((upstream, path, 1)), by.get((upstream, "bare", 1))
            if (r1 is not None and b1 is not None and r1.added_p50_ms is not None
                    and b1.added_p50_ms is not None):
                over = r1.added_p50_ms - b1.added_p50_ms
                checks.append(f"c=1 added p50 {r1.added_p50_ms:+.3f} ms, {over:+.3f} ms over "
                              f"bare's (<= +{ADDED_P50_SLACK_MS}: "
                              f"{_met(over <= ADDED_P50_SLACK_MS + 1e-9)})")
            r128, n128 = by.get((upstream, path, 128)), by.get((upstream, "nginx", 128))
            if (r128 is not None and n128 is not None and r128.p99_ms is not None
                    and n128.p99_ms):
                x = r128.p99_ms / n128.p99_ms
                checks.append(f"c=128 p99 {x:.2f}x nginx (<= {P99_TARGET}: "
                              f"{_met(x <= P99_TARGET)})")
            if checks:
                lines.append(f"- upstream {upstream}, {path}: " + "; ".join(checks))
    return lines


def report(
    rows: Sequence[Row], runs: Sequence[Run], settings: Settings, machine: dict[str, Any]
) -> str:
    out = [
        f"Machine: {machine['cpu_model']}, {machine['nproc']} cores, Python {machine['python']}, "
        f"{machine['tools'].get('nginx', 'nginx')}, {machine['tools'].get('wrk', 'wrk')}",
        f"mlfe build: {machine['mlfe_build']}",
        f"Settings: {settings.rounds} round(s) x {settings.duration_s} s per run, "
        f"medians; wrk threads 1 at c=1, 2 otherwise; POST {SCORE_PATH}, 44-byte JSON body; "
        f"runs wait up to {settings.quiet_wait_s:g} s for other load <= "
        f"{settings.max_others_load:.0%} of a core, and a run disturbed by more is measured "
        f"again (up to {settings.retries} times; the least disturbed counts)",
        "",
    ]
    for kind in settings.upstreams:
        mine = [r for r in rows if r.upstream == kind]
        out += [f"### Upstream: {UPSTREAM_KINDS[kind]}", "", table(mine), ""]
    out += [
        "x nginx: req/s over nginx's at the same c. +p50/+p99: over direct. Proxy CPU: utime +",
        "stime of nginx's worker, the bare proxy's or mlfe's serve process per request; x bare",
        "CPU: that over the bare proxy's in the same rounds. Others' CPU: what",
        "processes outside the measurement used during the row's noisiest counted run (% of one",
        "core; high values mean the row is disturbed by other load on the machine).",
        "",
    ]
    out += ["Goals (one mlfe worker; a bare Protocol + httptools proxy is the reference):",
            *verdicts(rows)]
    return "\n".join(out)


def sources_digest() -> str:
    """A digest of the router's and deploy's sources: which code these numbers belong to."""
    h = hashlib.sha256()
    for path in sorted([*REPO.glob("router/*.py"), *REPO.glob("deploy/*.py")]):
        h.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead",
        description="Measure what one proxy hop costs: direct vs nginx vs mlfe.",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--warmup", type=int, default=1,
                   help="seconds of warm-up per path before measuring (default 1; 0: none)")
    p.add_argument("--concurrency", default="1,32,128",
                   help="comma-separated wrk connection counts (default 1,32,128)")
    p.add_argument("--upstreams", default=",".join(UPSTREAM_KINDS),
                   help=f"comma-separated upstream kinds of {', '.join(UPSTREAM_KINDS)}")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                   help="where the JSON goes (default benchmarks/results)")
    p.add_argument("--max-others-load", type=float, default=0.25, metavar="CORES",
                   help="a run during which other processes used more CPU than this (in cores) "
                        "is measured again (default 0.25)")
    p.add_argument("--retries", type=int, default=1,
                   help="times a disturbed run is measured again (default 1; the least "
                        "disturbed attempt counts)")
    p.add_argument("--quiet-wait", type=float, default=10, metavar="SECONDS",
                   help="before each run, wait up to this long for other load to drop under "
                        "--max-others-load (default 10; 0: do not wait)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round of 1 s runs, c=1 and 32, nginx upstream, no warm-up")
    a = p.parse_args(argv)
    try:
        concurrencies = tuple(int(c) for c in a.concurrency.split(","))
    except ValueError:
        p.error(f"--concurrency: expected numbers separated by commas, got {a.concurrency!r}")
    upstreams = tuple(u.strip() for u in a.upstreams.split(","))
    unknown = [u for u in upstreams if u not in UPSTREAM_KINDS]
    if unknown:
        p.error(f"--upstreams: unknown kind(s) {', '.join(unknown)}")
    if a.rounds < 1 or a.duration < 1 or min(concurrencies) < 1:
        p.error("--rounds, --duration and --concurrency must be at least 1")
    if min(a.warmup, a.retries, a.max_others_load, a.quiet_wait) < 0:
        p.error("--warmup, --retries, --max-others-load and --quiet-wait must not be negative")
    if a.quick:
        return Settings(1, 1, 0, (1, 32), ("nginx",), a.results_dir, True, a.max_others_load,
                        0, 0.0)
    return Settings(a.rounds, a.duration, a.warmup, concurrencies, upstreams, a.results_dir,
                    False, a.max_others_load, a.retries, a.quiet_wait)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    try:
        nginx, wrk = find_nginx(), find_wrk()
    except BenchmarkError as e:
        print(f"benchmarks.overhead: {e}", file=sys.stderr)
        return 2
    interrupt_on_signals()
    started = dt.datetime.now(dt.UTC)
    machine = machine_info({"nginx": [nginx, "-v"], "wrk": [wrk, "-v"]})
    machine["mlfe_build"] = mlfe_build()  # before the runs: the build mlfe serve loads
    digest = sources_digest()  # before the runs: the code that was started
    body = lua_body()
    runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory(prefix="mlfe-bench-") as tmp_name:
            tmp = Path(tmp_name)
            for kind in settings.upstreams:
                runs += bench_upstream(kind, settings, nginx, wrk, tmp, body)
    except BenchmarkError as e:
        print(f"benchmarks.overhead: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks.overhead: interrupted; every started process was stopped",
              file=sys.stderr)
        return 130

    rows = summarise(runs, settings)
    print(report(rows, runs, settings, machine), flush=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = settings.results_dir / f"overhead-{stamp}.json"
    write_json(out, {
        **run_record("overhead", started, argv, settings.to_json()),
        "machine": machine,
        "request": {"method": "POST", "path": SCORE_PATH, "body_bytes": len(body),
                    "content_type": "application/json", "auth": "Bearer <43-char key>"},
        "upstreams": UPSTREAM_KINDS,
        "mlfe_config": {**mlfe_config(Path("<tmp>"), 0, 0, 0),
                        "note": "ports are chosen per run; primary_key is the fixed KEY"},
        "mlfe_sources_sha256": digest,
        "mlfe_build": machine["mlfe_build"],
        "summary": [r.to_json() for r in rows],
        "runs": [r.to_json() for r in runs],
    })
    print(f"\nRaw runs: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    invalid = [r for r in runs if not r.result.valid and not r.superseded]
    if invalid:
        print(f"benchmarks.overhead: {len(invalid)} run(s) had errors and are not valid numbers "
              "(see the errors column)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    status = main()
    log(f"done in {time.monotonic() - t0:.0f} s")
    sys.exit(status)
