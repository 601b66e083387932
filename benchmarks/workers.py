"""Does the router's throughput rise with worker processes, and what does coordination cost?

    python -m benchmarks.workers [--rounds 3] [--duration 5] [--quick]

The same fast upstream as benchmarks.overhead (nginx `return 200 '{"result":[1]}'`, one worker:
the fastest possible replica, so the router is the bottleneck), and `mlfe serve` in front of it
in these configurations, each its own router:

- `1 worker`: `router.workers: 1`, no coordination (one process does everything);
- `1 worker + broker`: `router.workers: 1` with `router.coordination: {listen: A, broker: A}`
  on 127.0.0.1 TCP: a single instance that runs the slot broker and joins it, so its admission
  is coordinated like a pod's; the difference to `1 worker` is the broker's cost;
- `2 workers`: `router.workers: 2`: a supervisor (admin API, broker on a unix socket) and two
  worker processes sharing the scoring port with SO_REUSEPORT, always coordinated;
- `auto workers` (only if this machine has more than 2 cores): `router.workers: auto`.

Load: wrk, 2 threads, c=64 (`--concurrency`), POST /api/v1/service/bench/score with the 44-byte
JSON body and `Authorization: Bearer <key>`; configurations interleaved in each round (A B C A
B C ...), medians over rounds. CPU: utime + stime summed over the router's whole process tree
(supervisor + workers) from /proc before and after each run, per request. wrk itself runs on
the same cores (its CPU is reported too): on a 2-core machine, wrk, nginx and two router
workers compete for 2 cores, which bounds what a second worker can add.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
    CLK_TCK,
    REPO,
    RESULTS_DIR,
    BenchmarkError,
    Child,
    Processes,
    WrkResult,
    answers_200,
    cpu_seconds_alive,
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
    nginx_return_location,
    nginx_worker_pids,
    process_tree,
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
KEY = "mlfeBenchKey_0123456789abcdefghijklmnopqrst"
AUTH_HEADER = f"Authorization: Bearer {KEY}"
ANSWER = '{"result":[1]}'
THREADS = 2


@dataclass(frozen=True)
class Config:
    name: str
    workers: int | str
    broker: bool  # a single instance joining its own slot broker


@dataclass(frozen=True)
class Settings:
    rounds: int
    duration_s: int
    warmup_s: int
    concurrency: int
    configs: tuple[Config, ...]
    results_dir: Path
    quick: bool
    max_others_load: float = 0.25
    retries: int = 1
    quiet_wait_s: float = 10.0

    def to_json(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "duration_s": self.duration_s,
                "warmup_s": self.warmup_s, "concurrency": self.concurrency,
                "threads": THREADS, "configs": [c.__dict__ for c in self.configs],
                "quick": self.quick, "max_others_load": self.max_others_load,
                "retries": self.retries, "quiet_wait_s": self.quiet_wait_s}


CONFIGS = {
    "1": Config("1 worker", 1, False),
    "1+broker": Config("1 worker + broker", 1, True),
    "2": Config("2 workers", 2, False),
    "auto": Config("auto workers", "auto", False),
}


def configs_for_machine() -> tuple[Config, ...]:
    """1, 1+broker, 2, and auto if that is more than 2 here."""
    keys = ["1", "1+broker", "2"]
    if len(os.sched_getaffinity(0)) > 2:
        keys.append("auto")
    return tuple(CONFIGS[k] for k in keys)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mlfe_config(tmp: Path, c: Config, port: int, admin_port: int, upstream_port: int,
                broker_port: int) -> dict[str, Any]:
    router: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "state_dir": str(tmp / f"state-{c.name.replace(' ', '-').replace('+', 'b')}"),
        # The worker count stays as configured (no router self-scaling).
        "cluster_purpose": "DevTest",
        "workers": c.workers,
    }
    if c.broker:
        address = f"127.0.0.1:{broker_port}"
        router["coordination"] = {"listen": address, "broker": address}
    return {
        "router": router,
        "services": {
            SERVICE: {
                "upstreams": [f"127.0.0.1:{upstream_port}"],
                "primary_key": KEY,
                # Never limits at c=64 (even split between members): the point is the hop.
                "replica_max_concurrent_requests": 1024,
                "max_queue_length": 100_000,
            }
        },
    }


@dataclass
class Target:
    config: Config
    child: Child
    port: int

    def router_pids(self) -> list[int]:
        return process_tree(self.child.pid)


def start_router(procs: Processes, tmp: Path, c: Config, upstream_port: int,
                 upstream: Child) -> Target:
    port, admin_port = free_port(), free_port()
    cfg_path = tmp / f"mlfe-{len(procs.children)}.yaml"
    cfg_path.write_text(yaml.safe_dump(mlfe_config(tmp, c, port, admin_port, upstream_port,
                                                   free_port())))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = procs.start(f"mlfe-{c.name.replace(' ', '-').replace('+', 'b')}",
                        [sys.executable, "-m", "deploy.cli", "serve", "--config", str(cfg_path)],
                        env=env)
    body = lua_body()

    def answers() -> bool:
        reply = http_request(port, "POST", SCORE_PATH, body=body,
                             headers={"Content-Type": "application/json",
                                      "Authorization": f"Bearer {KEY}"})
        return reply is not None and reply.status == 200 and reply.body.strip() == ANSWER.encode()

    wait_until(answers_200(port, "/-/ready"), f"{c.name}: GET /-/ready", [child, upstream])
    # Coordinated routers start with no slots until the broker grants some: wait for a 200.
    wait_until(answers, f"{c.name}: POST {SCORE_PATH} answered 200", [child, upstream])
    expected = 1 + (0 if c.workers == 1 else (
        len(os.sched_getaffinity(0)) if c.workers == "auto" else int(c.workers)))
    wait_until(lambda: len(process_tree(child.pid)) >= expected,
               f"{c.name}: {expected} router processes", [child])
    if c.workers != 1:
        # Every worker must have its slots before we measure: requests over many connections
        # reach every worker (SO_REUSEPORT spreads connections).
        for _ in range(20):
            if not answers():
                raise BenchmarkError(f"{c.name}: a probe was not answered 200\n{child.describe()}")
    return Target(c, child, port)


@dataclass
class Run:
    config: str
    round: int
    result: WrkResult
    router_cpu_s: float
    supervisor_cpu_s: float  # the `mlfe serve` process alone (the only one with 1 worker)
    router_processes: int
    wrk_cpu_s: float
    upstream_cpu_s: float
    machine_busy_s: float
    others_cpu_s: float
    attempt: int = 0
    superseded: bool = False  # disturbed by others' load and measured again

    @property
    def others_load(self) -> float:
        d = self.result.duration_s
        return self.others_cpu_s / d if d else 0.0

    @property
    def cpu_us_per_req(self) -> float | None:
        return self.router_cpu_s * 1e6 / self.result.requests if self.result.requests else None

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "round": self.round, **self.result.to_json(),
                "router_cpu_s": self.router_cpu_s, "supervisor_cpu_s": self.supervisor_cpu_s,
                "router_processes": self.router_processes,
                "router_cpu_us_per_req": self.cpu_us_per_req, "wrk_cpu_s": self.wrk_cpu_s,
                "upstream_cpu_s": self.upstream_cpu_s, "machine_busy_s": self.machine_busy_s,
                "others_cpu_s": self.others_cpu_s, "others_load_cores": self.others_load,
                "attempt": self.attempt, "superseded": self.superseded}


def measure_quietly(wrk: str, t: Target, s: Settings, round_no: int,
                    upstream_pids: list[int]) -> list[Run]:
    """As benchmarks.overhead does on a shared machine: wait (a while) for others' load to
    drop, measure, and measure again if others used more than `max_others_load` meanwhile;
    the least disturbed attempt counts, the rest stay in the JSON marked superseded. A run
    with errors always counts."""
    attempts: list[Run] = []
    for attempt in range(s.retries + 1):
        if s.quiet_wait_s > 0:
            wait_for_quiet(s.max_others_load, s.quiet_wait_s)
        run = measure(wrk, t, s, round_no, upstream_pids)
        run.attempt = attempt
        attempts.append(run)
        again = (run.result.valid and run.others_load > s.max_others_load
                 and attempt < s.retries)
        r = run.result
        log(f"round {round_no}/{s.rounds} {t.config.name:<18} {fmt_num(r.rps):>8} req/s"
            f"  p50 {fmt_num(r.percentiles_ms.get('50'), 3)} ms  p99 "
            f"{fmt_num(r.percentiles_ms.get('99'), 3)} ms  router "
            f"{fmt_num(run.cpu_us_per_req, 1)} µs/req ({run.router_processes} procs)  others "
            f"{run.others_load:.0%} of a core"
            + ("" if r.valid else f"  INVALID: {r.error_summary()}")
            + ("  (disturbed: measuring again)" if again else ""))
        if not again:
            break
    counted = run if not run.result.valid else min(attempts, key=lambda a: a.others_load)
    for a in attempts:
        a.superseded = a is not counted
    return attempts


def measure(wrk: str, t: Target, s: Settings, round_no: int, upstream_pids: list[int]) -> Run:
    pids = t.router_pids()
    busy0, _ = machine_busy()
    wrk0 = reaped_children_cpu_s()
    cpu0 = cpu_seconds_alive(pids)
    sup0 = cpu_seconds_alive([t.child.pid])
    up0 = cpu_seconds_alive(upstream_pids)
    result, _ = run_wrk(wrk, f"http://127.0.0.1:{t.port}{SCORE_PATH}",
                        connections=s.concurrency, threads=THREADS, duration_s=s.duration_s,
                        headers=[AUTH_HEADER])
    cpu = cpu_seconds_alive(pids) - cpu0
    sup = cpu_seconds_alive([t.child.pid]) - sup0
    up = cpu_seconds_alive(upstream_pids) - up0
    wrk_cpu = reaped_children_cpu_s() - wrk0
    busy1, _ = machine_busy()
    busy = (busy1 - busy0) / CLK_TCK
    if sorted(t.router_pids()) != sorted(pids):
        raise BenchmarkError(f"{t.config.name}: router processes changed during the run "
                             f"({pids} -> {t.router_pids()})\n{t.child.describe()}")
    return Run(t.config.name, round_no, result, cpu, sup, len(pids), wrk_cpu, up, busy,
               max(busy - cpu - up - wrk_cpu, 0.0))


@dataclass
class Row:
    config: str
    processes: int
    runs: int
    invalid: list[str]
    rps: float | None
    rps_min: float | None
    rps_max: float | None
    p50_ms: float | None
    p99_ms: float | None
    cpu_us_per_req: float | None
    supervisor_us_per_req: float | None
    router_cores: float | None
    wrk_cores: float | None
    upstream_cores: float | None
    others_cores: float | None
    x_one: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarise(runs: Sequence[Run], s: Settings) -> list[Row]:
    rows = []
    for c in s.configs:
        mine = [r for r in runs if r.config == c.name and not r.superseded]
        ok = [r for r in mine if r.result.valid]
        dur = [r.result.duration_s for r in ok]
        rows.append(Row(
            config=c.name,
            processes=max((r.router_processes for r in mine), default=0),
            runs=len(mine),
            invalid=[f"round {r.round}: {r.result.error_summary()}" for r in mine
                     if not r.result.valid],
            rps=median(r.result.rps for r in ok),
            rps_min=min((r.result.rps for r in ok), default=None),
            rps_max=max((r.result.rps for r in ok), default=None),
            p50_ms=median(r.result.percentiles_ms["50"] for r in ok),
            p99_ms=median(r.result.percentiles_ms["99"] for r in ok),
            cpu_us_per_req=median(r.cpu_us_per_req for r in ok if r.cpu_us_per_req is not None),
            supervisor_us_per_req=median(r.supervisor_cpu_s * 1e6 / r.result.requests
                                         for r in ok if r.result.requests),
            router_cores=median(r.router_cpu_s / d for r, d in zip(ok, dur, strict=True)),
            wrk_cores=median(r.wrk_cpu_s / d for r, d in zip(ok, dur, strict=True)),
            upstream_cores=median(r.upstream_cpu_s / d for r, d in zip(ok, dur, strict=True)),
            others_cores=median(r.others_cpu_s / d for r, d in zip(ok, dur, strict=True)),
        ))
    one = next((r for r in rows if r.config == "1 worker"), None)
    for r in rows:
        if one is not None and one.rps and r.rps is not None:
            r.x_one = r.rps / one.rps
    return rows


HEADERS = ("config", "router processes", "req/s", "req/s min-max", "x 1 worker", "p50 ms",
           "p99 ms", "router CPU µs/req", "of which supervisor", "router cores", "wrk cores",
           "upstream cores", "others' cores", "errors")


def report(rows: Sequence[Row], s: Settings, machine: dict[str, Any]) -> str:
    cells = [
        [r.config, str(r.processes), fmt_num(r.rps) if r.rps is not None else "invalid",
         f"{fmt_num(r.rps_min)}-{fmt_num(r.rps_max)}", fmt_num(r.x_one, 2),
         fmt_num(r.p50_ms, 3), fmt_num(r.p99_ms, 3), fmt_num(r.cpu_us_per_req, 1),
         fmt_num(r.supervisor_us_per_req, 1) if r.processes > 1 else "-",
         fmt_num(r.router_cores, 2), fmt_num(r.wrk_cores, 2), fmt_num(r.upstream_cores, 2),
         fmt_num(r.others_cores, 2),
         "-" if not r.invalid else f"INVALID: {'; '.join(r.invalid)}"]
        for r in rows
    ]
    by = {r.config: r for r in rows}
    lines = [
        f"Machine: {machine['cpu_model']}, {machine['nproc']} cores, Python {machine['python']}, "
        f"{machine['tools'].get('nginx', 'nginx')}, {machine['tools'].get('wrk', 'wrk')}",
        f"Settings: {s.rounds} round(s) x {s.duration_s} s per run, configurations interleaved, "
        f"medians; wrk {THREADS} threads, c={s.concurrency}; POST {SCORE_PATH}, 44-byte JSON "
        f"body, key auth; upstream nginx `return 200` (1 worker)",
        "",
        markdown_table(HEADERS, cells, ["l", *["r"] * (len(HEADERS) - 2), "l"]),  # type: ignore[list-item]
        "",
        "router CPU: utime + stime of the router's process tree (supervisor + workers) per "
        "request (of which supervisor: the `mlfe serve` process alone); cores: CPU seconds "
        "per second of the run (wrk's from getrusage; others': the machine's busy time minus "
        "the router's, wrk's and the upstream's).",
    ]
    one, brk = by.get("1 worker"), by.get("1 worker + broker")
    if one and brk and one.cpu_us_per_req is not None and brk.cpu_us_per_req is not None:
        lines.append(
            f"Coordination cost (1 worker + broker vs 1 worker): "
            f"{brk.cpu_us_per_req - one.cpu_us_per_req:+.1f} µs CPU per request, throughput "
            f"x {fmt_num(brk.x_one, 2)}.")
    two = by.get("2 workers")
    if two and two.x_one is not None:
        lines.append(f"2 workers: x {two.x_one:.2f} the throughput of 1 worker "
                     f"(wrk used {fmt_num(two.wrk_cores, 2)} of the "
                     f"{machine['nproc']} cores meanwhile).")
    if machine["nproc"] <= 2 and not any(c.workers == "auto" for c in s.configs):
        lines.append(f"`workers: auto` = {machine['nproc']} here: the same as the "
                     f"{machine['nproc']}-worker row, not run separately.")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers",
                                description="Router throughput with 1 and 2 worker processes.")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up seconds per config (1)")
    p.add_argument("--concurrency", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated, in the order each round runs them, of "
                        f"{', '.join(CONFIGS)} (default: 1,1+broker,2 and auto if > 2 cores)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--max-others-load", type=float, default=0.25, metavar="CORES",
                   help="a run during which other processes used more CPU than this (in cores) "
                        "is measured again (default 0.25)")
    p.add_argument("--retries", type=int, default=1,
                   help="times a disturbed run is measured again (default 1)")
    p.add_argument("--quiet-wait", type=float, default=10, metavar="SECONDS",
                   help="before each run, wait up to this long for other load to drop under "
                        "--max-others-load (default 10; 0: do not wait)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 round of 1 s runs, no waiting for quiet, no retries")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.duration < 1 or a.concurrency < 1 or a.warmup < 0:
        p.error("--rounds, --duration and --concurrency must be at least 1")
    if min(a.retries, a.max_others_load, a.quiet_wait) < 0:
        p.error("--retries, --max-others-load and --quiet-wait must not be negative")
    configs = configs_for_machine()
    if a.configs:
        keys = [k.strip() for k in a.configs.split(",")]
        unknown = [k for k in keys if k not in CONFIGS]
        if unknown or len(set(keys)) != len(keys):
            p.error(f"--configs: expected distinct names of {', '.join(CONFIGS)}")
        configs = tuple(CONFIGS[k] for k in keys)
    if a.quick:
        return Settings(1, 1, 0, a.concurrency, configs, a.results_dir, True,
                        a.max_others_load, 0, 0.0)
    return Settings(a.rounds, a.duration, a.warmup, a.concurrency, configs, a.results_dir,
                    False, a.max_others_load, a.retries, a.quiet_wait)


def bench(s: Settings, nginx: str, wrk: str, tmp: Path) -> list[Run]:
    runs: list[Run] = []
    with Processes(tmp) as procs:
        up_port = free_port()
        conf = render_nginx_conf(tmp / "upstream-nginx", listen_port=up_port,
                                 location=nginx_return_location(ANSWER))
        upstream = start_nginx(procs, "upstream-nginx", nginx, tmp / "upstream-nginx", conf)
        wait_until(answers_200(up_port, "/"), "the upstream nginx to answer", [upstream])
        up_pids = nginx_worker_pids(upstream)
        targets = []
        for c in s.configs:
            log(f"starting mlfe serve: {c.name}")
            targets.append(start_router(procs, tmp, c, up_port, upstream))
        if s.warmup_s:
            for t in targets:
                run_wrk(wrk, f"http://127.0.0.1:{t.port}{SCORE_PATH}",
                        connections=s.concurrency, threads=THREADS, duration_s=s.warmup_s,
                        headers=[AUTH_HEADER], latency=False)
        for round_no in range(1, s.rounds + 1):
            for t in targets:
                runs += measure_quietly(wrk, t, s, round_no, up_pids)
        for child in list(procs.children):
            if not child.alive():
                raise BenchmarkError(f"{child.name} died during the runs\n{child.describe()}")
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    try:
        nginx, wrk = find_nginx(), find_wrk()
    except BenchmarkError as e:
        print(f"benchmarks.workers: {e}", file=sys.stderr)
        return 2
    interrupt_on_signals()
    started = dt.datetime.now(dt.UTC)
    machine = machine_info({"nginx": [nginx, "-v"], "wrk": [wrk, "-v"]})
    try:
        with tempfile.TemporaryDirectory(prefix="mlfe-bench-workers-") as tmp_name:
            runs = bench(s, nginx, wrk, Path(tmp_name))
    except BenchmarkError as e:
        print(f"benchmarks.workers: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks.workers: interrupted; every started process was stopped",
              file=sys.stderr)
        return 130
    rows = summarise(runs, s)
    print(report(rows, s, machine), flush=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = s.results_dir / f"workers-{stamp}.json"
    write_json(out, {
        **run_record("workers", started, argv, s.to_json()),
        "machine": machine,
        "mlfe_configs": {c.name: mlfe_config(Path("<tmp>"), c, 0, 0, 0, 0) for c in s.configs},
        "summary": [r.to_json() for r in rows],
        "runs": [r.to_json() for r in runs],
    })
    shown = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    print(f"\nRaw runs: {shown}")
    invalid = [r for r in runs if not r.result.valid and not r.superseded]
    if invalid:
        print(f"benchmarks.workers: {len(invalid)} run(s) had errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    t_start = time.monotonic()
    status = main()
    log(f"done in {time.monotonic() - t_start:.0f} s")
    sys.exit(status)
