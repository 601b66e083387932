"""Every metric the router exports, declared in one place.

The scoring path only bumps plain integers on a per-service `ServiceMetrics` (a few hundred
nanoseconds a request); prometheus-client turns them into metric families when `/metrics` is
scraped. Its own Counter/Histogram take a lock per observation, which costs more than the whole
budget of a request's accounting here. Gauges (in flight, queued, replicas, utilization) are read
from the live pools at scrape time, so they cost nothing per request.

Labels come only from a small fixed set: service and version names from config, status class,
rejection reason, failure kind. Never paths, keys or client values.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mlfe.stats import StatsSource

if TYPE_CHECKING:
    from router.accesslog import AccessLog

# Seconds. Scoring latency spans sub-millisecond to a minute (scoring_timeout_ms).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)
# The router's own overhead per request: microseconds to a few milliseconds.
ROUTING_BUCKETS = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
REJECT_REASONS = ("queue_timeout", "queue_full", "no_replica")
UPSTREAM_ERRORS = ("refused", "closed", "bad_response", "timeout")


class Histogram:
    """Bucket counts without a lock (one event loop thread writes them)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_right(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append((repr(bound), total))
        out.append(("+Inf", self.count))
        return out


class ServiceMetrics:
    """What one service's requests did, as plain counters."""

    __slots__ = ("queue_wait", "rejected", "requests", "routing", "total", "upstream",
                 "upstream_errors")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}  # (version, status class) -> count
        self.total = Histogram(LATENCY_BUCKETS)
        self.queue_wait = Histogram(LATENCY_BUCKETS)
        self.upstream = Histogram(LATENCY_BUCKETS)
        self.routing = Histogram(ROUTING_BUCKETS)
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.upstream_errors = dict.fromkeys(UPSTREAM_ERRORS, 0)

    def flow(self, busy: int, queued: int) -> tuple[int, int, float]:
        """(arrivals, served, service seconds), cumulative, for the demand policy's rates
        (mlfe/stats.py). Every admitted request is sent to a replica (then counted in
        `upstream` when over), refused (`rejected`), or still busy or queued."""
        served = self.upstream.count
        return served + sum(self.rejected.values()) + busy + queued, served, self.upstream.sum

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counters, for a worker supervisor to add up (JSON-able)."""
        return {
            "requests": [[v, c, n] for (v, c), n in self.requests.items()],
            "hist": {name: [*h.counts, h.sum, h.count] for name, h in self._histograms()},
            "rejected": dict(self.rejected),
            "errors": dict(self.upstream_errors),
        }

    def add(self, snap: dict[str, Any]) -> None:
        """Add another process's snapshot into these counters."""
        for version, cls, n in snap["requests"]:
            key = (str(version), str(cls))
            self.requests[key] = self.requests.get(key, 0) + int(n)
        for name, h in self._histograms():
            values = snap["hist"].get(name)
            if values is None or len(values) != len(h.counts) + 2:
                continue
            for i, n in enumerate(values[: len(h.counts)]):
                h.counts[i] += int(n)
            h.sum += float(values[-2])
            h.count += int(values[-1])
        for reason, n in snap["rejected"].items():
            self.rejected[reason] = self.rejected.get(reason, 0) + int(n)
        for kind, n in snap["errors"].items():
            self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + int(n)

    def _histograms(self) -> tuple[tuple[str, Histogram], ...]:
        return (("total", self.total), ("queue_wait", self.queue_wait),
                ("upstream", self.upstream), ("routing", self.routing))

    def count(self, version: str, status: int) -> None:
        key = (version, STATUS_CLASSES[min(max(status // 100 - 1, 0), 4)])
        self.requests[key] = self.requests.get(key, 0) + 1


# Requests that named no known service (404s, health probes are not counted).
UNROUTED = ServiceMetrics()


def _labelled_histogram(name: str, doc: str, per_service: Iterable[tuple[str, Histogram]]
                        ) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["service"])
    for service, h in per_service:
        fam.add_metric([service], h.cumulative(), h.sum)
    return fam


class RouterCollector(Collector):
    """Reads the live router when scraped: ``names`` the current services, ``metrics_of`` a
    service's counters, ``stats`` its live counts (mlfe/stats.py), ``scaling`` what the
    autoscaler last decided for it; ``extra`` more families (data collection)."""

    def __init__(
        self,
        names: Callable[[], Iterable[str]],
        metrics_of: Callable[[str], ServiceMetrics],
        stats: StatsSource,
        scaling: Callable[[str], Mapping[str, Any]],
        extra: Callable[[], Iterable[Metric]] = lambda: (),
    ) -> None:
        self._names = names
        self._metrics_of = metrics_of
        self._stats = stats
        self._scaling = scaling
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        names = list(self._names())
        named = [(n, self._metrics_of(n)) for n in names]
        with_unrouted = [*named, ("", UNROUTED)]

        requests = CounterMetricFamily(
            "mlfe_requests", "Scoring requests answered, by service, version and status class.",
            labels=["service", "version", "status_class"])
        for name, m in with_unrouted:
            for (version, cls), n in m.requests.items():
                requests.add_metric([name, version, cls], n)
        yield requests

        yield _labelled_histogram(
            "mlfe_request_duration_seconds", "Time from request head to the end of the answer.",
            ((n, m.total) for n, m in named))
        yield _labelled_histogram(
            "mlfe_queue_wait_seconds", "Time a request waited for a free replica slot.",
            ((n, m.queue_wait) for n, m in named))
        yield _labelled_histogram(
            "mlfe_upstream_duration_seconds", "Time from sending to a replica to its full answer.",
            ((n, m.upstream) for n, m in named))
        yield _labelled_histogram(
            "mlfe_routing_duration_seconds",
            "The router's own time per request: total less queue wait and replica time.",
            ((n, m.routing) for n, m in named))

        rejected = CounterMetricFamily(
            "mlfe_rejected_requests", "Requests refused with 503, by reason.",
            labels=["service", "reason"])
        errors = CounterMetricFamily(
            "mlfe_upstream_errors", "Replica failures (502/504), by kind.",
            labels=["service", "kind"])
        for name, m in named:
            for reason, n in m.rejected.items():
                rejected.add_metric([name, reason], n)
            for kind, n in m.upstream_errors.items():
                errors.add_metric([name, kind], n)
        yield rejected
        yield errors

        in_flight = GaugeMetricFamily("mlfe_in_flight_requests", "Requests on replicas now.",
                                      labels=["service"])
        queued = GaugeMetricFamily("mlfe_queued_requests", "Requests waiting for a slot now.",
                                   labels=["service"])
        replicas = GaugeMetricFamily("mlfe_replicas", "Replicas by state.",
                                     labels=["service", "state"])
        utilization = GaugeMetricFamily(
            "mlfe_utilization", "(busy + queued) / (ready replicas x per-replica cap).",
            labels=["service"])
        zero = GaugeMetricFamily(
            "mlfe_scaled_to_zero", "1 while the service idles with no replica (min 0).",
            labels=["service"])
        for name in names:
            st = self._stats.counts(name)
            in_flight.add_metric([name], st.busy)
            queued.add_metric([name], st.queued)
            replicas.add_metric([name, "ready"], st.replicas)
            scaling = self._scaling(name)
            replicas.add_metric([name, "current"], scaling.get("current", st.members))
            replicas.add_metric([name, "desired"], scaling.get("desired", st.members))
            if "starting" in scaling:
                replicas.add_metric([name, "starting"], scaling["starting"])
            zero.add_metric([name], 1 if scaling.get("scaledToZero") else 0)
            if st.utilization is not None:
                utilization.add_metric([name], st.utilization)
        yield from (in_flight, queued, replicas, utilization, zero)
        yield from self._extra()


class RouterProcessCollector(Collector):
    """The router's own processes, read when scraped: ``workers`` the worker processes serving
    the scoring port now (1 for a router of one process), ``desired_workers`` what the
    self-scaler last asked for (None without one), ``cpu_seconds`` the CPU time the router's
    processes used (a counter that drops when a worker is replaced: Prometheus reads that as a
    reset)."""

    def __init__(self, workers: Callable[[], int], cpu_seconds: Callable[[], float],
                 desired_workers: Callable[[], int | None] = lambda: None) -> None:
        self._workers = workers
        self._cpu_seconds = cpu_seconds
        self._desired = desired_workers

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily("mlfe_router_workers",
                                    "The router's worker processes: current, and desired by its "
                                    "self-scaler.", labels=["state"])
        current = self._workers()
        workers.add_metric(["current"], current)
        desired = self._desired()
        workers.add_metric(["desired"], current if desired is None else desired)
        yield workers
        yield CounterMetricFamily("mlfe_router_cpu_seconds",
                                  "CPU time (user + system) used by the router's own processes.",
                                  value=self._cpu_seconds())


def access_log_metric(access_log: AccessLog) -> Metric:
    """Access log lines dropped because stdout did not keep up (the loop never waits for it)."""
    fam = CounterMetricFamily(
        "mlfe_access_log_lines", "Access log lines, by result (dropped: stdout fell behind).",
        labels=["result"])
    fam.add_metric(["written"], access_log.written)
    fam.add_metric(["dropped"], access_log.dropped)
    return fam


def loop_tasks_metric() -> Metric:
    """asyncio Tasks alive on the router's loop (read at scrape time, on the loop): a number
    that keeps growing under steady load is a leak."""
    import asyncio
    import contextlib

    fam = GaugeMetricFamily("mlfe_event_loop_tasks", "asyncio Tasks alive on the router's loop.")
    # Scraped outside a running loop (no loop to ask): no number to give.
    with contextlib.suppress(RuntimeError):
        fam.add_metric([], len(asyncio.all_tasks()))
    return fam
