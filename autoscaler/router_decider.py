"""The router's self-scaler's decider: azureml-fe's own scaling as a pure
function of the samples, the state the caller keeps and ``now``; its loop is
:mod:`autoscaler.router_loop`.

azureml-fe scales *up* (more cores) when the time it takes to route requests exceeds a threshold,
*out* (more pods) if routing stays slow, then *down* and *in* on CPU thresholds; it is off on
dev-test clusters. Here "more cores" is one more router worker process (up to the cores the pod
may use, ``deploy.cgroup.available_cores``) and "more pods" is one more replica of the router's own
Deployment, set through the Kubernetes actuator.

Signals, one :class:`RouterSample` per period (``period_s``, 5 s by default):

* **Routing time** is the router's own overhead per request: total time less queue wait and
  replica time (``mlfe_routing_duration_seconds``). The statistic is the **mean** over the
  period, from the deltas of that histogram's sum and count. The mean is exact (a p90 from
  ``ROUTING_BUCKETS`` only resolves to bucket edges, 2 ms then 5 ms), and a router short of CPU
  shows it as event-loop lag that every request pays, not only the tail.
* **CPU** is the CPU time all workers used over the period / (period x workers): 1.0 is every
  worker busy all the time.

Rules (``now`` is an argument, state is a value the caller keeps; nothing here reads a clock):

* A period is *slow* when it had requests, its mean routing time is above
  ``routing_time_up_s`` and CPU is at least ``cpu_down_threshold`` (more cores only help when the
  cores are in use: slow routing on idle CPU is not a CPU shortage). It is *idle* when CPU is
  below ``cpu_down_threshold`` and it is not slow. A period can be neither (slow routing on idle
  CPU); it breaks both runs, so the scaler holds.
* **Up, then out**: slow for the whole ``up_window_s`` with at least ``min_requests`` requests
  in the window -> one more worker; already at ``max_workers`` -> one more pod (``max_pods``).
  Because every change starts the evidence afresh, "out" needs routing to stay slow for another
  whole window *after* the workers reached their maximum.
* **Down, then in**: idle for the whole ``down_window_s`` -> one worker fewer; already at
  ``min_workers`` -> one pod fewer. Workers go first because a worker is the cheaper step to
  take back (no pod to drain, no connections to move between pods), mirroring up-then-out.
* One step at a time, and after each change ``cooldown_s`` (``pod_cooldown_s`` after a pod
  change, which also covers a new pod's start and its share of connections arriving) in which
  nothing changes; the windows restart after every change, including one seen in the samples
  (the counts moved), since evidence at the old counts says nothing about the new ones.
* Hysteresis: the up and down conditions are exclusive per period and each needs a full window
  of its own, so a signal that flips faster than the windows never scales; and removing one of
  n workers at CPU below 0.3 leaves the rest at most 0.3 x n / (n - 1) <= 0.6 busy.
* Bounds apply at once (a config change), cooldown or not. Pods are managed only when
  ``max_pods`` > 1: with the default of 1 the Deployment's replica count is left alone,
  whatever it is. Disabled (``cluster_purpose: DevTest``) holds the current counts.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

# Consecutive samples further apart than this many periods (two or more missed) break a run:
# what happened in between is unknown.
MAX_GAP_PERIODS = 2.5


@dataclass(frozen=True, slots=True)
class RouterScalingSpec:
    """The self-scaler's settings. ``max_workers`` is the cores available
    (``deploy.cgroup.available_cores``, or less); ``enabled`` is False when ``cluster_purpose``
    is DevTest."""

    max_workers: int
    enabled: bool = True
    min_workers: int = 1
    min_pods: int = 1
    max_pods: int = 1  # pods are managed only when > 1
    routing_time_up_s: float = 0.002  # mean routing time per request that counts as slow
    min_requests: int = 100  # requests in the up window for its routing time to count
    up_window_s: float = 10.0
    cpu_down_threshold: float = 0.3  # fraction of the current workers' total CPU
    down_window_s: float = 300.0
    cooldown_s: float = 30.0  # after any change
    pod_cooldown_s: float = 120.0  # after a change of pods (at least cooldown_s applies)
    period_s: float = 5.0  # how often the loop samples

    def __post_init__(self) -> None:
        # The config layer reports user errors by key; reaching here with bad values is a bug.
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"need 1 <= min_workers <= max_workers, "
                f"got min={self.min_workers} max={self.max_workers}"
            )
        if not 1 <= self.min_pods <= self.max_pods:
            raise ValueError(
                f"need 1 <= min_pods <= max_pods, got min={self.min_pods} max={self.max_pods}"
            )
        if not 0 < self.routing_time_up_s < math.inf:
            raise ValueError(f"routing_time_up_s must be > 0, got {self.routing_time_up_s}")
        if self.min_requests < 0:
            raise ValueError(f"min_requests must be >= 0, got {self.min_requests}")
        if not 0 < self.cpu_down_threshold < 1:
            raise ValueError(f"cpu_down_threshold must be in (0, 1), got {self.cpu_down_threshold}")
        for name in ("up_window_s", "down_window_s", "cooldown_s", "pod_cooldown_s"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 < self.period_s < math.inf:
            raise ValueError(f"period_s must be > 0, got {self.period_s}")

    @property
    def manages_pods(self) -> bool:
        return self.max_pods > 1


@dataclass(frozen=True, slots=True)
class RouterSample:
    """What the router did during one period, ending at ``at``."""

    at: float
    routing_time_s: float  # mean routing time per request in the period; 0.0 with no requests
    requests: int  # requests whose routing time was measured in the period
    cpu_fraction: float  # CPU used by all workers / (period x workers); may exceed 1 slightly
    workers: int  # workers asked for now (the worker actuator's count)
    pods: int  # the router Deployment's spec.replicas now (the pod actuator's count)

    def __post_init__(self) -> None:
        if not math.isfinite(self.at):
            raise ValueError(f"sample time must be finite, got {self.at}")
        if not 0 <= self.routing_time_s < math.inf or not 0 <= self.cpu_fraction < math.inf:
            raise ValueError(f"routing time and CPU must be finite and >= 0: {self}")
        if self.requests < 0 or self.workers < 1 or self.pods < 1:
            raise ValueError(f"need requests >= 0, workers >= 1 and pods >= 1: {self}")


class RouterReason(enum.StrEnum):
    SCALE_UP = "scale-up"  # one more worker
    SCALE_OUT = "scale-out"  # one more pod
    SCALE_DOWN = "scale-down"  # one worker fewer
    SCALE_IN = "scale-in"  # one pod fewer
    BOUNDS = "bounds"  # the counts were outside the configured bounds
    COOLDOWN = "cooldown"  # a change was made less than a cooldown ago
    AT_MAX = "at-max"  # routing is slow, but workers and pods are at their maximum
    STEADY = "steady"
    DISABLED = "disabled"  # DevTest: the self-scaler is off


@dataclass(frozen=True, slots=True)
class RouterDecision:
    workers: int
    pods: int
    reason: RouterReason


@dataclass(frozen=True, slots=True)
class RouterScalerState:
    """The decider's memory; the caller keeps it and passes it back in."""

    # Samples since the last change, oldest first, trimmed to what the longest window needs.
    samples: tuple[RouterSample, ...] = ()
    cooldown_until: float = -math.inf
    # (workers, pods) asked for by the last change, until the samples show a change of counts:
    # during the cooldown the decision repeats it, so a failed actuator call is retried.
    target: tuple[int, int] | None = None


