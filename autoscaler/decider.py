"""How many replicas a service should have: a pure function of its settings, load and ``now``.

azureml-fe's rule (README, Scaling): utilization = (busy + queued) / (replicas x concurrency), and
desired = ceil(replicas x utilization / target), clamped to [min, max]. The replica count cancels
out, so the decider computes ``ceil(demand / (concurrency x target))`` in integers: that is exact
(21 busy at 70 % needs 30 replicas, where float division says 30.000000000000004 -> 31) and it
works when there are no replicas at all.

Scaling up is applied at once. Scaling down is conservative: never below the highest
recommendation seen during the last ``scale_down_window_s`` seconds, so only a drop that lasts the
whole window removes replicas, and a short lull does not. That memory is a
:class:`ScaleDownWindow` value which the caller keeps and passes back in; nothing here reads a
clock or mutates state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mlfe.stats import ServiceStats

# The decider's input: a service's counts as the router reports them (mlfe/stats.py).
Counts = ServiceStats


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
        recent = (*self.recent, rec)
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


def recommend(spec: ScalingSpec, counts: Counts) -> int:
    """Replicas needed right now: ceil(demand / (concurrency x target)), clamped."""
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
) -> tuple[Decision, ScaleDownWindow]:
    """Decide the replica count for one tick; returns the decision and the window to keep.

    ``current`` is the count the service is scaled to now (what the actuator last set), which
    may be more than ``counts.replicas`` while new replicas start.
    """
    used = utilization(spec, counts)
    if not spec.autoscale_enabled:
        assert spec.num_replicas is not None  # checked by ScalingSpec
        return Decision(spec.num_replicas, used, Reason.FIXED), ScaleDownWindow()

    wanted = recommend(spec, counts)
    if not window.recent:
        # No memory yet (start-up, new service, autoscaling just turned on): count the current
        # replicas as wanted now, so that a restart does not look like a drop in demand.
        window = ScaleDownWindow((Recommendation(now, current),))
    window = window.record(Recommendation(now, wanted), window_s=spec.scale_down_window_s)
    if wanted > current:
        return Decision(wanted, used, Reason.SCALE_UP), window

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
    return Decision(desired, used, reason), window


def _clamp(replicas: int, spec: ScalingSpec) -> int:
    return max(spec.min_replicas, min(spec.max_replicas, replicas))
