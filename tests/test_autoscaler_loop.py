"""The autoscaler control loop on a fake clock, with a fake router and a recording actuator."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from autoscaler.decider import Counts, Policy, Reason, ScalingSpec
from autoscaler.loop import AutoscalerLoop, ServiceStatus
from mlfe.clock import FakeClock, MonotonicClock, settle
from mlfe.supervise import TaskFailure
from tests.late_clock import LateClock

AZUREML = Policy.AZUREML  # the tests of azureml-fe's rule
SPEC = ScalingSpec(policy=AZUREML, min_replicas=1, max_replicas=100)


# Every test here must leave no task running (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


@dataclass
class Call:
    at: float
    service: str
    desired: int


@dataclass
class FakeActuator:
    """Scales instantly (replicas are ready at once) and records every call."""

    clock: FakeClock
    replicas: dict[str, int] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    failures_left: int = 0
    block: asyncio.Event | None = None  # when set, scale() waits for it

    def current(self, service: str) -> int:
        return self.replicas.get(service, 1)

    async def scale(self, service: str, desired: int) -> None:
        self.calls.append(Call(self.clock.now(), service, desired))
        if self.block is not None:
            await self.block.wait()
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("cluster unreachable")
        self.replicas[service] = desired


@dataclass
class FakeRouter:
    """The router's counters: set ``busy`` per service; ready replicas come from the actuator."""

    actuator: FakeActuator
    busy: dict[str, int] = field(default_factory=dict)
    reads: list[tuple[float, str]] = field(default_factory=list)
    broken: bool = False

    def counts(self, service: str) -> Counts:
        self.reads.append((self.actuator.clock.now(), service))
        if self.broken:
            raise RuntimeError("counters unavailable")
        return Counts(
            busy=self.busy.get(service, 0), queued=0, replicas=self.actuator.current(service)
        )


@dataclass
class Harness:
    clock: FakeClock
    actuator: FakeActuator
    router: FakeRouter
    loop: AutoscalerLoop


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    clock = FakeClock()
    actuator = FakeActuator(clock)
    router = FakeRouter(actuator)
    loop = AutoscalerLoop(counts=router, actuator=actuator, clock=clock)
    yield Harness(clock, actuator, router, loop)
    await loop.stop()


@pytest.mark.parametrize("refresh", [1.0, 5.0], ids=["refresh-1s", "refresh-5s"])
async def test_step_load_is_scaled_within_one_refresh_period(
    harness: Harness, refresh: float
) -> None:
    spec = ScalingSpec(policy=AZUREML, max_replicas=100, refresh_seconds=refresh)
    harness.loop.set_services({"svc": spec})
    harness.loop.start()
    await harness.clock.advance_and_settle(10.3)
    assert harness.actuator.calls == []

    step_at = harness.clock.now()
    harness.router.busy["svc"] = 14
    await harness.clock.advance_and_settle(refresh)

    (call,) = harness.actuator.calls
    assert (call.service, call.desired) == ("svc", 20)
    assert 0 < call.at - step_at <= refresh


async def test_scale_down_only_after_the_window(harness: Harness) -> None:
    harness.router.busy["svc"] = 14
    harness.loop.set_services({"svc": SPEC})
    harness.loop.start()
    await harness.clock.advance_and_settle(0)
    assert [(c.at, c.desired) for c in harness.actuator.calls] == [(0, 20)]

    await harness.clock.advance_and_settle(10)
    harness.router.busy["svc"] = 2
    await harness.clock.advance_and_settle(1)  # the tick at 11 is the first to see the drop
    await harness.clock.advance_and_settle(59)  # 70: lower demand for 59 s
    assert len(harness.actuator.calls) == 1
    assert harness.loop.status()["svc"].reason is Reason.HELD

    await harness.clock.advance_and_settle(1)
    assert [(c.at, c.desired) for c in harness.actuator.calls] == [(0, 20), (71, 3)]