def is_slow(spec: RouterScalingSpec, sample: RouterSample) -> bool:
    """Routing took longer than the threshold while the workers were busy."""
    return (
        sample.requests > 0
        and sample.routing_time_s > spec.routing_time_up_s
        and sample.cpu_fraction >= spec.cpu_down_threshold
    )


def is_idle(spec: RouterScalingSpec, sample: RouterSample) -> bool:
    """The workers used less CPU than the threshold, and routing was not slow."""
    return sample.cpu_fraction < spec.cpu_down_threshold and not (
        sample.requests > 0 and sample.routing_time_s > spec.routing_time_up_s
    )


def decide(
    spec: RouterScalingSpec,
    sample: RouterSample,
    *,
    state: RouterScalerState,
    now: float,
) -> tuple[RouterDecision, RouterScalerState]:
    """Decide the router's workers and pods for one period; returns the decision and the state
    to pass to the next call. The current counts are the sample's."""
    if state.samples and sample.at < state.samples[-1].at:
        raise ValueError(f"time went backwards: {sample.at} after {state.samples[-1].at}")
    current = (sample.workers, sample.pods)
    if not spec.enabled:
        return RouterDecision(*current, RouterReason.DISABLED), RouterScalerState()

    samples, target = state.samples, state.target
    if samples and (samples[-1].workers, samples[-1].pods) != current:
        # The counts changed (our change applied, or someone else's): start the evidence afresh.
        samples, target = (), None
    samples = _trim((*samples, sample), now - max(spec.up_window_s, spec.down_window_s))

    def change(
        workers: int, pods: int, reason: RouterReason
    ) -> tuple[RouterDecision, RouterScalerState]:
        cooldown = spec.cooldown_s
        if pods != sample.pods:
            cooldown = max(cooldown, spec.pod_cooldown_s)
        return RouterDecision(workers, pods, reason), RouterScalerState(
            cooldown_until=now + cooldown, target=(workers, pods)
        )

    def hold(reason: RouterReason) -> tuple[RouterDecision, RouterScalerState]:
        return RouterDecision(*current, reason), RouterScalerState(samples, state.cooldown_until)

    workers, pods = current
    bounded_workers = min(max(workers, spec.min_workers), spec.max_workers)
    bounded_pods = min(max(pods, spec.min_pods), spec.max_pods) if spec.manages_pods else pods
    if (bounded_workers, bounded_pods) != current:
        return change(bounded_workers, bounded_pods, RouterReason.BOUNDS)

    if now < state.cooldown_until:
        shown = target if target is not None else current
        return RouterDecision(*shown, RouterReason.COOLDOWN), RouterScalerState(
            samples, state.cooldown_until, target
        )

    gap = MAX_GAP_PERIODS * spec.period_s
    up_start = now - spec.up_window_s
    if _held(samples, lambda s: is_slow(spec, s), up_start, gap):
        in_window = [s for s in samples if s.at > up_start] or [samples[-1]]
        if sum(s.requests for s in in_window) >= spec.min_requests:
            if workers < spec.max_workers:
                return change(workers + 1, pods, RouterReason.SCALE_UP)
            if spec.manages_pods and pods < spec.max_pods:
                return change(workers, pods + 1, RouterReason.SCALE_OUT)
            return hold(RouterReason.AT_MAX)

    if _held(samples, lambda s: is_idle(spec, s), now - spec.down_window_s, gap):
        if workers > spec.min_workers:
            return change(workers - 1, pods, RouterReason.SCALE_DOWN)
        if spec.manages_pods and pods > spec.min_pods:
            return change(workers, pods - 1, RouterReason.SCALE_IN)
    return hold(RouterReason.STEADY)


def _trim(samples: tuple[RouterSample, ...], start: float) -> tuple[RouterSample, ...]:
    """Drop samples the longest window no longer needs: keep the latest one at or before
    ``start`` (it shows the condition held from the window's start) and everything after."""
    first = 0
    while first + 1 < len(samples) and samples[first + 1].at <= start:
        first += 1
    return samples[first:]


def _held(
    samples: tuple[RouterSample, ...],
    condition: Callable[[RouterSample], bool],
    start: float,
    max_gap: float,
) -> bool:
    """Whether every sample from one at or before ``start`` to the latest meets ``condition``,
    with no two consecutive ones more than ``max_gap`` apart.

    A condition first seen in the sample at T has held for a window W from T + W on: the
    sample covers the period before T, so this is never early, and at most a period late.
    """
    later: float | None = None
    for s in reversed(samples):
        if not condition(s) or (later is not None and later - s.at > max_gap):
            return False
        if s.at <= start:
            return True
        later = s.at
    return False
