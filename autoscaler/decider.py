"""How many replicas a service should have: a pure function of its settings, load and ``now``.

Two policies (``autoscale_policy``), the same scale-down window.

**demand** (the default): Little's law. The replicas needed are the arrival rate times the time a
replica spends on a request (concurrency in service, L = λ·S), over what one replica may carry at
the target utilization: ``ceil(λ·S / (concurrency x target))``. λ counts requests when they
arrive, not when they are served, and S is measured at the replica (the router's upstream time,
without the time in the queue), so a backlog built while replicas were short is not mistaken for
load: a step that needs N replicas asks for N at its first decision, never the maximum. The
backlog B left when the N replicas are ready drains at their spare rate, ``N·c/S - λ`` =
``λ·(1/target - 1)`` (43 % of λ at 70 %), so within ``B / (λ·(1/target - 1))`` seconds; requests
that would wait longer than ``max_request_wait_time`` are refused by the router meanwhile. The
rate comes from cumulative counts sampled ``DEMAND_SAMPLES_PER_PERIOD`` times per refresh period
(:class:`DemandHistory`), and the loop decides at every sample: over the last refresh period,
starting where the service stopped being idle (a step is measured over the part of the period
it was on, once that is half a period), and over the history kept (``DEMAND_HISTORY_PERIODS``
periods) for rates too low to show in one period; the higher of the two is taken. Each uses
(arrivals - 1) / span, which never exceeds an evenly spaced rate. A step from idle is thus
answered about half a period after it began, with N.

**azureml**: azureml-fe's rule (README, Scaling): utilization = (busy + queued) / (replicas x
concurrency), and desired = ceil(replicas x utilization / target), clamped to [min, max]. The
replica count cancels out, so the decider computes ``ceil(demand / (concurrency x target))``
in integers: that is exact (21 busy at 70 % needs 30 replicas, where float division says
30.000000000000004 -> 31) and it works when there are no replicas at all.

Scaling up is applied at once. Scaling down is conservative: never below the highest
recommendation seen during the last ``scale_down_window_s`` seconds, so only a drop that lasts the
whole window removes replicas, and a short lull does not. That memory is a
:class:`ScaleDownWindow` value which the caller keeps and passes back in; nothing here reads a
clock or mutates state.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from mlfe.stats import ServiceStats

# The decider's input: a service's counts as the router reports them (mlfe/stats.py).
Counts = ServiceStats


class Policy(enum.StrEnum):
    DEMAND = "demand"  # arrival rate x service time (Little's law)
    AZUREML = "azureml"  # (busy + queued) / capacity, azureml-fe's rule


# The demand policy samples counts this many times per refresh period and keeps this many
# periods of samples (the long rate window, and the service time's).
DEMAND_SAMPLES_PER_PERIOD = 10
DEMAND_HISTORY_PERIODS = 10
# A rate needs load over at least this much of a period: 5 samples of a step, enough that one
# request more or less moves the estimate little, and a step is still answered in half a period.
DEMAND_MIN_SPAN_PERIODS = 0.5


@dataclass(frozen=True, slots=True)
class ScalingSpec:
    """One service's scaling settings (the ``autoscale_*`` config keys, unprefixed)."""

    min_replicas: int = 1
    max_replicas: int = 10
    target_utilization: int = 70  # percent
    replica_max_concurrent_requests: int = 1
    refresh_seconds: float = 1.0
    scale_down_window_s: float = 60.0
    autoscale_enabled: bool = True
    num_replicas: int | None = None  # the fixed count when autoscaling is off
    policy: Policy = Policy.DEMAND

    def __post_init__(self) -> None:
        # The config layer reports user errors by key; reaching here with bad values is a bug.
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                f"got min={self.min_replicas} max={self.max_replicas}"
            )
        if not 0 < self.target_utilization <= 100:
            raise ValueError(f"target_utilization must be in 1..100, got {self.target_utilization}")
        if self.replica_max_concurrent_requests < 1:
            raise ValueError(
                "replica_max_concurrent_requests must be >= 1, "
                f"got {self.replica_max_concurrent_requests}"
            )
        if self.refresh_seconds <= 0:
            raise ValueError(f"refresh_seconds must be > 0, got {self.refresh_seconds}")
        if self.scale_down_window_s < 0:
            raise ValueError(f"scale_down_window_s must be >= 0, got {self.scale_down_window_s}")
        if not self.autoscale_enabled and (self.num_replicas is None or self.num_replicas < 0):
            raise ValueError(f"autoscaling off needs num_replicas >= 0, got {self.num_replicas}")