async def test_short_lull_does_not_scale_down(harness: Harness) -> None:
    harness.router.busy["svc"] = 14
    harness.loop.set_services({"svc": SPEC})
    harness.loop.start()
    await harness.clock.advance_and_settle(10)
    harness.router.busy["svc"] = 0
    await harness.clock.advance_and_settle(45)
    harness.router.busy["svc"] = 14
    await harness.clock.advance_and_settle(300)
    assert [(c.at, c.desired) for c in harness.actuator.calls] == [(0, 20)]


async def test_actuator_errors_are_logged_and_retried(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.actuator.failures_left = 2
    harness.router.busy["svc"] = 7
    harness.loop.set_services({"svc": SPEC})
    harness.loop.start()
    await harness.clock.advance_and_settle(5)

    assert [(c.at, c.desired) for c in harness.actuator.calls] == [(0, 10), (1, 10), (2, 10)]
    assert harness.actuator.replicas["svc"] == 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("svc" in r.getMessage() and r.exc_info for r in warnings)
    assert harness.loop.status()["svc"].reason is Reason.STEADY


async def test_unreadable_counts_skip_the_tick_and_the_loop_goes_on(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.router.broken = True
    harness.loop.set_services({"svc": SPEC})
    harness.loop.start()
    await harness.clock.advance_and_settle(2)
    assert harness.loop.status() == {}
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3

    harness.router.broken = False
    harness.router.busy["svc"] = 7
    await harness.clock.advance_and_settle(1)
    assert [(c.at, c.desired) for c in harness.actuator.calls] == [(3, 10)]


async def test_status_exposes_the_last_decision(harness: Harness) -> None:
    harness.actuator.replicas["svc"] = 4
    harness.router.busy["svc"] = 2
    harness.loop.set_services({"svc": SPEC})
    harness.loop.start()
    await harness.clock.advance_and_settle(0)

    assert harness.loop.status() == {
        "svc": ServiceStatus(
            at=0.0,
            desired=4,
            current=4,
            utilization=0.5,
            reason=Reason.HELD,
            busy=2,
            queued=0,
            replicas=4,
        )
    }
    # A copy: the caller cannot change the loop's view.
    harness.loop.status().clear()
    assert "svc" in harness.loop.status()


async def test_services_tick_at_their_own_rate(harness: Harness) -> None:
    harness.loop.set_services(
        {"fast": SPEC, "slow": ScalingSpec(policy=AZUREML, max_replicas=100, refresh_seconds=5)}
    )
    harness.loop.start()
    await harness.clock.advance_and_settle(10)

    reads = harness.router.reads
    assert [at for at, name in reads if name == "fast"] == [float(t) for t in range(11)]
    assert [at for at, name in reads if name == "slow"] == [0.0, 5.0, 10.0]


async def test_a_slow_scale_call_delays_only_its_own_service(harness: Harness) -> None:
    harness.actuator.block = asyncio.Event()
    harness.actuator.replicas.update(stuck=1, other=1)
    harness.router.busy["stuck"] = 7
    harness.loop.set_services({"stuck": SPEC, "other": SPEC})
    harness.loop.start()
    await harness.clock.advance_and_settle(3.5)

    reads = harness.router.reads
    assert [at for at, name in reads if name == "stuck"] == [0.0]
    assert [at for at, name in reads if name == "other"] == [0.0, 1.0, 2.0, 3.0]

    # When the call returns after 3.5 s, the next tick comes at once, not four in a burst.
    harness.actuator.block.set()
    await harness.clock.advance_and_settle(0)
    assert [at for at, name in reads if name == "stuck"] == [0.0, 3.5]


async def test_now_is_the_scheduled_tick_time() -> None:
    clock = LateClock(late=0.25)  # every wake-up comes a quarter second late
    actuator = FakeActuator(clock)
    router = FakeRouter(actuator)
    loop = AutoscalerLoop(counts=router, actuator=actuator, clock=clock)
    loop.set_services({"svc": SPEC})
    loop.start()
    await clock.advance_and_settle(2.5)
    await loop.stop()
    assert [at for at, _ in router.reads] == [0, 1.25, 2.25]  # when the ticks ran
    assert loop.status()["svc"].at == 2  # what they decided as


async def test_config_reload_adds_changes_and_removes_services(harness: Harness) -> None:
    harness.loop.set_services({"a": SPEC})
    harness.loop.start()
    await harness.clock.advance_and_settle(2)

    harness.router.busy.update(a=7, b=7)
    harness.loop.set_services({"a": ScalingSpec(policy=AZUREML, max_replicas=5), "b": SPEC})
    await harness.clock.advance_and_settle(0)
    assert [(c.at, c.service, c.desired) for c in harness.actuator.calls] == [(2, "b", 10)]

    await harness.clock.advance_and_settle(1)
    assert (3, "a", 5) in [(c.at, c.service, c.desired) for c in harness.actuator.calls]

    harness.loop.set_services({"b": SPEC})
    await harness.clock.advance_and_settle(10)
    assert set(harness.loop.status()) == {"b"}
    assert max(at for at, name in harness.router.reads if name == "a") == 3
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "autoscaler:a"]


async def test_autoscale_off_converges_to_num_replicas(harness: Harness) -> None:
    harness.router.busy["svc"] = 50
    harness.loop.set_services({"svc": ScalingSpec(policy=AZUREML, autoscale_enabled=False, num_replicas=3)})
    harness.loop.start()
    await harness.clock.advance_and_settle(5)
    assert [(c.at, c.desired) for c in harness.actuator.calls] == [(0, 3)]
    assert harness.loop.status()["svc"].reason is Reason.FIXED


async def test_no_ready_replicas_reports_infinite_utilization(harness: Harness) -> None:
    harness.actuator.replicas["svc"] = 0
    harness.router.busy["svc"] = 1
    harness.loop.set_services({"svc": SPEC})
    harness.loop.start()
    await harness.clock.advance_and_settle(0)
    assert math.isinf(harness.loop.status()["svc"].utilization)
    assert [(c.at, c.desired) for c in harness.actuator.calls] == [(0, 2)]


async def test_stop_cancels_cleanly_and_leaves_no_tasks() -> None:
    clock = FakeClock()
    actuator = FakeActuator(clock, block=asyncio.Event())  # one service stuck mid-scale
    router = FakeRouter(actuator, busy={"stuck": 7})
    failures: list[TaskFailure] = []
    loop = AutoscalerLoop(counts=router, actuator=actuator, clock=clock, on_failure=failures.append)
    loop.set_services({"stuck": SPEC, "idle": SPEC})
    loop.start()
    await clock.advance_and_settle(3)
    assert clock.sleepers == 1  # "idle" parked on the clock; "stuck" inside scale()

    await loop.stop()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert clock.sleepers == 0
    assert failures == []

    reads = len(router.reads)
    await clock.advance_and_settle(10)
    assert len(router.reads) == reads


async def test_start_twice_is_an_error(harness: Harness) -> None:
    harness.loop.start()
    with pytest.raises(RuntimeError, match="already started"):
        harness.loop.start()


async def test_services_set_before_start_do_not_tick(harness: Harness) -> None:
    harness.loop.set_services({"svc": SPEC})
    await harness.clock.advance_and_settle(5)
    await settle()
    assert harness.router.reads == []


# --- the clocks -------------------------------------------------------------------------------


async def test_fake_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = FakeClock(start=100.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [
        asyncio.create_task(sleeper(name, seconds))
        for name, seconds in [("c", 3.0), ("a", 1.0), ("b", 2.0), ("b2", 2.0)]
    ]
    await settle()
    assert clock.sleepers == 4
    assert clock.next_deadline() == 101.0

    clock.advance(1.5)  # runnable, but nothing has run yet
    assert woke == []
    await settle()
    assert woke == [("a", 101.5)]

    clock.advance(10)
    await settle()
    assert [name for name, _ in woke] == ["a", "b", "b2", "c"]
    await asyncio.gather(*tasks)


async def test_fake_clock_advance_and_settle_steps_through_deadlines() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(clock.now())
            await clock.sleep(2)

    task = asyncio.create_task(ticker())
    await clock.advance_and_settle(7)
    assert ticks == [0, 2, 4, 6]
    assert clock.now() == 7
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_fake_clock_refuses_to_go_backwards() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="backwards"):
        await clock.advance_and_settle(-0.5)


async def test_fake_clock_zero_sleep_only_yields_and_cancelled_sleepers_are_dropped() -> None:
    clock = FakeClock()
    await clock.sleep(0)
    await clock.sleep(-1)
    assert clock.sleepers == 0

    task = asyncio.create_task(clock.sleep(5))
    await settle()
    assert clock.sleepers == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert clock.sleepers == 0
    assert clock.next_deadline() is None
    clock.advance(10)  # waking a cancelled sleeper must not fail


async def test_monotonic_clock_is_the_loops_clock() -> None:
    clock = MonotonicClock()
    before = asyncio.get_running_loop().time()
    now = clock.now()
    await clock.sleep(0)
    assert before <= now <= asyncio.get_running_loop().time()


async def test_a_human_change_is_adopted_for_a_window_not_undone(harness: Harness) -> None:
    """kubectl scale to 6 while demand needs 2: the loop holds 6 for a scale-down window,
    then follows demand; it does not undo the change on its next tick."""
    harness.router.busy["svc"] = 1
    harness.loop.set_services({"svc": SPEC})
    harness.loop.start()
    await harness.clock.advance_and_settle(5)
    assert [c.desired for c in harness.actuator.calls] == [2]  # what demand asked for
    harness.actuator.replicas["svc"] = 6  # a human scales the Deployment
    harness.loop.adopt("svc", 6)
    await harness.clock.advance_and_settle(59)
    assert [c.desired for c in harness.actuator.calls] == [2]  # 6 held for the window
    await harness.clock.advance_and_settle(2)
    # The first tick after adopting (6) is the first to recommend less: down at 6 + 60.
    assert [(c.at, c.desired) for c in harness.actuator.calls] == [(0, 2), (66, 2)]


@dataclass
class RateRouter:
    """Counts of a service offered ``rate`` req/s, each taking ``service_s`` at a replica, as
    cumulative counters on the fake clock (what Router.counts reports)."""

    clock: FakeClock
    rate: float = 0.0
    service_s: float = 0.05
    since: float = 0.0
    base: float = 0.0  # arrivals before ``since``
    reads: list[float] = field(default_factory=list)

    def set_rate(self, rate: float) -> None:
        self.base = self._arrived(self.clock.now())
        self.since, self.rate = self.clock.now(), rate

    def _arrived(self, now: float) -> float:
        return self.base + (now - self.since) * self.rate

    def counts(self, service: str) -> Counts:
        now = self.clock.now()
        self.reads.append(now)
        arrived = math.floor(self._arrived(now) + 1e-9)
        in_flight = math.floor(self.rate * self.service_s)
        served = max(0, arrived - in_flight)
        return Counts(busy=in_flight, queued=0, replicas=1, arrivals=arrived, served=served,
                      service_seconds=served * self.service_s)


async def test_demand_policy_samples_ten_times_a_period_and_answers_a_step() -> None:
    clock = FakeClock()
    actuator = FakeActuator(clock)
    router = RateRouter(clock)
    loop = AutoscalerLoop(counts=router, actuator=actuator, clock=clock)
    loop.set_services({"svc": ScalingSpec(max_replicas=100)})  # the demand policy: default
    loop.start()
    try:
        await clock.advance_and_settle(10.05)
        assert len(router.reads) == 101  # every 100 ms from 0
        assert actuator.calls == []
        router.set_rate(70.0)  # 70 req/s x 50 ms / 70 % = 5 replicas
        await clock.advance_and_settle(1.0)
        (call,) = actuator.calls
        assert call.desired == 5
        assert call.at - 10.05 <= 1.0
        status = loop.status()["svc"]
        assert status.rate == pytest.approx(70, rel=0.05)
        assert status.service_time == pytest.approx(0.05)
    finally:
        await loop.stop()
