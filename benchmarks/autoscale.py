"""How mlfe's co-located autoscaler follows load: a step, a drop, and a square wave, under each
replica policy; then scale to zero and back.

    python -m benchmarks.autoscale [--quick] [--replicas-needed 5] [--hold 30] ...

`mlfe up --config <generated>` runs the slow example (examples/slow/score.py: run() sleeps
`--run-ms`, 50 ms) as a local service whose replicas run one request at a time
(`replica_max_concurrent_requests: 1`, so WORKER_COUNT=1), autoscaled by each policy in turn
(`autoscale_policy`: `demand`, the default, then `azureml`; README, Scaling), each run in a
fresh `mlfe up` with the same schedule. An open-loop load generator on asyncio sockets
(benchmarks.common.open_loop_load: requests start on a schedule, whether or not earlier ones
were answered) offers:

    idle (0 req/s) -> step to R, held -> drop to 0 (long enough for the scale-down window)
    -> square wave between R and R/5

where R = replicas-needed x target utilization / run time (5 x 0.7 / 0.05 s = 70 req/s): the
rate whose mean demand (busy + queued) the rule answers with `--replicas-needed` replicas.

Every 100 ms the admin API's `GET /v1/stats` is sampled (replicas ready, desired, current, busy,
queued) alongside the generator's own offered and served rates, 503s and the p99 latency of
the trailing second. Reported: time from the step to the scale decision (desired rises) and to
replicas serving (ready rises; the needed count ready), the 503 share, the time to scale down
after the drop, and direction changes of the desired count under the square wave. A PNG plot of
every series goes to benchmarks/results/autoscale-<timestamp>.png (one column per policy), the
raw data to the JSON.

Scale to zero: a service with `autoscale_min_replicas: 0` is left idle until it has no replica
(one scale-down window after its last request), then one request is sent: its status, its
latency and the time it waited in the router's queue (the access log's `queueMs`) are reported.

Goals: the issue's "Done when" items are printed as verdicts for the demand policy (peak desired
at most one over the replicas needed, the decision within 1 s, the needed replicas serving
within 2 s, no 503 once the first decision's replicas all serve, the minimum one window after
the step's last arrival, no reversal of desired under the square wave; scale to zero after the
window, the request after idle served 200 after one cold start with its queueMs logged). A full
run exits 1 when one is not met; `--quick` (a 3-replica step on a loaded test box) shows them
without holding them against the run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from benchmarks.common import (
    REPO,
    RESULTS_DIR,
    BenchmarkError,
    Child,
    LoadRecord,
    Processes,
    answers_200,
    fmt_num,
    free_port,
    http_get_json_async,
    http_request,
    interrupt_on_signals,
    machine_info,
    markdown_table,
    open_loop_load,
    percentile,
    run_record,
    wait_until,
    write_json,
)

SERVICE = "slow"
SCORE_PATH = f"/api/v1/service/{SERVICE}/score"
KEY = "mlfeBenchKey_0123456789abcdefghijklmnopqrst"
ADMIN_TOKEN = "mlfe-bench-admin-token-0123456789"
SLOW_SCRIPT = REPO / "examples" / "slow" / "score.py"
POLICIES = ("demand", "azureml")
SAMPLE_S = 0.1
P99_WINDOW_S = 1.0
TARGET_UTILIZATION = 70  # azureml's default, percent
REFRESH_S = 1.0  # autoscale_refresh_seconds


@dataclass(frozen=True)
class Settings:
    replicas_needed: int
    run_ms: float
    max_replicas: int
    max_wait_ms: int
    idle_s: float
    hold_s: float
    scale_down_window_s: float
    drop_s: float
    square_period_s: float
    square_cycles: int
    square_low_fraction: float
    results_dir: Path
    quick: bool
    policies: tuple[str, ...] = POLICIES
    zero_window_s: float = 60.0

    @property
    def rate(self) -> float:
        """The offered rate whose mean demand asks for `replicas_needed` replicas."""
        return self.replicas_needed * (TARGET_UTILIZATION / 100) / (self.run_ms / 1000)

    def to_json(self) -> dict[str, Any]:
        return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()},
                "rate": self.rate, "target_utilization": TARGET_UTILIZATION}


@dataclass(frozen=True)
class Phase:
    name: str
    start: float
    end: float
    rate_at: Callable[[float], float]  # absolute t (s since the load's start) -> req/s


def build_phases(s: Settings) -> list[Phase]:
    high, low = s.rate, s.rate * s.square_low_fraction
    t = 0.0
    phases = []

    def add(name: str, length: float, rate_at: Callable[[float], float]) -> None:
        nonlocal t
        phases.append(Phase(name, t, t + length, rate_at))
        t += length

    add("idle", s.idle_s, lambda _t: 0.0)
    add("step", s.hold_s, lambda _t: high)
    add("drop", s.drop_s, lambda _t: 0.0)
    square_start = t
    period = s.square_period_s

    def square(at: float) -> float:
        return high if (at - square_start) % period < period / 2 else low

    add("square", period * s.square_cycles, square)
    return phases


def rate_schedule(phases: Sequence[Phase]) -> Callable[[float], float]:
    def rate_at(t: float) -> float:
        for p in phases:
            if p.start <= t < p.end:
                return p.rate_at(t)
        return 0.0

    return rate_at


def shown_path(p: Path) -> Path:
    return p.relative_to(REPO) if p.is_relative_to(REPO) else p


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- running -------------------------------------------------------------------------------------


def mlfe_config(tmp: Path, s: Settings, port: int, admin_port: int, policy: str = "demand",
                min_replicas: int = 1) -> dict[str, Any]:
    window = s.scale_down_window_s if min_replicas else s.zero_window_s
    return {
        "router": {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
            "state_dir": str(tmp / "mlfe-state"),
        },
        "services": {
            SERVICE: {
                "entry_script": str(SLOW_SCRIPT),
                "environment_variables": {"SLOW_RUN_MS": f"{s.run_ms:g}"},
                "primary_key": KEY,
                "replica_max_concurrent_requests": 1,
                "max_request_wait_time": s.max_wait_ms,
                "autoscale_policy": policy,
                "autoscale_min_replicas": min_replicas,
                "autoscale_max_replicas": s.max_replicas,
                "autoscale_refresh_seconds": REFRESH_S,
                "autoscale_target_utilization": TARGET_UTILIZATION,
                "autoscale_scale_down_window_seconds": window,
            }
        },
    }


Sample = tuple[float, dict[str, Any]]  # (t since the load's start, /v1/stats of the service)


async def drive(
    s: Settings, port: int, admin_port: int, router: Child
) -> tuple[list[LoadRecord], list[Sample], int, int]:
    """Run the load and the sampler together; (records, samples, scheduled, sampler misses)."""
    phases = build_phases(s)
    duration = phases[-1].end
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    records: list[LoadRecord] = []
    samples: list[Sample] = []
    missed = 0
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def sampler() -> None:
        nonlocal missed
        n = 0
        while True:
            at = n * SAMPLE_S
            if at > duration + 0.5:
                return
            delay = t0 + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            data = await http_get_json_async(admin_port, "/v1/stats", headers=headers,
                                             timeout_s=SAMPLE_S * 5)
            svc = (data or {}).get("services", {}).get(SERVICE)
            if svc is None:
                missed += 1
            else:
                samples.append((loop.time() - t0, svc))
            n = max(n + 1, math.ceil((loop.time() - t0) / SAMPLE_S))  # skip, never burst

    async def progress() -> None:
        for p in phases:
            delay = t0 + p.start - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            last = samples[-1][1] if samples else {}
            log(f"  t={p.start:6.1f} s  phase {p.name:<6} ({p.end - p.start:g} s)  replicas "
                f"{last.get('replicas', '?')}/{last.get('desired', '?')}  "
                f"answered so far {len(records)}")
            if not router.alive():
                return

    sampling = loop.create_task(sampler())
    talking = loop.create_task(progress())
    scheduled = await open_loop_load(
        port, SCORE_PATH, rate_at=rate_schedule(phases), duration_s=duration, records=records,
        headers={"Authorization": f"Bearer {KEY}"}, body=b'{"data": [1]}', timeout_s=10.0,
        t0=t0,
    )
    await sampling
    talking.cancel()
    return records, samples, scheduled, missed


def run_benchmark(s: Settings, tmp: Path, policy: str
                  ) -> tuple[list[LoadRecord], list[Sample], int, int]:
    tmp = tmp / policy
    tmp.mkdir()
    with Processes(tmp) as procs:
        port, admin_port = free_port(), free_port()
        cfg_path = tmp / "autoscale.yaml"
        cfg_path.write_text(yaml.safe_dump(mlfe_config(tmp, s, port, admin_port, policy)))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFE_ADMIN_TOKEN": ADMIN_TOKEN}
        router = procs.start("mlfe-up", [sys.executable, "-m", "deploy.cli", "up", "--config",
                                         str(cfg_path)], env=env)
        wait_until(answers_200(port, "/-/ready"), "mlfe up: GET /-/ready", [router])

        wait_until(lambda: _stats(admin_port).get("replicas", 0) >= 1,
                   "the first replica of the slow service", [router], 60)
        reply = http_request(port, "POST", SCORE_PATH, body=b'{"data": [1]}', timeout_s=5,
                             headers={"Content-Type": "application/json",
                                      "Authorization": f"Bearer {KEY}"})
        if reply is None or reply.status != 200:
            raise BenchmarkError(f"a probe request was not answered 200: {reply}\n"
                                 f"{router.describe()}")
        # Let the probe's scale-up (one request in flight at a tick asks for 2 replicas) and
        # its scale-down window pass, so the step starts from the minimum.
        wait_until(lambda: _stats(admin_port).get("desired") == 1
                   and _stats(admin_port).get("replicas") == 1,
                   "the slow service back at 1 replica", [router],
                   s.scale_down_window_s + 30)
        log(f"policy {policy}: step to {s.rate:.1f} req/s (needs ~{s.replicas_needed} replicas at "
            f"{TARGET_UTILIZATION} % target), schedule {describe_phases(build_phases(s))}")
        records, samples, scheduled, missed = asyncio.run(drive(s, port, admin_port, router))
        if not router.alive():
            raise BenchmarkError(f"mlfe up died during the run\n{router.describe()}")
        return records, samples, scheduled, missed


@dataclass
class ZeroResult:
    window_s: float
    to_zero_s: float  # from the end of the last request to no replica
    status: int  # of the first request after idle
    latency_s: float
    queue_ms: float | None  # the time it waited in the router's queue (access log)
    refused: int  # 503s among the requests of the run
    to_zero_since_arrival_s: float  # from the last request's arrival (the last demand)
    warm_latency_s: float  # that request's latency (a cold start too)
    start_failures: int  # replica starts that failed in the run (/v1/stats)


def run_zero(s: Settings, tmp: Path) -> ZeroResult:
    """Scale to zero and back: a warm-up request (from zero, as the service starts at 0), idle
    until no replica is left, then one request after idle."""
    tmp = tmp / "zero"
    tmp.mkdir()
    with Processes(tmp) as procs:
        port, admin_port = free_port(), free_port()
        cfg_path = tmp / "zero.yaml"
        cfg = mlfe_config(tmp, s, port, admin_port, "demand", min_replicas=0)
        cfg["services"][SERVICE]["autoscale_cold_start_seconds"] = 60
        cfg_path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFE_ADMIN_TOKEN": ADMIN_TOKEN}
        router = procs.start("mlfe-up-zero", [sys.executable, "-m", "deploy.cli", "up",
                                              "--config", str(cfg_path)], env=env)
        wait_until(answers_200(port, "/-/ready"), "mlfe up: GET /-/ready", [router])
        wait_until(lambda: _stats(admin_port).get("scaledToZero") is True,
                   "the service at zero replicas", [router], 30)
        statuses = []

        def score(rid: str) -> tuple[int, float]:
            t = time.monotonic()
            reply = http_request(port, "POST", SCORE_PATH, body=b'{"data": [1]}', timeout_s=90,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {KEY}",
                                          "x-ms-client-request-id": rid})
            status = reply.status if reply is not None else 0
            statuses.append(status)
            return status, time.monotonic() - t

        log(f"scale to zero: a first request, then idle for the {s.zero_window_s:g} s window")
        sent = time.monotonic()
        _, warm_latency = score("warm-up")
        done = time.monotonic()
        wait_until(lambda: _stats(admin_port).get("scaledToZero") is True,
                   "the service back at zero replicas", [router], s.zero_window_s + 30)
        to_zero = time.monotonic() - done
        to_zero_since_arrival = time.monotonic() - sent
        status, latency = score("after-idle")
        found: list[float] = []

        def logged() -> bool:  # the access log is written in batches, off the request path
            for line in router.log_path.read_text(errors="replace").splitlines():
                if '"after-idle"' in line and '"queueMs"' in line:
                    found.append(float(json.loads(line[line.index("{"):])["queueMs"]))
                    return True
            return False

        wait_until(logged, "the access log line of the request after idle", [router], 10)
        queue_ms = found[0]
        return ZeroResult(s.zero_window_s, to_zero, status, latency, queue_ms,
                          statuses.count(503), to_zero_since_arrival, warm_latency,
                          int(_stats(admin_port).get("startFailures", 0)))


def _stats(admin_port: int) -> dict[str, Any]:
    reply = http_request(admin_port, "GET", "/v1/stats",
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    if reply is None or reply.status != 200:
        return {}
    svc: dict[str, Any] = json.loads(reply.body).get("services", {}).get(SERVICE, {})
    return svc


def describe_phases(phases: Sequence[Phase]) -> str:
    return ", ".join(f"{p.name} {p.start:g}-{p.end:g} s" for p in phases)


# --- analysis ----------------------------------------------------------------------------------


@dataclass
class Window:
    t: float  # window start, s since the load's start
    offered: float  # req/s scheduled in the trailing second (P99_WINDOW_S)
    served: float  # 200s answered in the trailing second, per s
    refused_rate: float  # 503s answered in the trailing second, per s
    refused: int  # 503s answered in this 100 ms window
    p99_ms: float | None  # over answers in the trailing second
    ready: int | None
    desired: int | None
    current: int | None
    busy: int | None
    queued: int | None


def series(records: Sequence[LoadRecord], samples: Sequence[Sample], end: float) -> list[Window]:
    n = math.ceil(end / SAMPLE_S)
    offered = [0] * n
    served = [0] * n
    refused = [0] * n
    done: list[list[float]] = [[] for _ in range(n)]
    for sched, latency, status, _ in records:
        i = int(sched / SAMPLE_S)
        if 0 <= i < n:
            offered[i] += 1
        j = int((sched + latency) / SAMPLE_S)
        if 0 <= j < n:
            if status == 200:
                served[j] += 1
            elif status == 503:
                refused[j] += 1
            if status > 0:
                done[j].append(latency)
    per_window = round(P99_WINDOW_S / SAMPLE_S)
    out = []
    si = 0
    last: dict[str, Any] = {}
    for i in range(n):
        t = i * SAMPLE_S
        while si < len(samples) and samples[si][0] < t + SAMPLE_S:
            last = samples[si][1]
            si += 1
        span = range(max(0, i - per_window + 1), i + 1)
        trailing = [x for k in span for x in done[k]]
        p99 = percentile(trailing, 99)
        seconds = len(span) * SAMPLE_S
        out.append(Window(
            t=t,
            offered=sum(offered[k] for k in span) / seconds,
            served=sum(served[k] for k in span) / seconds,
            refused_rate=sum(refused[k] for k in span) / seconds,
            refused=refused[i],
            p99_ms=p99 * 1e3 if p99 is not None else None,
            ready=last.get("replicas"),
            desired=last.get("desired"),
            current=last.get("current"),
            busy=last.get("busy"),
            queued=last.get("queued"),
        ))
    return out


def first_time(samples: Sequence[Sample], after: float, cond: Callable[[dict[str, Any]], bool],
               before: float = math.inf) -> float | None:
    for t, st in samples:
        if after <= t < before and cond(st):
            return t - after
    return None


def at_time(samples: Sequence[Sample], t: float) -> dict[str, Any]:
    """The last sample taken before `t`."""
    found: dict[str, Any] = samples[0][1] if samples else {}
    for at, st in samples:
        if at >= t:
            break
        found = st
    return found


def direction_changes(values: Sequence[int]) -> tuple[int, int, int]:
    """(reversals, steps up, steps down) of a sampled integer series."""
    ups = downs = reversals = 0
    last_dir = 0
    for a, b in itertools.pairwise(values):
        if b == a:
            continue
        d = 1 if b > a else -1
        ups += d > 0
        downs += d < 0
        if last_dir and d != last_dir:
            reversals += 1
        last_dir = d
    return reversals, ups, downs


@dataclass
class PhaseStats:
    name: str
    start: float
    end: float
    offered_rps: float
    served_rps: float
    requests: int
    ok: int
    refused: int
    failed: int  # neither 200 nor 503: other statuses, connection errors, not sent
    p50_ms: float | None
    p99_ms: float | None
    ready_min: int | None
    ready_max: int | None
    desired_min: int | None
    desired_max: int | None

    @property
    def refused_share(self) -> float | None:
        return self.refused / self.requests if self.requests else None


def phase_stats(p: Phase, records: Sequence[LoadRecord], samples: Sequence[Sample]) -> PhaseStats:
    mine = [r for r in records if p.start <= r[0] < p.end]
    ok = [r for r in mine if r[2] == 200]
    refused = sum(1 for r in mine if r[2] == 503)
    lat = [r[1] * 1e3 for r in ok]
    served = sum(1 for r in records if r[2] == 200 and p.start <= r[0] + r[1] < p.end)
    sts = [st for t, st in samples if p.start <= t < p.end]
    ready = [st["replicas"] for st in sts if "replicas" in st]
    desired = [st["desired"] for st in sts if "desired" in st]
    length = p.end - p.start
    return PhaseStats(
        name=p.name, start=p.start, end=p.end,
        offered_rps=len(mine) / length if length else 0.0,
        served_rps=served / length if length else 0.0,
        requests=len(mine), ok=len(ok), refused=refused, failed=len(mine) - len(ok) - refused,
        p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99),
        ready_min=min(ready, default=None), ready_max=max(ready, default=None),
        desired_min=min(desired, default=None), desired_max=max(desired, default=None),
    )


Goal = tuple[str, bool, str]  # (the "Done when" item, met, what was measured)


@dataclass
class Summary:
    metrics: list[tuple[str, float | None, str]]  # (name, value, unit)
    phases: list[PhaseStats]
    goals: list[Goal]


def summarise(s: Settings, records: Sequence[LoadRecord], samples: Sequence[Sample]) -> Summary:
    phases = build_phases(s)
    by = {p.name: p for p in phases}
    step, drop, square = by["step"], by["drop"], by["square"]
    before = at_time(samples, step.start)
    desired0, ready0 = before.get("desired", 1), before.get("replicas", 1)
    decision = first_time(samples, step.start, lambda st: st.get("desired", 0) > desired0)
    first_ready = first_time(samples, step.start, lambda st: st.get("replicas", 0) > ready0)
    needed_ready = first_time(samples, step.start,
                              lambda st: st.get("replicas", 0) >= s.replicas_needed)
    stats = [phase_stats(p, records, samples) for p in phases]
    step_stats = next(p for p in stats if p.name == "step")
    # The first 503 of the step, and how long 503s kept coming after it started.
    step_refusals = sorted(r[0] - step.start for r in records
                           if r[2] == 503 and step.start <= r[0] < step.end)
    at_drop = at_time(samples, drop.start)
    top = at_drop.get("desired", 0)
    down_first = first_time(samples, drop.start, lambda st: st.get("desired", top) < top,
                            before=drop.end)
    down_min = first_time(samples, drop.start, lambda st: st.get("desired", 0) <= 1,
                          before=drop.end)
    ready_min = first_time(samples, drop.start, lambda st: st.get("replicas", 0) <= 1,
                           before=drop.end)
    wave = [st.get("desired", 0) for t, st in samples if square.start <= t < square.end]
    wave_ready = [st.get("replicas", 0) for t, st in samples if square.start <= t < square.end]
    reversals, ups, downs = direction_changes(wave)
    ready_reversals, _, _ = direction_changes(wave_ready)
    answered = [r for r in records if r[2] > 0]
    settled = step.start + (needed_ready if needed_ready is not None else step.end - step.start)
    settled_ms = [r[1] * 1e3 for r in records
                  if r[2] == 200 and settled <= r[0] < step.end]
    total_refused = sum(1 for r in records if r[2] == 503)
    # 503s of requests that arrived once the first added replica served: none is the aim.
    late_refused = sum(1 for r in records if r[2] == 503 and first_ready is not None
                       and step.start + first_ready <= r[0] < step.end)
    square_stats = next(p for p in stats if p.name == "square")
    # The replicas of the first decision: 503s should end once they all serve.
    decided = next((st.get("desired", 0) for t, st in samples
                    if t >= step.start and st.get("desired", 0) > desired0), None)
    all_ready = None if decided is None else first_time(
        samples, step.start, lambda st: st.get("replicas", 0) >= decided, before=step.end)
    after_all_ready = sum(1 for r in records if r[2] == 503 and all_ready is not None
                          and step.start + all_ready <= r[0] < step.end)
    # The last demand: the step's last arrival; the minimum should come one window after it.
    last_arrival = max((r[0] for r in records if step.start <= r[0] < step.end), default=None)
    since_last = (None if down_min is None or last_arrival is None
                  else drop.start + down_min - last_arrival)
    metrics: list[tuple[str, float | None, str]] = [
        ("offered rate in the step", s.rate, "req/s"),
        ("step -> scale decision (desired rises)", decision, "s"),
        ("desired at its highest in the step", step_stats.desired_max, "replicas"),
        ("step -> first added replica serving (ready rises)", first_ready, "s"),
        (f"step -> {s.replicas_needed} replicas serving", needed_ready, "s"),
        ("503 share in the step", pct(step_stats.refused_share), "%"),
        ("last 503 of the step, after the step", step_refusals[-1] if step_refusals else 0.0,
         "s"),
        ("503s in the step after the first added replica served", float(late_refused), "count"),
        ("step -> the first decision's replicas all serving", all_ready, "s"),
        ("503s in the step after the first decision's replicas all served",
         float(after_all_ready) if all_ready is not None else None, "count"),
        ("p99 latency of 200s in the step", step_stats.p99_ms, "ms"),
        (f"p99 latency of 200s in the step, once {s.replicas_needed} replicas served",
         percentile(settled_ms, 99), "ms"),
        ("drop -> desired falls", down_first, "s"),
        ("drop -> desired at the minimum (1)", down_min, "s"),
        ("drop -> ready replicas at the minimum (1)", ready_min, "s"),
        ("last arrival of the step -> desired at the minimum (1)", since_last, "s"),
        ("scale-down window (config)", s.scale_down_window_s, "s"),
        ("square wave: direction changes of desired", float(reversals), "count"),
        ("square wave: desired steps up / down", float(ups), f"up ({downs} down)"),
        ("square wave: direction changes of ready replicas", float(ready_reversals), "count"),
        ("503 share in the square wave", pct(square_stats.refused_share), "%"),
        ("503 share over the run", pct(total_refused / len(records) if records else None), "%"),
        ("requests neither 200 nor 503", float(sum(p.failed for p in stats)), "count"),
        ("answered requests", float(len(answered)), "count"),
    ]
    n, window = s.replicas_needed, s.scale_down_window_s
    late = window + 2 * REFRESH_S + SAMPLE_S  # the tick that saw the last arrival, the next one
    goals: list[Goal] = [
        (f"peak desired <= {n + 1} (the step needs {n})",
         step_stats.desired_max is not None and step_stats.desired_max <= n + 1,
         f"{fmt_num(step_stats.desired_max)}"),
        ("decision <= 1 s after the step", decision is not None and decision <= 1.0,
         f"{fmt_num(decision, 2)} s (sampled every {SAMPLE_S * 1e3:g} ms)"),
        (f"{n} replicas serving <= 2 s after the step",
         needed_ready is not None and needed_ready <= 2.0, f"{fmt_num(needed_ready, 2)} s"),
        ("503s only while the first added replicas start",
         all_ready is not None and after_all_ready == 0,
         f"{len(step_refusals)} in the step, the last arrived at +"
         f"{fmt_num(step_refusals[-1] if step_refusals else None, 2)} s; the first decision's "
         f"{fmt_num(decided)} replicas all served at +{fmt_num(all_ready, 2)} s, "
         f"{after_all_ready} 503s after that"),
        ("the minimum exactly one window after the last demand",
         since_last is not None and window <= since_last <= late,
         f"{fmt_num(since_last, 2)} s after the step's last arrival (window {window:g} s; "
         f"allowed up to {late:g} s: a {REFRESH_S:g} s refresh and a sample)"),
        ("no flapping in the square wave", reversals == 0,
         f"{reversals} direction changes of desired ({ups} up, {downs} down)"),
    ]
    return Summary(metrics, stats, goals)


def zero_goals(z: ZeroResult) -> list[Goal]:
    """The scale-to-zero run's "Done when" items."""
    late = z.window_s + z.warm_latency_s + 2 * REFRESH_S + 0.5  # last tick, next tick, a poll
    return [
        ("idle -> 0 replicas after the window",
         z.window_s <= z.to_zero_since_arrival_s <= late,
         f"{z.to_zero_since_arrival_s:.2f} s after the last request arrived (window "
         f"{z.window_s:g} s; allowed up to {late:.1f} s: its latency, a refresh, a poll)"),
        ("the first request after idle served 200 after one cold start, its wait in the "
         "access log, no 503",
         z.status == 200 and z.queue_ms is not None and z.queue_ms > 0 and z.refused == 0
         and z.start_failures == 0,
         f"status {z.status}, queueMs {fmt_num(z.queue_ms, 0)}, {z.refused} 503s, "
         f"{z.start_failures} failed replica starts"),
    ]


def pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def report(summaries: dict[str, Summary], s: Settings, machine: dict[str, Any],
           scheduled: dict[str, int], missed: dict[str, int], zero: ZeroResult | None) -> str:
    policies = list(summaries)
    right: list[Literal["l", "r"]] = ["r"] * len(policies)
    rows = []
    first = summaries[policies[0]]
    for i, (name, _, unit) in enumerate(first.metrics):
        digits = 0 if unit in ("count", "replicas") or unit.startswith("up") else (
            2 if unit in ("s", "%") else 1)
        values = [summaries[p].metrics[i][1] for p in policies]
        ups = [summaries[p].metrics[i][2] for p in policies]
        if unit.startswith("up"):  # "up (N down)": the down count differs per policy
            rows.append([name, *(f"{fmt_num(v, 0)} {u}" for v, u in zip(values, ups,
                                                                       strict=True)), ""])
        else:
            rows.append([name, *(fmt_num(v, digits) for v in values), unit])
    phase_rows = [
        [policy, p.name, f"{p.start:g}-{p.end:g}", fmt_num(p.offered_rps, 1),
         fmt_num(p.served_rps, 1), str(p.requests), str(p.refused),
         fmt_num(pct(p.refused_share), 2), str(p.failed), fmt_num(p.p50_ms, 1),
         fmt_num(p.p99_ms, 1), f"{fmt_num(p.ready_min)}-{fmt_num(p.ready_max)}",
         f"{fmt_num(p.desired_min)}-{fmt_num(p.desired_max)}"]
        for policy in policies for p in summaries[policy].phases
    ]
    out = [
        f"Machine: {machine['cpu_model']}, {machine['nproc']} cores, Python {machine['python']}",
        f"Settings: run() {s.run_ms:g} ms, 1 request per replica at a time, "
        f"{TARGET_UTILIZATION} % target, min 1 / max {s.max_replicas} replicas, refresh 1 s, "
        f"scale-down window {s.scale_down_window_s:g} s, max_request_wait_time "
        f"{s.max_wait_ms} ms; open-loop load: step to {s.rate:.1f} req/s held {s.hold_s:g} s, "
        f"drop {s.drop_s:g} s, square wave {s.square_cycles} x {s.square_period_s:g} s between "
        f"{s.rate:.1f} and {s.rate * s.square_low_fraction:.1f} req/s; "
        + "; ".join(f"{p}: {scheduled[p]} requests, /v1/stats every {SAMPLE_S * 1e3:g} ms "
                    f"({missed[p]} missed)" for p in policies),
        "",
        markdown_table(["metric", *policies, "unit"], rows, ["l", *right, "l"]),
        "",
        markdown_table(
            ["policy", "phase", "t (s)", "offered req/s", "served req/s", "requests", "503",
             "503 %", "other errors", "p50 ms (200)", "p99 ms (200)", "ready", "desired"],
            phase_rows, ["l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r"]),
    ]
    goals = all_goals(summaries, zero)
    if goals:
        out += ["", "Goals (the issue's \"Done when\", for the demand policy"
                + ("; --quick: a smaller step, shown, not held against the run" if s.quick
                   else "") + "):",
                *(f"- {name}: {'met' if ok else 'NOT met'}: {detail}"
                  for name, ok, detail in goals)]
    if zero is not None:
        out += ["", "Scale to zero (autoscale_min_replicas: 0, demand policy):", "",
                markdown_table(["metric", "value", "unit"], [
                    ["scale-to-zero window (config)", fmt_num(zero.window_s, 0), "s"],
                    ["last request -> no replica", fmt_num(zero.to_zero_s, 2), "s"],
                    ["first request after idle: status", str(zero.status), ""],
                    ["first request after idle: latency", fmt_num(zero.latency_s * 1e3, 0),
                     "ms"],
                    ["first request after idle: queueMs (access log)",
                     fmt_num(zero.queue_ms, 0), "ms"],
                    ["503s in the scale-to-zero run", str(zero.refused), "count"],
                ], ["l", "r", "l"])]
    return "\n".join(out)