class Reason(enum.StrEnum):
    SCALE_UP = "scale-up"
    SCALE_DOWN = "scale-down"
    HELD = "held"  # demand fell, but not for a whole scale-down window yet
    STEADY = "steady"
    FIXED = "fixed"  # autoscaling is off: num_replicas


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    utilization: float  # demand / ready capacity, as a fraction: 0.7 is 70 %; inf with none ready
    reason: Reason
    rate: float | None = None  # the demand policy's arrival rate, requests/s
    service_time: float | None = None  # and its service time, s (None: nothing served yet)


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counts at one moment (mlfe/stats.py), what rates are computed from."""

    at: float
    arrivals: int
    in_system: int  # busy + queued
    served: int
    service_seconds: float


@dataclass(frozen=True, slots=True)
class DemandHistory:
    """The demand policy's memory: recent samples, oldest first, and the last service time
    measured (kept while nothing finishes, so a service back from idle has one)."""

    samples: tuple[Sample, ...] = ()
    service_time: float | None = None

    def observe(self, counts: Counts, now: float, *, keep_s: float) -> DemandHistory:
        """The history with ``counts`` sampled at ``now``; samples older than ``keep_s`` go
        (one is kept before that, as the base of the oldest interval)."""
        new = Sample(now, counts.arrivals, counts.busy + counts.queued, counts.served,
                     counts.service_seconds)
        samples = self.samples
        if samples and now < samples[-1].at:
            raise ValueError(f"time went backwards: {now} after {samples[-1].at}")
        if samples and counts.served < samples[-1].served:
            samples = ()  # the counters restarted: deltas across that would be nonsense
        samples = (*samples, new)
        first = 0
        while first + 1 < len(samples) and samples[first + 1].at <= now - keep_s:
            first += 1
        samples = samples[first:]
        service_time = self.service_time
        base = samples[0]
        done = new.served - base.served
        if done > 0:
            service_time = max(new.service_seconds - base.service_seconds, 0.0) / done
        return DemandHistory(samples, service_time)

    def arrival_rate(self, window_s: float, now: float, *, min_span_s: float = 0.0) -> float:
        """Arrivals per second over the last ``window_s``, from where the service stopped
        being idle: (arrivals - 1) / span; 0 with fewer than two arrivals or load over less
        than ``min_span_s`` (too few samples to tell a rate from noise)."""
        inside = [s for s in self.samples if s.at >= now - window_s - 1e-9]
        start = 0
        # An idle start (nothing in the system, nothing arriving next) is not load: skip it.
        while (start + 1 < len(inside) and inside[start].in_system == 0
               and inside[start + 1].arrivals <= inside[start].arrivals):
            start += 1
        if start + 1 >= len(inside):
            return 0.0
        # The span must be ``min_span_s`` from the start, whichever sample the rate is from.
        last = inside[-1]
        if last.at - inside[start].at < min_span_s - 1e-9:
            return 0.0
        # (arrivals - 1) / span from the start; after an idle start, also from the next sample,
        # since load began somewhere inside that first interval.
        best = 0.0
        for first in inside[start:start + (2 if start or inside[0].in_system == 0 else 1)]:
            arrived = last.arrivals - first.arrivals
            span = last.at - first.at
            if arrived >= 2 and span > 0:
                best = max(best, (arrived - 1) / span)
        return best

    def arrived_since(self, since: float) -> int:
        """Arrivals after ``since`` (between the sample before it and the last one)."""
        if not self.samples:
            return 0
        base = self.samples[0]
        for s in self.samples:
            if s.at > since:
                break
            base = s
        return max(self.samples[-1].arrivals - base.arrivals, 0)


@dataclass(frozen=True, slots=True)
class Recommendation:
    at: float
    desired: int


@dataclass(frozen=True, slots=True)
class ScaleDownWindow:
    """Recent recommendations, oldest first.

    A recommendation is in effect from its time until the next one, so the window keeps every
    recommendation that was in effect at some point during the last ``window_s`` seconds. That
    makes a drop first seen at time T scale down at T + window_s exactly, whatever the tick rate.
    """

    recent: tuple[Recommendation, ...] = ()

    def record(self, rec: Recommendation, *, window_s: float) -> ScaleDownWindow:
        if self.recent and rec.at < self.recent[-1].at:
            raise ValueError(f"time went backwards: {rec.at} after {self.recent[-1].at}")
        # The same count again changes nothing in effect: keep the one that began it, so the
        # window holds one entry per change, however often the loop decides.
        same = bool(self.recent) and self.recent[-1].desired == rec.desired
        recent = self.recent if same else (*self.recent, rec)
        start = rec.at - window_s
        first = 0
        while first + 1 < len(recent) and recent[first + 1].at <= start:
            first += 1  # its successor took over before the window began
        return ScaleDownWindow(recent[first:])

    def highest(self) -> int | None:
        return max((r.desired for r in self.recent), default=None)


def utilization(spec: ScalingSpec, counts: Counts) -> float:
    """Demand over ready capacity (busy + queued) / (replicas x concurrency)."""
    demand = counts.busy + counts.queued
    capacity = counts.replicas * spec.replica_max_concurrent_requests
    if capacity == 0:
        return float("inf") if demand else 0.0
    return demand / capacity


def demand_estimate(spec: ScalingSpec, counts: Counts, history: DemandHistory, now: float
                    ) -> tuple[int, float, float | None]:
    """The demand policy's (replicas needed, arrival rate, service time), clamped.

    Any demand (a request in the system, or one arriving in the last refresh period) asks for
    at least one replica, so a service at zero starts one even before its service time is
    known; none asks for none (the minimum then applies)."""
    period = spec.refresh_seconds
    recent = history.arrived_since(now - period)
    in_system = counts.busy + counts.queued
    if not recent and not in_system:
        return _clamp(0, spec), 0.0, history.service_time
    min_span = period * DEMAND_MIN_SPAN_PERIODS
    rate = max(history.arrival_rate(period, now, min_span_s=min_span),
               history.arrival_rate(period * DEMAND_HISTORY_PERIODS, now, min_span_s=min_span))
    needed = 1
    service_time = history.service_time
    if service_time is not None:
        in_service = rate * service_time
        # The tolerance keeps float noise (5.0000000001) from asking for one replica more.
        per_replica = spec.replica_max_concurrent_requests * spec.target_utilization / 100
        needed = max(1, math.ceil(in_service / per_replica - 1e-9))
    return _clamp(needed, spec), rate, service_time


def recommend(spec: ScalingSpec, counts: Counts) -> int:
    """azureml's replicas needed right now: ceil(demand / (concurrency x target)), clamped."""
    demand = counts.busy + counts.queued
    # Integer ceiling division with the percent kept whole, so there is no float rounding.
    needed = -(-demand * 100 // (spec.replica_max_concurrent_requests * spec.target_utilization))
    return _clamp(needed, spec)


def decide(
    spec: ScalingSpec,
    counts: Counts,
    *,
    current: int,
    window: ScaleDownWindow,
    now: float,
    history: DemandHistory | None = None,
) -> tuple[Decision, ScaleDownWindow]:
    """Decide the replica count for one tick; returns the decision and the window to keep.

    ``current`` is the count the service is scaled to now (what the actuator last set), which
    may be more than ``counts.replicas`` while new replicas start. ``history`` is the demand
    policy's, with ``counts`` already observed at ``now`` (the azureml policy ignores it).
    """
    used = utilization(spec, counts)
    if not spec.autoscale_enabled:
        assert spec.num_replicas is not None  # checked by ScalingSpec
        return Decision(spec.num_replicas, used, Reason.FIXED), ScaleDownWindow()

    rate: float | None = None
    service_time: float | None = None
    if spec.policy is Policy.DEMAND:
        wanted, rate, service_time = demand_estimate(
            spec, counts, history or DemandHistory(), now)
    else:
        wanted = recommend(spec, counts)
    if not window.recent:
        # No memory yet (start-up, new service, autoscaling just turned on): count the current
        # replicas as wanted now, so that a restart does not look like a drop in demand.
        window = ScaleDownWindow((Recommendation(now, current),))
    window = window.record(Recommendation(now, wanted), window_s=spec.scale_down_window_s)
    if wanted > current:
        return Decision(wanted, used, Reason.SCALE_UP, rate, service_time), window

    highest = window.highest()
    assert highest is not None  # ``wanted`` was just recorded
    # Clamped again so that a lowered max_replicas (config reload) applies at once.
    desired = _clamp(min(current, highest), spec)
    if desired < current:
        reason = Reason.SCALE_DOWN
    elif wanted < current:
        reason = Reason.HELD
    else:
        reason = Reason.STEADY
    return Decision(desired, used, reason, rate, service_time), window


def _clamp(replicas: int, spec: ScalingSpec) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, replicas))
