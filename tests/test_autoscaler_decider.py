"""The replica decider: azureml-fe's formula, eager scale-up, the 60 s scale-down window."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from autoscaler.decider import (
    Counts,
    Decision,
    Policy,
    Reason,
    Recommendation,
    ScaleDownWindow,
    ScalingSpec,
    decide,
    recommend,
    utilization,
)

AZUREML = Policy.AZUREML  # the tests of azureml-fe's rule
# min 1, max 10, target 70 %, 1 request per replica, 60 s window
DEFAULT = ScalingSpec(policy=AZUREML)
WIDE = ScalingSpec(policy=AZUREML, min_replicas=1, max_replicas=100)


def load(busy: int, queued: int = 0, replicas: int = 1) -> Counts:
    return Counts(busy=busy, queued=queued, replicas=replicas)


@dataclass(frozen=True)
class Tick:
    at: float
    decision: Decision
    current: int  # replicas before this tick's decision was applied


def simulate(
    spec: ScalingSpec,
    busy_at: Callable[[float], int],
    *,
    until: float,
    period: float = 1.0,
    start: int = 1,
) -> Iterator[Tick]:
    """Tick every ``period`` seconds from 0 to ``until``, applying each decision at once."""
    current, window = start, ScaleDownWindow()
    for step in range(int(until / period) + 1):
        now = step * period
        decision, window = decide(
            spec, load(busy_at(now), replicas=current), current=current, window=window, now=now
        )
        yield Tick(now, decision, current)
        current = decision.desired


def first_change(ticks: Iterator[Tick], after: float) -> Tick:
    return next(t for t in ticks if t.at >= after and t.decision.desired != t.current)


# --- the formula ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "counts", "expected"),
    [
        pytest.param(DEFAULT, load(0), 1, id="idle-is-min"),
        pytest.param(ScalingSpec(policy=AZUREML, min_replicas=0), load(0), 0, id="idle-min-zero"),
        pytest.param(WIDE, load(7), 10, id="7-busy-at-70pct-is-10"),
        pytest.param(WIDE, load(8), 12, id="8-busy-at-70pct-is-12"),
        pytest.param(WIDE, load(21), 30, id="21-busy-at-70pct-is-30-not-31"),
        pytest.param(WIDE, load(42), 60, id="42-busy-at-70pct-is-60-not-61"),
        pytest.param(WIDE, load(3, queued=4), 10, id="queued-counts-as-demand"),
        pytest.param(
            ScalingSpec(policy=AZUREML, replica_max_concurrent_requests=4),
            load(7, replicas=2),
            3,
            id="concurrency-4",
        ),
        pytest.param(ScalingSpec(policy=AZUREML, target_utilization=100), load(5, replicas=5), 5, id="target-100"),
        pytest.param(ScalingSpec(policy=AZUREML, target_utilization=50), load(5, replicas=5), 10, id="target-50"),
        pytest.param(DEFAULT, load(100), 10, id="clamped-to-max"),
        pytest.param(ScalingSpec(policy=AZUREML, min_replicas=3), load(1), 3, id="clamped-to-min"),
        pytest.param(WIDE, load(0, queued=5, replicas=0), 8, id="no-replicas-with-queue"),
        pytest.param(WIDE, load(1, replicas=0), 2, id="no-replicas-one-request"),
    ],
)
def test_recommend(spec: ScalingSpec, counts: Counts, expected: int) -> None:
    assert recommend(spec, counts) == expected


def test_float_division_would_round_wrongly() -> None:
    # Why recommend() works in integers: the textbook float formula asks for one replica too many.
    assert math.ceil(21 / 0.7) == 31
    assert recommend(WIDE, load(21, replicas=30)) == 30


@pytest.mark.parametrize(
    ("spec", "counts", "expected"),
    [
        pytest.param(DEFAULT, load(7, replicas=10), 0.7, id="70pct"),
        pytest.param(DEFAULT, load(3, queued=3, replicas=4), 1.5, id="queue-pushes-over-100pct"),
        pytest.param(
            ScalingSpec(policy=AZUREML, replica_max_concurrent_requests=2), load(1, replicas=2), 0.25, id="conc-2"
        ),
        pytest.param(DEFAULT, load(0, replicas=0), 0.0, id="nothing-at-all"),
        pytest.param(DEFAULT, load(0, queued=2, replicas=0), math.inf, id="demand-no-capacity"),
    ],
)
def test_utilization(spec: ScalingSpec, counts: Counts, expected: float) -> None:
    assert utilization(spec, counts) == pytest.approx(expected)


# --- scaling up -------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 1, 3], ids=["from-0", "from-1", "from-3"])
@pytest.mark.parametrize(("busy", "needed"), [(7, 10), (20, 29), (50, 72)])
def test_step_up_asks_for_all_replicas_at_once(start: int, busy: int, needed: int) -> None:
    decision, _ = decide(
        WIDE, load(busy, replicas=start), current=start, window=ScaleDownWindow(), now=0.0
    )
    assert decision == Decision(
        needed, utilization(WIDE, load(busy, replicas=start)), Reason.SCALE_UP
    )


def test_step_up_in_a_running_series_is_immediate() -> None:
    ticks = simulate(WIDE, lambda t: 0 if t < 30 else 14, until=40)
    change = first_change(ticks, after=0)
    assert (change.at, change.decision.desired, change.decision.reason) == (30, 20, Reason.SCALE_UP)


def test_scale_up_after_a_lost_replica() -> None:
    # The actuator reports 3 where 5 are needed (a replica died): back up to 5 at once.
    decision, _ = decide(DEFAULT, load(3, replicas=3), current=3, window=ScaleDownWindow(), now=0.0)
    assert (decision.desired, decision.reason) == (5, Reason.SCALE_UP)


# --- scaling down -----------------------------------------------------------------------------


@pytest.mark.parametrize("period", [0.5, 1.0, 5.0, 15.0], ids=lambda p: f"refresh-{p}s")
def test_drop_scales_down_exactly_one_window_after_it_is_seen(period: float) -> None:
    drop_at = 30.0  # first tick that sees the lower demand
    ticks = list(simulate(WIDE, lambda t: 14 if t < drop_at else 2, until=200, period=period))
    by_time = {t.at: t for t in ticks}

    assert by_time[drop_at].decision == Decision(20, 0.1, Reason.HELD)
    last_held = max(t.at for t in ticks if t.at < drop_at + 60)
    assert by_time[last_held].decision.desired == 20
    assert by_time[drop_at + 60].decision == Decision(3, 0.1, Reason.SCALE_DOWN)


def test_not_at_59_seconds() -> None:
    ticks = {t.at: t for t in simulate(WIDE, lambda t: 14 if t < 30 else 2, until=100)}
    assert ticks[89].decision.desired == 20
    assert ticks[89].decision.reason is Reason.HELD
    assert ticks[90].decision.desired == 3


@pytest.mark.parametrize("lull", [1, 10, 30, 59], ids=lambda s: f"lull-{s}s")
def test_lull_shorter_than_window_does_not_scale_down(lull: int) -> None:
    def busy(t: float) -> int:
        return 2 if 30 <= t < 30 + lull else 14

    ticks = list(simulate(WIDE, busy, until=300))
    assert {t.decision.desired for t in ticks if t.at >= 1} == {20}


def test_repeated_short_lulls_do_not_scale_down() -> None:
    ticks = list(simulate(WIDE, lambda t: 2 if t % 40 < 30 else 14, until=600))
    assert {t.decision.desired for t in ticks if t.at >= 30} == {20}


def test_short_spike_is_kept_for_a_window_then_back_to_base_not_to_min() -> None:
    ticks = {t.at: t for t in simulate(WIDE, lambda t: 14 if 10 <= t < 15 else 7, until=200)}
    assert ticks[10].decision.desired == 20
    assert ticks[74].decision.desired == 20  # last spike tick at 14, lower demand seen from 15
    assert ticks[75].decision == Decision(10, 0.35, Reason.SCALE_DOWN)
    assert ticks[200].decision.desired == 10


def test_gradual_decline_steps_down_one_window_after_each_step() -> None:
    def busy(t: float) -> int:
        return 14 if t < 10 else 7 if t < 40 else 1

    changes = [
        (t.at, t.decision.desired)
        for t in simulate(WIDE, busy, until=200, start=20)
        if t.decision.desired != t.current
    ]
    assert changes == [(70, 10), (100, 2)]


def test_does_not_scale_up_to_a_stale_recommendation() -> None:
    # 8 was recommended 10 s ago but the service is at 5 and 5 is enough now: stay at 5.
    window = ScaleDownWindow((Recommendation(0.0, 8),))
    decision, _ = decide(DEFAULT, load(3, replicas=5), current=5, window=window, now=10.0)
    assert decision == Decision(5, 0.6, Reason.STEADY)


@pytest.mark.parametrize(
    ("window_s", "scaled_down_at"),
    [(0.0, 30), (10.0, 40), (60.0, 90), (300.0, 330)],
    ids=["no-window", "10s", "60s", "300s"],
)
def test_window_length_is_a_setting(window_s: float, scaled_down_at: int) -> None:
    spec = ScalingSpec(policy=AZUREML, max_replicas=100, scale_down_window_s=window_s)
    change = first_change(simulate(spec, lambda t: 14 if t < 30 else 2, until=400), after=1)
    assert (change.at, change.decision.desired) == (scaled_down_at, 3)


def test_window_keeps_only_what_is_still_in_effect() -> None:
    window = ScaleDownWindow()
    for at, desired in [(0, 9), (10, 5), (20, 7), (65, 2)]:
        window = window.record(Recommendation(at, desired), window_s=60)
    # At 65 the window starts at 5: 9 (superseded at 10) was still in effect then.
    assert [r.desired for r in window.recent] == [9, 5, 7, 2]
    window = window.record(Recommendation(70, 2), window_s=60)
    # The same count again is not a new entry (the 2 of 65 stays in effect): one per change.
    assert [(r.at, r.desired) for r in window.recent] == [(10, 5), (20, 7), (65, 2)]
    assert window.highest() == 7


def test_window_refuses_time_going_backwards() -> None:
    window = ScaleDownWindow().record(Recommendation(10, 3), window_s=60)
    with pytest.raises(ValueError, match="backwards"):
        window.record(Recommendation(9, 3), window_s=60)


def test_steady() -> None:
    decision, _ = decide(
        DEFAULT, load(7, replicas=10), current=10, window=ScaleDownWindow(), now=0.0
    )
    assert decision == Decision(10, 0.7, Reason.STEADY)


def test_decide_is_pure() -> None:
    window = ScaleDownWindow((Recommendation(0.0, 8),))
    args = (DEFAULT, load(1, replicas=8))
    first = decide(*args, current=8, window=window, now=30.0)
    second = decide(*args, current=8, window=window, now=30.0)
    assert first == second
    assert window == ScaleDownWindow((Recommendation(0.0, 8),))


# --- bounds, reloads, fixed size --------------------------------------------------------------


def test_lowered_max_applies_at_once_despite_the_window() -> None:
    window = ScaleDownWindow((Recommendation(0.0, 10),))
    decision, _ = decide(
        ScalingSpec(policy=AZUREML, max_replicas=4), load(7, replicas=10), current=10, window=window, now=1.0
    )
    assert (decision.desired, decision.reason) == (4, Reason.SCALE_DOWN)


def test_raised_min_applies_at_once() -> None:
    decision, _ = decide(
        ScalingSpec(policy=AZUREML, min_replicas=3),
        load(0, replicas=1),
        current=1,
        window=ScaleDownWindow(),
        now=0.0,
    )
    assert (decision.desired, decision.reason) == (3, Reason.SCALE_UP)


@pytest.mark.parametrize(
    ("busy", "current"),
    [(0, 4), (100, 4), (3, 0), (0, 0)],
    ids=["idle", "overloaded", "from-zero", "idle-from-zero"],
)
def test_autoscale_off_is_num_replicas(busy: int, current: int) -> None:
    spec = ScalingSpec(policy=AZUREML, autoscale_enabled=False, num_replicas=4)
    old = ScaleDownWindow((Recommendation(0.0, 10),))
    decision, window = decide(
        spec, load(busy, replicas=current), current=current, window=old, now=5.0
    )
    assert (decision.desired, decision.reason) == (4, Reason.FIXED)
    assert decision.utilization == utilization(spec, load(busy, replicas=current))
    assert window == ScaleDownWindow()


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"min_replicas": -1}, id="negative-min"),
        pytest.param({"min_replicas": 5, "max_replicas": 4}, id="min-over-max"),
        pytest.param({"min_replicas": 0, "max_replicas": 0}, id="max-zero"),
        pytest.param({"target_utilization": 0}, id="target-0"),
        pytest.param({"target_utilization": 101}, id="target-101"),
        pytest.param({"replica_max_concurrent_requests": 0}, id="concurrency-0"),
        pytest.param({"refresh_seconds": 0}, id="refresh-0"),
        pytest.param({"scale_down_window_s": -1}, id="negative-window"),
        pytest.param({"autoscale_enabled": False}, id="off-without-num-replicas"),
    ],
)
def test_spec_refuses_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ScalingSpec(policy=AZUREML, **kwargs)


def test_counts_refuse_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        Counts(busy=-1, queued=0, replicas=1)


def test_fresh_start_keeps_existing_replicas_for_a_window() -> None:
    # After a restart the window is empty; 8 running replicas must not be cut at once.
    ticks = {t.at: t for t in simulate(WIDE, lambda t: 2, until=100, start=8)}
    assert ticks[0].decision == Decision(8, 0.25, Reason.HELD)
    assert ticks[59].decision.desired == 8
    assert ticks[60].decision == Decision(3, 0.25, Reason.SCALE_DOWN)


def test_fresh_start_without_a_window_scales_down_at_once() -> None:
    spec = ScalingSpec(policy=AZUREML, max_replicas=100, scale_down_window_s=0)
    decision, _ = decide(spec, load(2, replicas=8), current=8, window=ScaleDownWindow(), now=0.0)
    assert (decision.desired, decision.reason) == (3, Reason.SCALE_DOWN)
