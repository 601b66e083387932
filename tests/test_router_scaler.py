"""The router self-scaler: up then out on slow routing, down then in on idle CPU, its probe,
and its loop on a fake clock."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from autoscaler.router_decider import (
    RouterDecision,
    RouterReason,
    RouterSample,
    RouterScalerState,
    RouterScalingSpec,
    decide,
    is_idle,
    is_slow,
)
from autoscaler.router_loop import DeltaProbe, DeploymentPods, RouterScaler
from mlfe.clock import FakeClock
from tests.late_clock import LateClock

UP = RouterReason.SCALE_UP
OUT = RouterReason.SCALE_OUT
DOWN = RouterReason.SCALE_DOWN
IN = RouterReason.SCALE_IN

PERIOD = 5.0


@dataclass(frozen=True)
class Signal:
    """What one period looks like: mean routing time, requests, CPU fraction."""

    routing_s: float
    requests: int
    cpu: float


SLOW = Signal(routing_s=0.005, requests=500, cpu=0.95)  # busy and slow: wants more
BUSY = Signal(routing_s=0.0003, requests=500, cpu=0.6)  # fine as it is
IDLE = Signal(routing_s=0.0002, requests=20, cpu=0.05)  # wants fewer
NO_TRAFFIC = Signal(routing_s=0.0, requests=0, cpu=0.01)


def sample(at: float, signal: Signal, workers: int = 1, pods: int = 1) -> RouterSample:
    return RouterSample(at, signal.routing_s, signal.requests, signal.cpu, workers, pods)


@dataclass(frozen=True)
class Tick:
    at: float
    workers: int  # the counts the sample showed
    pods: int
    decision: RouterDecision

    @property
    def changed(self) -> bool:
        return (self.decision.workers, self.decision.pods) != (self.workers, self.pods)


Model = Callable[[float, int, int], Signal]  # (time, workers, pods) -> what the period looked like


def simulate(
    spec: RouterScalingSpec,
    model: Model | Signal,
    *,
    until: float,
    workers: int = 1,
    pods: int = 1,
    apply: bool = True,
) -> list[Tick]:
    """One decision every PERIOD from 0 to ``until``; decisions are applied at once unless
    ``apply`` is False (an actuator that never gets there)."""
    signal_at: Model = model if callable(model) else (lambda _t, _w, _p: model)
    state = RouterScalerState()
    ticks: list[Tick] = []
    for i in range(int(until / PERIOD) + 1):
        at = i * PERIOD
        decision, state = decide(
            spec, sample(at, signal_at(at, workers, pods), workers, pods), state=state, now=at
        )
        ticks.append(Tick(at, workers, pods, decision))
        if apply:
            workers, pods = decision.workers, decision.pods
    return ticks


def changes(ticks: list[Tick]) -> list[tuple[float, int, int, RouterReason]]:
    return [
        (t.at, t.decision.workers, t.decision.pods, t.decision.reason) for t in ticks if t.changed
    ]


def square(first: Signal, second: Signal, half_period: float) -> Model:
    return lambda t, _w, _p: first if (t // half_period) % 2 == 0 else second


SPEC = RouterScalingSpec(max_workers=4)  # up 10 s, down 300 s, cooldown 30 s, pods unmanaged
PODS = RouterScalingSpec(max_workers=2, max_pods=3)  # pods cooldown 120 s


# --- spec and sample ---------------------------------------------------------------------------


def test_defaults() -> None:
    spec = RouterScalingSpec(max_workers=8)
    assert spec.enabled
    assert (spec.min_workers, spec.min_pods, spec.max_pods) == (1, 1, 1)
    assert not spec.manages_pods
    assert (spec.routing_time_up_s, spec.up_window_s) == (0.002, 10.0)
    assert (spec.cpu_down_threshold, spec.down_window_s, spec.cooldown_s) == (0.3, 300.0, 30.0)
    assert RouterScalingSpec(max_workers=1, max_pods=2).manages_pods


@pytest.mark.parametrize(
    "settings",
    [
        {"max_workers": 0},
        {"max_workers": 2, "min_workers": 3},
        {"max_workers": 2, "min_workers": 0},
        {"max_workers": 2, "min_pods": 0},
        {"max_workers": 2, "min_pods": 3, "max_pods": 2},
        {"max_workers": 2, "routing_time_up_s": 0},
        {"max_workers": 2, "routing_time_up_s": math.inf},
        {"max_workers": 2, "min_requests": -1},
        {"max_workers": 2, "cpu_down_threshold": 0},
        {"max_workers": 2, "cpu_down_threshold": 1},
        {"max_workers": 2, "up_window_s": -1},
        {"max_workers": 2, "down_window_s": math.inf},
        {"max_workers": 2, "cooldown_s": -1},
        {"max_workers": 2, "pod_cooldown_s": math.nan},
        {"max_workers": 2, "period_s": 0},
    ],
)
def test_invalid_spec(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RouterScalingSpec(**settings)


@pytest.mark.parametrize(
    "fields",
    [
        (math.nan, 0.001, 1, 0.5, 1, 1),
        (0.0, -0.001, 1, 0.5, 1, 1),
        (0.0, math.inf, 1, 0.5, 1, 1),
        (0.0, 0.001, -1, 0.5, 1, 1),
        (0.0, 0.001, 1, -0.1, 1, 1),
        (0.0, 0.001, 1, 0.5, 0, 1),
        (0.0, 0.001, 1, 0.5, 1, 0),
    ],
)
def test_invalid_sample(fields: tuple[float, float, int, float, int, int]) -> None:
    with pytest.raises(ValueError):
        RouterSample(*fields)


@pytest.mark.parametrize(
    ("signal", "slow", "idle"),
    [
        (SLOW, True, False),
        (BUSY, False, False),
        (IDLE, False, True),
        (NO_TRAFFIC, False, True),
        # Slow routing on idle CPU is not a CPU shortage: neither, so nothing scales.
        (Signal(routing_s=0.005, requests=500, cpu=0.1), False, False),
        # Exactly at the thresholds: not above the routing one, not below the CPU one.
        (Signal(routing_s=0.002, requests=500, cpu=0.9), False, False),
        (Signal(routing_s=0.0001, requests=500, cpu=0.3), False, False),
        # A mean routing time without requests means nothing.
        (Signal(routing_s=0.005, requests=0, cpu=0.9), False, False),
    ],
)
def test_slow_and_idle_periods(signal: Signal, slow: bool, idle: bool) -> None:
    s = sample(0.0, signal)
    assert (is_slow(SPEC, s), is_idle(SPEC, s)) == (slow, idle)


# --- up and out ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # The first slow sample (t=0) covers the period before it, so the window is over at 10;
        # each change restarts the window, and the 30 s cooldown paces the next steps.
        (SPEC, [(10, 2, 1, UP), (40, 3, 1, UP), (70, 4, 1, UP)]),
        (
            RouterScalingSpec(max_workers=4, up_window_s=20),
            [(20, 2, 1, UP), (50, 3, 1, UP), (80, 4, 1, UP)],
        ),
        # No cooldown: a new window after each change (first sample 5 s after it).
        (
            RouterScalingSpec(max_workers=4, cooldown_s=0),
            [(10, 2, 1, UP), (25, 3, 1, UP), (40, 4, 1, UP)],
        ),
        (
            RouterScalingSpec(max_workers=4, up_window_s=0, cooldown_s=0),
            [(0, 2, 1, UP), (5, 3, 1, UP), (10, 4, 1, UP)],
        ),
        # At max workers, routing still slow for another window: out, paced by pod_cooldown_s.
        (PODS, [(10, 2, 1, UP), (40, 2, 2, OUT), (160, 2, 3, OUT)]),
        (
            RouterScalingSpec(max_workers=1, max_pods=3, pod_cooldown_s=0),
            [(10, 1, 2, OUT), (40, 1, 3, OUT)],
        ),
    ],
    ids=["default", "window-20s", "no-cooldown", "no-window", "then-out", "only-out"],
)
def test_slow_routing_scales_up_then_out(
    spec: RouterScalingSpec, expected: list[tuple[float, int, int, RouterReason]]
) -> None:
    ticks = simulate(spec, SLOW, until=600)
    assert changes(ticks) == expected
    # Never before the window is over, and at the maximum it says so instead of asking more.
    assert all(t.decision.reason != UP for t in ticks if t.at < spec.up_window_s)
    assert ticks[-1].decision.reason is RouterReason.AT_MAX


def test_scale_out_needs_a_whole_window_at_max_workers() -> None:
    # Slow only until just after workers reached their maximum: no pod is added.
    ticks = simulate(PODS, lambda t, _w, _p: SLOW if t <= 35 else BUSY, until=600)
    assert changes(ticks) == [(10, 2, 1, UP)]


@pytest.mark.parametrize(
    ("requests_per_period", "scales"),
    [(0, False), (10, False), (49, False), (50, True), (500, True)],
)
def test_too_few_requests_do_not_scale_up(requests_per_period: int, scales: bool) -> None:
    # The 10 s window holds two periods' requests; 100 are needed.
    slow = Signal(routing_s=0.005, requests=requests_per_period, cpu=0.95)
    ticks = simulate(SPEC, slow, until=60)
    assert (changes(ticks)[:1] == [(10, 2, 1, UP)]) is scales
    if not scales:
        assert changes(ticks) == []


def test_min_requests_is_configurable() -> None:
    few = Signal(routing_s=0.005, requests=1, cpu=0.95)
    spec = RouterScalingSpec(max_workers=2, min_requests=0)
    assert changes(simulate(spec, few, until=60)) == [(10, 2, 1, UP)]


def test_slow_routing_on_idle_cpu_scales_nothing() -> None:
    odd = Signal(routing_s=0.01, requests=5000, cpu=0.1)
    ticks = simulate(PODS, odd, until=3600, workers=2, pods=2)
    assert changes(ticks) == []


# --- down and in ---------------------------------------------------------------------------


def test_idle_cpu_scales_down_then_in_one_step_per_window() -> None:
    spec = RouterScalingSpec(max_workers=4, max_pods=3)
    ticks = simulate(spec, IDLE, until=2400, workers=4, pods=3)
    # Workers first, then pods; each step needs a whole window from the first sample after the
    # last change (5 s later), so they come every 305 s.
    assert changes(ticks) == [
        (300, 3, 3, DOWN),
        (605, 2, 3, DOWN),
        (910, 1, 3, DOWN),
        (1215, 1, 2, IN),
        (1520, 1, 1, IN),
    ]
    assert ticks[-1].decision == RouterDecision(1, 1, RouterReason.STEADY)


def test_no_scale_down_before_the_window() -> None:
    ticks = simulate(SPEC, IDLE, until=295, workers=3)
    assert changes(ticks) == []
    ticks = simulate(SPEC, IDLE, until=300, workers=3)
    assert changes(ticks) == [(300, 2, 1, DOWN)]


def test_down_window_is_configurable() -> None:
    spec = RouterScalingSpec(max_workers=4, down_window_s=60, cooldown_s=0)
    assert changes(simulate(spec, NO_TRAFFIC, until=200, workers=3)) == [
        (60, 2, 1, DOWN),
        (125, 1, 1, DOWN),
    ]


def test_a_busy_period_restarts_the_down_window() -> None:
    # Idle again from the sample at 205: a whole window from there.
    model: Model = lambda t, _w, _p: BUSY if t == 200 else IDLE  # noqa: E731
    assert changes(simulate(SPEC, model, until=600, workers=2)) == [(505, 1, 1, DOWN)]


def test_pods_are_left_alone_unless_managed() -> None:
    # max_pods 1 (the default): a Deployment with 3 replicas stays at 3, idle or slow.
    assert changes(simulate(SPEC, IDLE, until=2000, workers=1, pods=3)) == []
    slow = simulate(RouterScalingSpec(max_workers=1), SLOW, until=200, pods=3)
    assert changes(slow) == []
    assert slow[-1].decision == RouterDecision(1, 3, RouterReason.AT_MAX)


# --- cooldown, bounds, disabled ------------------------------------------------------------


def test_cooldown_holds_after_a_change() -> None:
    spec = RouterScalingSpec(max_workers=4, cooldown_s=60)
    ticks = simulate(spec, SLOW, until=100)
    assert changes(ticks)[:2] == [(10, 2, 1, UP), (70, 3, 1, UP)]
    held = [t.decision.reason for t in ticks if 10 < t.at < 70]
    assert held == [RouterReason.COOLDOWN] * len(held)


def test_cooldown_after_scale_up_does_not_delay_a_later_scale_down_more_than_its_window() -> None:
    model: Model = lambda t, _w, _p: SLOW if t <= 10 else IDLE  # noqa: E731
    assert changes(simulate(SPEC, model, until=400)) == [(10, 2, 1, UP), (315, 1, 1, DOWN)]


def test_during_cooldown_the_decision_repeats_the_target_until_it_is_applied() -> None:
    # An actuator that never applies anything: the loop is asked for 2 workers every period of
    # the cooldown (a retry), then the decider looks again at what is there.
    ticks = simulate(SPEC, SLOW, until=45, apply=False)
    assert [(t.at, t.decision.workers, t.decision.reason) for t in ticks] == [
        (0, 1, RouterReason.STEADY),
        (5, 1, RouterReason.STEADY),
        (10, 2, UP),
        *[(at, 2, RouterReason.COOLDOWN) for at in (15, 20, 25, 30, 35)],
        (40, 2, UP),
        (45, 2, RouterReason.COOLDOWN),
    ]


def test_target_is_dropped_once_the_counts_change() -> None:
    state = RouterScalerState()
    d, state = decide(SPEC, sample(0, SLOW), state=state, now=0)
    d, state = decide(SPEC, sample(5, SLOW), state=state, now=5)
    d, state = decide(SPEC, sample(10, SLOW), state=state, now=10)
    assert (d.workers, d.reason, state.target) == (2, UP, (2, 1))
    d, state = decide(SPEC, sample(15, SLOW, workers=1), state=state, now=15)
    assert (d.workers, state.target) == (2, (2, 1))
    # Someone else set 3: that is adopted, not fought.
    d, state = decide(SPEC, sample(20, SLOW, workers=3), state=state, now=20)
    assert (d.workers, d.reason, state.target) == (3, RouterReason.COOLDOWN, None)


@pytest.mark.parametrize(
    ("spec", "workers", "pods", "expected"),
    [
        (SPEC, 6, 1, (4, 1)),  # fewer cores than workers (a lower CPU limit)
        (RouterScalingSpec(max_workers=4, min_workers=2), 1, 1, (2, 1)),
        (PODS, 2, 5, (2, 3)),
        (RouterScalingSpec(max_workers=2, min_pods=2, max_pods=3), 1, 1, (1, 2)),
        (RouterScalingSpec(max_workers=2, min_workers=2, min_pods=2, max_pods=2), 5, 5, (2, 2)),
    ],
)
def test_bounds_apply_at_once(
    spec: RouterScalingSpec, workers: int, pods: int, expected: tuple[int, int]
) -> None:
    d, _ = decide(spec, sample(0, BUSY, workers, pods), state=RouterScalerState(), now=0)
    assert (d.workers, d.pods, d.reason) == (*expected, RouterReason.BOUNDS)


def test_bounds_apply_during_cooldown() -> None:
    state = RouterScalerState()
    for at in (0, 5, 10):
        d, state = decide(SPEC, sample(at, SLOW), state=state, now=at)
    assert d.reason is UP
    lower = RouterScalingSpec(max_workers=1)  # config reload
    d, state = decide(lower, sample(15, SLOW, workers=2), state=state, now=15)
    assert (d.workers, d.reason) == (1, RouterReason.BOUNDS)


@pytest.mark.parametrize("signal", [SLOW, IDLE], ids=["slow", "idle"])
def test_counts_stay_within_bounds(signal: Signal) -> None:
    spec = RouterScalingSpec(
        max_workers=3, min_workers=2, min_pods=2, max_pods=4, cooldown_s=0, pod_cooldown_s=0
    )
    for t in simulate(spec, signal, until=5000, workers=2, pods=2):
        assert 2 <= t.decision.workers <= 3
        assert 2 <= t.decision.pods <= 4


@pytest.mark.parametrize("signal", [SLOW, IDLE, BUSY], ids=["slow", "idle", "busy"])
def test_disabled_holds_the_current_counts(signal: Signal) -> None:
    spec = RouterScalingSpec(max_workers=2, max_pods=3, enabled=False)  # DevTest
    ticks = simulate(spec, signal, until=2000, workers=5, pods=4)  # even outside the bounds
    assert changes(ticks) == []
    assert {t.decision.reason for t in ticks} == {RouterReason.DISABLED}


def test_disabled_forgets_its_memory() -> None:
    state = RouterScalerState()
    for at in (0, 5):
        _, state = decide(SPEC, sample(at, SLOW), state=state, now=at)
    off = RouterScalingSpec(max_workers=4, enabled=False)
    _, state = decide(off, sample(10, SLOW), state=state, now=10)
    assert state == RouterScalerState()
    # Enabled again: a whole window from here.
    d, state = decide(SPEC, sample(15, SLOW), state=state, now=15)
    d, state = decide(SPEC, sample(20, SLOW), state=state, now=20)
    assert d.reason is RouterReason.STEADY
    d, state = decide(SPEC, sample(25, SLOW), state=state, now=25)
    assert d.reason is UP


# --- no flapping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "half_period"),
    [
        (SLOW, BUSY, 5),
        (SLOW, BUSY, 10),  # two slow samples: 10 s, but the first covers the period before it
        (SLOW, IDLE, 5),
        (SLOW, IDLE, 10),
        (IDLE, BUSY, 150),
        (IDLE, BUSY, 295),
        (IDLE, BUSY, 300),  # 60 idle samples: 300 s, but the first covers the period before it
        (IDLE, SLOW, 5),
    ],
)
def test_square_wave_shorter_than_the_windows_never_scales(
    first: Signal, second: Signal, half_period: float
) -> None:
    spec = RouterScalingSpec(max_workers=4, max_pods=3)
    ticks = simulate(spec, square(first, second, half_period), until=7200, workers=2, pods=2)
    assert changes(ticks) == []


def test_load_that_fits_after_scaling_up_stays_put() -> None:
    # A router with 1.5 cores of work: slow on one worker (150 % CPU), fine on two (75 %).
    def model(_t: float, workers: int, pods: int) -> Signal:
        cpu = 1.5 / (workers * pods)
        return Signal(routing_s=0.01 if cpu > 0.9 else 0.0003, requests=1000, cpu=cpu)

    assert changes(simulate(SPEC, model, until=7200)) == [(10, 2, 1, UP)]


def test_load_ramp_up_then_down_moves_each_way_once() -> None:
    # 4 cores of work for 10 minutes (slow on up to 3 workers in one pod, fine on 2 x 3 at 67 %),
    # then 0.2 cores: back down to 1 worker a pod, then in to 1 pod (20 %).
    def model(t: float, workers: int, pods: int) -> Signal:
        load = 4.0 if t < 600 else 0.2
        cpu = load / (workers * pods)
        return Signal(routing_s=0.01 if cpu > 0.9 else 0.0003, requests=1000, cpu=cpu)

    spec = RouterScalingSpec(max_workers=3, max_pods=2)
    ticks = changes(simulate(spec, model, until=4000))
    ups = [c for c in ticks if c[3] in (UP, OUT)]
    downs = [c for c in ticks if c[3] in (DOWN, IN)]
    assert ticks == ups + downs  # every step up comes before every step down
    assert [c[1:3] for c in ups] == [(2, 1), (3, 1), (3, 2)]
    assert [c[1:3] for c in downs] == [(2, 2), (1, 2), (1, 1)]
    assert all(c[0] >= 600 + 300 for c in downs)


# --- the run's edges -----------------------------------------------------------------------


def test_missing_samples_break_a_run() -> None:
    state = RouterScalerState()
    reasons = []
    for at in (0, 5, 20, 25, 30):  # two samples missing (10, 15): more than 2.5 periods
        d, state = decide(SPEC, sample(at, SLOW), state=state, now=at)
        reasons.append(d.reason)
    assert reasons == [RouterReason.STEADY] * 4 + [UP]


def test_one_missing_sample_does_not_break_a_run() -> None:
    state = RouterScalerState()
    for at in (0, 10):
        d, state = decide(SPEC, sample(at, SLOW), state=state, now=at)
    assert d.reason is UP


def test_a_change_seen_in_the_samples_restarts_the_windows() -> None:
    state = RouterScalerState()
    d, state = decide(SPEC, sample(0, SLOW, workers=1), state=state, now=0)
    d, state = decide(SPEC, sample(5, SLOW, workers=2), state=state, now=5)  # set elsewhere
    d, state = decide(SPEC, sample(10, SLOW, workers=2), state=state, now=10)
    assert d.reason is RouterReason.STEADY
    d, state = decide(SPEC, sample(15, SLOW, workers=2), state=state, now=15)
    assert (d.workers, d.reason) == (3, UP)


def test_history_is_trimmed_to_the_longest_window() -> None:
    state = RouterScalerState()
    for i in range(1000):
        _, state = decide(SPEC, sample(i * PERIOD, BUSY), state=state, now=i * PERIOD)
    assert len(state.samples) == 300 / PERIOD + 1


def test_time_going_backwards_is_an_error() -> None:
    _, state = decide(SPEC, sample(10, BUSY), state=RouterScalerState(), now=10)
    with pytest.raises(ValueError, match="backwards"):
        decide(SPEC, sample(5, BUSY), state=state, now=10)


# --- the probe -----------------------------------------------------------------------------


@dataclass
class Counters:
    routing_sum: float = 0.0
    routing_count: int = 0
    cpu: float = 0.0
    workers: int = 2
    pods: int = 3

    def probe(self) -> DeltaProbe:
        return DeltaProbe(
            routing=lambda: (self.routing_sum, self.routing_count),
            cpu_seconds=lambda: self.cpu,
            workers=lambda: self.workers,
            pods=lambda: self.pods,
        )


def test_delta_probe_reports_each_period() -> None:
    c = Counters(routing_sum=10.0, routing_count=1000, cpu=100.0)
    probe = c.probe()
    assert probe.sample(0.0) is None  # the baseline
    c.routing_sum += 0.6  # 200 requests at 3 ms
    c.routing_count += 200
    c.cpu += 4.0  # 4 CPU seconds in 5 s on 2 workers
    s = probe.sample(5.0)
    assert s is not None
    assert (s.at, s.requests, s.cpu_fraction, s.workers, s.pods) == (5.0, 200, 0.4, 2, 3)
    assert s.routing_time_s == pytest.approx(0.003)
    assert probe.sample(10.0) == RouterSample(10.0, 0.0, 0, 0.0, 2, 3)  # a quiet period


def test_delta_probe_survives_counters_going_back() -> None:
    c = Counters(routing_sum=10.0, routing_count=1000)
    probe = c.probe()
    probe.sample(0.0)
    c.routing_sum, c.routing_count = 1.0, 100  # a service was removed with its histogram
    s = probe.sample(5.0)
    assert s is not None and (s.requests, s.routing_time_s) == (0, 0.0)
    c.routing_sum, c.routing_count = 1.2, 200
    s = probe.sample(10.0)
    assert s is not None and s.requests == 100
    assert s.routing_time_s == pytest.approx(0.002)
    assert probe.sample(10.0) is None  # no time passed


def test_delta_probe_defaults_to_one_pod() -> None:
    probe = DeltaProbe(routing=lambda: (0.0, 0), cpu_seconds=lambda: 0.0, workers=lambda: 1)
    probe.sample(0.0)
    s = probe.sample(1.0)
    assert s is not None and s.pods == 1


# --- the loop ------------------------------------------------------------------------------


# Every test here must leave no task running (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


@dataclass
class FakeRouter:
    """Probe, worker actuator and pod actuator in one: changes apply at once."""

    clock: FakeClock
    signal: Signal = BUSY
    workers: int = 1
    pods: int = 1
    leader: bool = True
    broken: bool = False
    silent: bool = False  # the probe has nothing to report
    worker_failures_left: int = 0
    pod_failures_left: int = 0
    worker_calls: list[tuple[float, int]] = field(default_factory=list)
    pod_calls: list[tuple[float, int]] = field(default_factory=list)
    sampled: list[tuple[float, float]] = field(default_factory=list)  # (now given, clock time)
    block: asyncio.Event | None = None  # when set, set_workers() waits for it

    def sample(self, now: float) -> RouterSample | None:
        self.sampled.append((now, self.clock.now()))
        if self.broken:
            raise RuntimeError("metrics unavailable")
        if self.silent:
            return None
        return sample(now, self.signal, self.workers, self.pods)

    async def set_workers(self, n: int) -> None:
        self.worker_calls.append((self.clock.now(), n))
        if self.block is not None:
            await self.block.wait()
        if self.worker_failures_left:
            self.worker_failures_left -= 1
            raise OSError("cannot fork")
        self.workers = n

    def may_scale(self) -> bool:
        return self.leader

    async def set_pods(self, n: int) -> None:
        self.pod_calls.append((self.clock.now(), n))
        if self.pod_failures_left:
            self.pod_failures_left -= 1
            raise ConnectionError("cluster unreachable")
        self.pods = n


@dataclass
class Harness:
    clock: FakeClock
    router: FakeRouter
    scaler: RouterScaler


Make = Callable[[RouterScalingSpec], Harness]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    made: list[RouterScaler] = []

    def build(spec: RouterScalingSpec) -> Harness:
        clock = FakeClock()
        router = FakeRouter(clock)
        scaler = RouterScaler(spec=spec, probe=router, workers=router, pods=router, clock=clock)
        made.append(scaler)
        return Harness(clock, router, scaler)

    yield build
    for scaler in made:
        await scaler.stop()


@pytest.fixture
def harness(make: Make) -> Harness:
    return make(PODS)


async def test_loop_scales_up_then_out(harness: Harness) -> None:
    harness.router.signal = SLOW
    harness.scaler.start()
    await harness.clock.advance_and_settle(9)
    assert harness.router.worker_calls == []
    await harness.clock.advance_and_settle(1)
    assert harness.router.worker_calls == [(10, 2)]
    await harness.clock.advance_and_settle(30)
    assert harness.router.pod_calls == [(40, 2)]
    await harness.clock.advance_and_settle(120)
    assert harness.router.pod_calls == [(40, 2), (160, 3)]
    status = harness.scaler.status()
    assert status is not None
    assert (status.at, status.decision.reason) == (160, OUT)


async def test_loop_scales_down_and_in(harness: Harness) -> None:
    harness.router.signal = IDLE
    harness.router.workers, harness.router.pods = 2, 2
    harness.scaler.start()
    await harness.clock.advance_and_settle(299)
    assert (harness.router.worker_calls, harness.router.pod_calls) == ([], [])
    await harness.clock.advance_and_settle(1)
    assert harness.router.worker_calls == [(300, 1)]
    await harness.clock.advance_and_settle(305)
    assert harness.router.pod_calls == [(605, 1)]


async def test_only_the_leader_scales_pods(harness: Harness) -> None:
    harness.router.leader = False
    harness.router.signal = SLOW
    harness.scaler.start()
    await harness.clock.advance_and_settle(300)
    assert harness.router.worker_calls == [(10, 2)]
    assert harness.router.pod_calls == []
    status = harness.scaler.status()
    assert status is not None and status.decision.reason is RouterReason.AT_MAX

    # Took the lease: routing has been slow at max workers for longer than a window already.
    harness.router.leader = True
    await harness.clock.advance_and_settle(5)
    assert harness.router.pod_calls == [(305, 2)]


async def test_without_a_pod_actuator_pods_are_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    router = FakeRouter(clock, signal=SLOW, pods=5)
    with caplog.at_level(logging.WARNING):
        scaler = RouterScaler(spec=PODS, probe=router, workers=router, clock=clock)
    assert "no pod actuator" in caplog.text
    scaler.start()
    await clock.advance_and_settle(300)
    await scaler.stop()
    assert router.worker_calls == [(10, 2)]
    assert router.pod_calls == []
    status = scaler.status()
    assert status is not None and status.decision == RouterDecision(2, 5, RouterReason.AT_MAX)


async def test_a_failed_set_is_retried_next_period(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.router.signal = SLOW
    harness.router.worker_failures_left = 2
    harness.scaler.start()
    await harness.clock.advance_and_settle(30)
    assert harness.router.worker_calls == [(10, 2), (15, 2), (20, 2)]
    assert harness.router.workers == 2
    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 2
    assert "retrying next period" in failures[0].getMessage()


async def test_a_failed_pod_set_is_retried_next_period(harness: Harness) -> None:
    harness.router.signal = SLOW
    harness.router.workers = 2  # at max already
    harness.router.pod_failures_left = 1
    harness.scaler.start()
    await harness.clock.advance_and_settle(20)
    assert harness.router.pod_calls == [(10, 2), (15, 2)]
    assert harness.router.pods == 2


async def test_a_failed_sample_skips_the_tick(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.router.broken = True
    harness.scaler.start()
    await harness.clock.advance_and_settle(20)
    assert harness.scaler.status() is None
    # Five failed ticks, one concise warning (no traceback): an episode is said once.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    harness.router.broken = False
    await harness.clock.advance_and_settle(5)
    status = harness.scaler.status()
    assert status is not None and status.at == 25
    harness.router.broken = True  # a new episode is said again
    await harness.clock.advance_and_settle(5)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert harness.scaler._supervisor.failures == []  # the loop itself never died


async def test_no_sample_no_decision(harness: Harness) -> None:
    harness.router.silent = True
    harness.router.signal = SLOW
    harness.scaler.start()
    await harness.clock.advance_and_settle(100)
    assert harness.scaler.status() is None
    assert harness.router.worker_calls == []


async def test_disabled_loop_never_scales(make: Make) -> None:
    harness = make(RouterScalingSpec(max_workers=4, max_pods=3, enabled=False))
    harness.router.signal = SLOW
    harness.scaler.start()
    await harness.clock.advance_and_settle(1000)
    assert (harness.router.worker_calls, harness.router.pod_calls) == ([], [])
    status = harness.scaler.status()
    assert status is not None and status.decision.reason is RouterReason.DISABLED

    # Config reload: enabled from the next tick on.
    harness.scaler.set_spec(PODS)
    assert harness.scaler.spec is PODS
    await harness.clock.advance_and_settle(15)
    assert harness.router.worker_calls == [(1015, 2)]


async def test_loop_period_comes_from_the_spec(make: Make) -> None:
    harness = make(RouterScalingSpec(max_workers=4, period_s=1.0))
    harness.scaler.start()
    await harness.clock.advance_and_settle(0)
    first = harness.scaler.status()
    await harness.clock.advance_and_settle(1)
    second = harness.scaler.status()
    assert first is not None and second is not None
    assert (first.at, second.at) == (0, 1)


async def test_loop_now_is_the_scheduled_tick_time() -> None:
    clock = LateClock(late=0.25)  # every wake-up comes a quarter second late
    router = FakeRouter(clock, signal=SLOW)
    scaler = RouterScaler(spec=SPEC, probe=router, workers=router, clock=clock)
    scaler.start()
    await clock.advance_and_settle(10.5)
    await scaler.stop()
    assert router.sampled == [(0, 0), (5, 5.25), (10, 10.25)]
    status = scaler.status()
    assert status is not None and (status.at, status.decision.reason) == (10, UP)


async def test_a_slow_tick_is_followed_at_once_not_by_a_burst(harness: Harness) -> None:
    harness.router.signal = SLOW
    harness.router.block = asyncio.Event()
    harness.scaler.start()
    await harness.clock.advance_and_settle(27)  # the set at 10 hangs for 17 s
    assert [now for now, _ in harness.router.sampled] == [0, 5, 10]
    assert harness.router.worker_calls == [(10, 2)]

    harness.router.block.set()
    await harness.clock.advance_and_settle(5)
    assert [now for now, _ in harness.router.sampled] == [0, 5, 10, 27, 32]


async def test_start_twice_is_an_error(harness: Harness) -> None:
    harness.scaler.start()
    with pytest.raises(RuntimeError, match="already started"):
        harness.scaler.start()


async def test_stop_ends_the_loop(harness: Harness) -> None:
    harness.scaler.start()
    await harness.clock.advance_and_settle(5)
    await harness.scaler.stop()
    assert harness.clock.sleepers == 0


# --- the Kubernetes pod actuator adapter ---------------------------------------------------


@dataclass
class FakeDeployments:
    replicas: dict[str, int] = field(default_factory=dict)

    def current(self, service: str) -> int:
        return self.replicas[service]

    async def scale(self, service: str, desired: int) -> None:
        self.replicas[service] = desired


async def test_deployment_pods_adapter() -> None:
    kube = FakeDeployments({"mlfe-router": 2})
    leader = [False]
    pods = DeploymentPods(kube, "mlfe-router", may_scale=lambda: leader[0])
    assert (pods.current(), pods.may_scale()) == (2, False)
    leader[0] = True
    assert pods.may_scale()
    await pods.set_pods(3)
    assert kube.replicas == {"mlfe-router": 3}
    assert DeploymentPods(kube, "mlfe-router").may_scale()
