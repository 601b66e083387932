"""`mlfe top`: a live view of every service, from the admin API, without Prometheus.

Every interval it reads `GET /v1/stats` (live counts, what the autoscaler decided) and
`GET /metrics` (the latency histogram and the 503s), and shows per service what changed since the
previous read: requests per second, p50 and p99 latency, the queue, replicas ready / desired, and
503s per second. Percentiles come from the histogram's bucket counts over the interval,
interpolated within a bucket as Prometheus's `histogram_quantile` does.

The rows are a pure function of two samples (`rows`); only `run_top` talks and waits.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

LATENCY = "mlfe_request_duration_seconds"
REJECTED = "mlfe_rejected_requests"  # every rejection is a 503
HEADER = ("SERVICE", "REQ/S", "P50 MS", "P99 MS", "IN FLIGHT", "QUEUED", "READY/DESIRED",
          "503/S")
CLEAR = "\x1b[H\x1b[2J"

Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), ascending, +Inf last


class AdminReader(Protocol):
    """What `mlfe top` needs of the admin API's client (deploy/admin_client.py)."""

    def get(self, path: str) -> Any: ...

    def text(self, path: str) -> str: ...


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic seconds
    stats: Mapping[str, Mapping[str, Any]]  # GET /v1/stats's services
    latency: Mapping[str, Buckets]  # per service
    rejected: Mapping[str, float]  # per service, cumulative


def parse_metrics(text: str) -> tuple[dict[str, Buckets], dict[str, float]]:
    """The latency buckets and the rejected total of each service, from an exposition."""
    latency: dict[str, Buckets] = {}
    rejected: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == LATENCY:
            for s in family.samples:
                if s.name == LATENCY + "_bucket":
                    latency.setdefault(s.labels["service"], []).append(
                        (float(s.labels["le"]), s.value))
        elif family.name == REJECTED:
            for s in family.samples:
                if s.name == REJECTED + "_total":
                    name = s.labels["service"]
                    rejected[name] = rejected.get(name, 0.0) + s.value
    for buckets in latency.values():
        buckets.sort()
    return latency, rejected


def quantile(q: float, before: Buckets, after: Buckets) -> float | None:
    """The q-quantile of what was observed between two reads of a cumulative histogram, or None
    when nothing was. Linear within the bucket it falls in; the top finite bound when it falls in
    +Inf."""
    prev = dict(before)
    deltas = [(bound, count - prev.get(bound, 0.0)) for bound, count in after]
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in deltas:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            width = cumulative - below
            return lower + (bound - lower) * ((rank - below) / width if width else 1.0)
        lower, below = bound, cumulative
    return lower


def rows(prev: Sample, cur: Sample) -> list[tuple[str, ...]]:
    """One row per service now, its rates and percentiles over the interval."""
    dt = max(cur.at - prev.at, 1e-9)
    out: list[tuple[str, ...]] = []
    for name, st in cur.stats.items():
        before = prev.stats.get(name, {})
        done = int(st.get("completed", 0)) - int(before.get("completed", st.get("completed", 0)))
        refused = cur.rejected.get(name, 0.0) - prev.rejected.get(name, 0.0)
        p50 = quantile(0.5, prev.latency.get(name, []), cur.latency.get(name, []))
        p99 = quantile(0.99, prev.latency.get(name, []), cur.latency.get(name, []))
        desired = st.get("desired", st.get("replicas", 0))
        out.append((
            name, f"{max(done, 0) / dt:.1f}", _ms(p50), _ms(p99), str(st.get("busy", 0)),
            str(st.get("queued", 0)), f"{st.get('replicas', 0)}/{desired}",
            f"{max(refused, 0.0) / dt:.1f}",
        ))
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def table(body: Sequence[Sequence[str]]) -> str:
    lines = [HEADER, *body]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()
        for line in lines)


def take(client: AdminReader) -> Sample:
    stats = client.get("/v1/stats") or {}
    latency, rejected = parse_metrics(client.text("/metrics"))
    return Sample(time.monotonic(), stats.get("services", {}), latency, rejected)


def run_top(client: AdminReader, interval: float = 1.0, iterations: int = 0) -> int:
    """Refresh every ``interval`` seconds, ``iterations`` times (0: until Ctrl-C). On a terminal
    each frame replaces the last; otherwise (a pipe, a log) frames follow each other."""
    tty = sys.stdout.isatty()
    prev = take(client)
    shown = 0
    next_at = prev.at + interval
    try:
        while iterations <= 0 or shown < iterations:
            time.sleep(max(next_at - time.monotonic(), 0.0))
            # A slow read does not make the next frames come in a burst.
            next_at = max(next_at + interval, time.monotonic())
            cur = take(client)
            body = rows(prev, cur)
            frame = table(body) if body else "no services"
            stamp = time.strftime("%H:%M:%S")
            if tty:
                sys.stdout.write(f"{CLEAR}mlfe top  {stamp}  every {interval:g}s, Ctrl-C stops"
                                 f"\n\n{frame}\n")
            else:
                sys.stdout.write(f"{stamp}\n{frame}\n\n")
            sys.stdout.flush()
            prev = cur
            shown += 1
    except KeyboardInterrupt:
        pass
    return 0
