"""Lease leader election: two candidates against one Lease in the fake API server, on a fake
clock. Rounds are driven one at a time (``step()``) or by the elector's own loop; either way
the Lease round trips are real HTTPS calls, and time moves only when the test moves it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deploy.kube.api import KubeApi
from deploy.kube.leader import LeaderElector, follow_leadership
from deploy.kube.scaler import DeploymentRef, KubeScaler, NotLeader
from mlfe.clock import FakeClock
from tests.fake_kube_api import (
    FakeKubeApi,
    WatchedClock,
    connect_in_cluster,
    fake_cluster,
    until,
)

NS = "mlfe"
LEASE = "mlfe-autoscaler"


# Every test here must leave no task running (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeKubeApi]:
    async with fake_cluster(tmp_path) as f:
        yield f


@pytest.fixture
async def apis(fake: FakeKubeApi) -> AsyncIterator[tuple[KubeApi, KubeApi]]:
    a, b = await connect_in_cluster(fake), await connect_in_cluster(fake)  # two router pods
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
def clock() -> WatchedClock:
    return WatchedClock()


def elector(api: KubeApi, identity: str, clock: FakeClock) -> LeaderElector:
    start = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    return LeaderElector(api, identity=identity, clock=clock,
                         wall=lambda: start + timedelta(seconds=clock.now()))


def holder(fake: FakeKubeApi) -> str | None:
    lease = fake.lease(NS, LEASE)
    return None if lease is None else lease["spec"].get("holderIdentity")


def lease_spec(fake: FakeKubeApi) -> dict[str, Any]:
    lease = fake.lease(NS, LEASE)
    assert lease is not None
    spec: dict[str, Any] = lease["spec"]
    return spec


async def test_exactly_one_leads(fake: FakeKubeApi, apis: tuple[KubeApi, KubeApi],
                                 clock: WatchedClock) -> None:
    a, b = elector(apis[0], "pod-a", clock), elector(apis[1], "pod-b", clock)
    # Both start at once against no Lease: both try to create it, one gets 409.
    results = await asyncio.gather(a.step(), b.step())
    assert sorted(results) == [False, True]
    leader, follower = (a, b) if a.is_leader else (b, a)
    assert holder(fake) == leader.identity
    for _ in range(20):  # 40 s of rounds: the leader renews, the follower stays out
        clock.advance(2.0)
        await follower.step()
        await leader.step()
        assert (leader.is_leader, follower.is_leader) == (True, False)
        assert follower.holder == leader.identity
    spec = lease_spec(fake)
    assert spec["holderIdentity"] == leader.identity
    assert spec["leaseDurationSeconds"] == 15
    assert spec["leaseTransitions"] == 0
    assert spec["renewTime"] == "2026-11-24T10:00:40.000000Z"
    assert spec["acquireTime"] == "2026-11-24T10:00:00.000000Z"


async def test_the_follower_takes_over_when_the_leader_stops_renewing(
    fake: FakeKubeApi, apis: tuple[KubeApi, KubeApi], clock: WatchedClock,
) -> None:
    a, b = elector(apis[0], "pod-a", clock), elector(apis[1], "pod-b", clock)
    assert await a.step()
    assert not await b.step()  # b first sees a's record at t=0
    # a hangs (no more renewals). It stops thinking it leads at its renew deadline, before
    # anyone may take over at the lease duration: never two leaders.
    clock.advance(9.9)
    leading = [a.is_leader]
    clock.advance(0.1)
    leading.append(a.is_leader)
    assert leading == [True, False]
    for t in (12.0, 14.0):
        clock.advance(t - clock.now())
        assert not await b.step()
    clock.advance(15.0 - clock.now())  # 15 s after b saw the record last change
    assert await b.step()
    spec = lease_spec(fake)
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("pod-b", 1)
    # a comes back: it finds b holding the lease and stays a follower.
    assert not await a.step()
    assert a.holder == "pod-b"


async def test_losing_the_lease_stops_scaling_within_one_period(
    fake: FakeKubeApi, apis: tuple[KubeApi, KubeApi], clock: WatchedClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.put_deployment("models", "iris", replicas=1)
    a = elector(apis[0], "pod-a", clock)
    scaler = KubeScaler(apis[0], clock=clock, may_scale=lambda: a.is_leader)
    scaler.set_targets({"iris": DeploymentRef("models", "iris")})
    events: list[tuple[str, float]] = []
    changed = asyncio.Event()

    async def started() -> None:
        events.append(("start", clock.now()))
        changed.set()

    async def stopped() -> None:
        events.append(("stop", clock.now()))
        changed.set()

    a.start()
    following = asyncio.ensure_future(follow_leadership(a, started, stopped))
    try:
        await asyncio.wait_for(a.wait_leading(True), 10)
        await until(lambda: events == [("start", 0.0)], changed)
        await scaler.refresh("iris")
        await scaler.scale("iris", 2)
        # Someone else takes the lease (say, a pod whose clock saw it expire).
        fake.put_lease(NS, LEASE, {**lease_spec(fake), "holderIdentity": "pod-c"})
        lost_at = clock.now()
        with caplog.at_level(logging.INFO, logger="deploy.kube.leader"):
            clock.advance(a.retry_period_s)  # the next round finds out
            await asyncio.wait_for(a.wait_leading(False), 10)
        assert clock.now() - lost_at <= a.retry_period_s
        assert "pod-a is no longer the leader (held by pod-c)" in caplog.text
        await until(lambda: len(events) == 2, changed)
        assert events[1] == ("stop", lost_at + a.retry_period_s)  # the autoscaler stops
        with pytest.raises(NotLeader):
            await scaler.scale("iris", 3)
        assert fake.deployment("models", "iris")["spec"]["replicas"] == 2
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await a.close()
        await scaler.close()
    assert holder(fake) == "pod-c"  # closing a follower does not touch the lease


async def test_an_unreachable_api_ends_the_lead_at_the_renew_deadline(
    fake: FakeKubeApi, apis: tuple[KubeApi, KubeApi], clock: WatchedClock,
) -> None:
    a = elector(apis[0], "pod-a", clock)
    assert await a.step()
    fake.fail("GET", "leases", 500, times=1000)
    for _ in range(4):  # renewals fail at 2, 4, 6, 8 s: still the leader meanwhile
        clock.advance(2.0)
        assert await a.step()
    # Even with no round running (a renewal stuck in a call), the lead ends on time.
    losing = asyncio.ensure_future(a.wait_leading(False))
    await clock.wait_sleeps(1)
    assert not losing.done()
    clock.advance(2.0)  # 10 s since the last renewal began
    assert not a.is_leader
    await asyncio.wait_for(losing, 10)
    assert not await a.step()


async def test_release_hands_over_at_once(
    fake: FakeKubeApi, apis: tuple[KubeApi, KubeApi], clock: WatchedClock,
) -> None:
    a, b = elector(apis[0], "pod-a", clock), elector(apis[1], "pod-b", clock)
    assert await a.step()
    assert not await b.step()
    await a.close()  # a graceful shutdown frees the lease
    assert not a.is_leader
    assert holder(fake) is None
    assert await b.step()  # no need to wait for expiry


def test_timing_must_leave_a_gap() -> None:
    with pytest.raises(ValueError, match="retry_period_s < renew_deadline_s < lease_duration_s"):
        LeaderElector(None, identity="x", namespace=NS,  # type: ignore[arg-type]
                      lease_duration_s=10, renew_deadline_s=10, retry_period_s=2)


async def test_refused_credentials_are_one_warning_per_episode(
        fake: FakeKubeApi, apis: tuple[KubeApi, KubeApi], clock: WatchedClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """A Role in another namespace (or a rotated token): every Lease call is 403. The pod says
    so once, at WARNING, without a traceback, and again only after it worked in between."""
    a = elector(apis[0], "pod-a", clock)
    rules = fake.rules
    fake.roles = {"elsewhere": rules}  # mlfe's Role is not in the pod's namespace
    caplog.set_level(logging.DEBUG, logger="deploy.kube.leader")
    for _ in range(3):
        assert not await a.step()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "403" in warnings[0].getMessage()
    assert warnings[0].exc_info is None
    fake.roles = None
    assert await a.step()
    fake.roles = {"elsewhere": rules}
    clock.advance(1)
    await a.step()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) >= 2
    await a.close(release=False)