def all_goals(summaries: Mapping[str, Summary], zero: ZeroResult | None) -> list[Goal]:
    goals = list(summaries["demand"].goals) if "demand" in summaries else []
    return goals + (zero_goals(zero) if zero is not None else [])


def plot(runs: Mapping[str, Sequence[Window]], phases: Sequence[Phase], s: Settings,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(runs)
    fig, grid = plt.subplots(3, cols, sharex=True, sharey="row", figsize=(8 * cols, 9),
                             squeeze=False)
    for col, (policy, windows) in enumerate(runs.items()):
        axes = grid[:, col]
        t = [w.t for w in windows]
        ax = axes[0]
        ax.plot(t, [w.offered for w in windows], label="offered req/s", lw=1.5,
                color="tab:gray")
        ax.plot(t, [w.served for w in windows], label="served (200) req/s", lw=0.9,
                color="tab:green")
        ax.plot(t, [w.refused_rate for w in windows], label="503/s", lw=0.9, color="tab:red")
        ax.set_ylabel(f"req/s (trailing {P99_WINDOW_S:g} s)")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(f"autoscale_policy: {policy}")
        ax = axes[1]
        for name, color, width, style in (("ready", "tab:green", 2.5, "-"),
                                          ("desired", "tab:blue", 1.2, "--"),
                                          ("current", "tab:purple", 1.0, ":")):
            ax.step(t, [getattr(w, name) for w in windows], where="post",
                    label=f"replicas {name}", color=color, lw=width, ls=style)
        ax.plot(t, [w.busy for w in windows], label="busy", lw=0.7, color="tab:orange")
        ax.plot(t, [w.queued for w in windows], label="queued", lw=0.7, color="tab:red")
        ax.set_ylabel("replicas / requests")
        ax.legend(loc="upper right", fontsize=8)
        ax = axes[2]
        ax.plot(t, [w.p99_ms for w in windows],
                label=f"p99 latency (trailing {P99_WINDOW_S:g} s)", lw=0.8, color="tab:brown")
        ax.set_ylabel("ms")
        ax.set_xlabel("seconds since the load started")
        ax.legend(loc="upper right", fontsize=8)
        for a in axes:
            for p in phases[1:]:
                a.axvline(p.start, color="k", lw=0.5, ls=":")
    fig.suptitle(
        f"mlfe autoscaling: run() {s.run_ms:g} ms, cap 1/replica, step to {s.rate:.0f} req/s, "
        f"scale-down window {s.scale_down_window_s:g} s")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.autoscale",
        description="Autoscaling under a step load, a drop and a square wave (mlfe up).")
    p.add_argument("--replicas-needed", type=int, default=5,
                   help="the step's rate is what needs this many replicas (default 5)")
    p.add_argument("--run-ms", type=float, default=50, help="run() time in ms (default 50)")
    p.add_argument("--max-replicas", type=int, default=10,
                   help="autoscale_max_replicas (default 10)")
    p.add_argument("--max-wait-ms", type=int, default=500,
                   help="max_request_wait_time (default 500, azureml's)")
    p.add_argument("--idle", type=float, default=3, help="seconds idle before the step")
    p.add_argument("--hold", type=float, default=30, help="seconds the step is held")
    p.add_argument("--scale-down-window", type=float, default=60,
                   help="autoscale_scale_down_window_seconds (default 60)")
    p.add_argument("--drop", type=float, default=None,
                   help="seconds at 0 after the step (default: window + 20)")
    p.add_argument("--square-period", type=float, default=20,
                   help="square wave period in s (default 20: 10 s high, 10 s low)")
    p.add_argument("--square-cycles", type=int, default=4, help="square wave periods (4)")
    p.add_argument("--square-low", type=float, default=0.2,
                   help="the wave's low level as a fraction of the step's rate (default 0.2)")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="autoscale_policy values to run, in order (default demand,azureml)")
    p.add_argument("--zero-window", type=float, default=60,
                   help="the scale-to-zero run's scale-down window in s (default 60); "
                        "0 skips that run")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--quick", action="store_true",
                   help="smoke test (~70 s): each policy with 3 replicas needed (max 4), "
                        "4 s step, 2 s scale-down window, 2 short square-wave periods; "
                        "scale to zero with a 2 s window")
    a = p.parse_args(argv)
    policies = tuple(x.strip() for x in a.policies.split(",") if x.strip())
    if not policies or set(policies) - set(POLICIES):
        p.error(f"--policies: a comma-separated list of {', '.join(POLICIES)}")
    if a.quick:
        return Settings(replicas_needed=3, run_ms=a.run_ms, max_replicas=4,
                        max_wait_ms=a.max_wait_ms, idle_s=1, hold_s=4, scale_down_window_s=2,
                        drop_s=5, square_period_s=3, square_cycles=2,
                        square_low_fraction=a.square_low, results_dir=a.results_dir, quick=True,
                        policies=policies, zero_window_s=2)
    if min(a.replicas_needed, a.max_replicas, a.square_cycles) < 1 or a.run_ms <= 0:
        p.error("--replicas-needed, --max-replicas, --square-cycles and --run-ms must be > 0")
    drop = a.drop if a.drop is not None else a.scale_down_window + 20
    return Settings(a.replicas_needed, a.run_ms, a.max_replicas, a.max_wait_ms, a.idle, a.hold,
                    a.scale_down_window, drop, a.square_period, a.square_cycles, a.square_low,
                    a.results_dir, False, policies, a.zero_window)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    interrupt_on_signals()
    started = dt.datetime.now(dt.UTC)
    machine = machine_info()
    runs: dict[str, tuple[list[LoadRecord], list[Sample], int, int]] = {}
    zero: ZeroResult | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="mlfe-bench-autoscale-") as tmp_name:
            for policy in s.policies:
                runs[policy] = run_benchmark(s, Path(tmp_name), policy)
            if s.zero_window_s > 0:
                zero = run_zero(s, Path(tmp_name))
    except BenchmarkError as e:
        print(f"benchmarks.autoscale: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks.autoscale: interrupted; every started process was stopped",
              file=sys.stderr)
        return 130
    empty = [p for p, run in runs.items() if not run[1]]
    if empty:
        print(f"benchmarks.autoscale: no /v1/stats sample was read ({', '.join(empty)})",
              file=sys.stderr)
        return 1
    phases = build_phases(s)
    summaries = {p: summarise(s, run[0], run[1]) for p, run in runs.items()}
    goals = all_goals(summaries, zero)
    print(report(summaries, s, machine, {p: r[2] for p, r in runs.items()},
                 {p: r[3] for p, r in runs.items()}, zero), flush=True)
    windows = {p: series(run[0], run[1], phases[-1].end) for p, run in runs.items()}
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    png = s.results_dir / f"autoscale-{stamp}.png"
    plot(windows, phases, s, png)
    out = s.results_dir / f"autoscale-{stamp}.json"
    write_json(out, {
        **run_record("autoscale", started, argv, s.to_json()),
        "machine": machine,
        "mlfe_config": {p: mlfe_config(Path("<tmp>"), s, 0, 0, p) for p in runs},
        "phases": [{"name": p.name, "start": p.start, "end": p.end} for p in phases],
        "runs": {policy: {
            "metrics": [{"name": n, "value": v, "unit": u}
                        for n, v, u in summaries[policy].metrics],
            "phase_stats": [{**p.__dict__, "refused_share": p.refused_share}
                            for p in summaries[policy].phases],
            "series": [w.__dict__ for w in windows[policy]],
            "samples": [{"t": round(t, 3), **st} for t, st in run[1]],
            "records": {"fields": ["scheduled_s", "latency_s", "status", "retry_after"],
                        "rows": [[round(a, 4), round(b, 5), c, d] for a, b, c, d in run[0]]},
        } for policy, run in runs.items()},
        "scale_to_zero": zero.__dict__ if zero is not None else None,
        "goals": [{"name": n, "met": ok, "detail": d} for n, ok, d in goals],
    })
    print(f"\nRaw data: {shown_path(out)}\nPlot: {shown_path(png)}")
    if zero is not None and zero.status != 200:
        return 1
    return 0 if s.quick or all(ok for _, ok, _ in goals) else 1


if __name__ == "__main__":
    t_start = time.monotonic()
    status = main()
    log(f"done in {time.monotonic() - t_start:.0f} s")
    sys.exit(status)
