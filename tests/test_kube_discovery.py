"""Replica discovery: a service's pool follows the ready endpoints of its EndpointSlices, through
the real adapter against the fake API server. Backoff waits are on a fake clock: a test sees the
watcher park in a wait of the expected length, then moves time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from deploy.kube.api import Backoff, KubeApi
from deploy.kube.discovery import EndpointWatcher, listed_pods, ready_addresses
from deploy.kube.target import KubernetesTarget
from mlfe.config import parse_config
from mlfe.supervise import Supervisor
from router.auth import NoAuth
from router.services import Service, ServiceLinks
from tests.fake_kube_api import (
    FakeKubeApi,
    WatchedClock,
    connect_in_cluster,
    ep,
    fake_cluster,
    until,
)

NS = "models"


# Every test here must leave no task running (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeKubeApi]:
    async with fake_cluster(tmp_path) as f:
        yield f


@pytest.fixture
async def api(fake: FakeKubeApi) -> AsyncIterator[KubeApi]:
    a = await connect_in_cluster(fake)
    yield a
    await a.close()


class RecordingService:
    """Stands in for router.services.Service: records every replica set it is given."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.changed = asyncio.Event()

    def set_replicas(self, addrs: Iterable[str]) -> None:
        self.calls.append(list(addrs))
        self.changed.set()

    @property
    def replicas(self) -> list[str] | None:
        return self.calls[-1] if self.calls else None

    async def wait_for(self, addrs: list[str]) -> None:
        await until(lambda: self.replicas == addrs, self.changed)


@pytest.fixture
def clock() -> WatchedClock:
    return WatchedClock()


def watcher(api: KubeApi, svc: RecordingService, clock: WatchedClock,
            service: str = "iris") -> EndpointWatcher:
    return EndpointWatcher(api, NS, service, svc.set_replicas, clock=clock,
                           backoff=Backoff(initial_s=0.5, max_s=4.0, jitter=0.0))


# ---- the pure part ---------------------------------------------------------------------------


def test_ready_addresses() -> None:
    slices: list[dict[str, Any]] = [
        {"addressType": "IPv4", "ports": [{"name": "metrics", "port": 9090},
                                          {"name": "http", "port": 8000}],
         "endpoints": [
             {"addresses": ["192.0.2.1"], "conditions": {"ready": True}},
             {"addresses": ["192.0.2.2"], "conditions": {}},  # no condition: ready
             {"addresses": ["192.0.2.3"]},  # no conditions at all: ready
             {"addresses": ["192.0.2.4"], "conditions": {"ready": None}},  # null: ready
             {"addresses": ["192.0.2.5"], "conditions": {"ready": False, "serving": True,
                                                        "terminating": True}},
             {"addresses": ["192.0.2.6"], "conditions": {"ready": False}},
         ]},
        {"addressType": "IPv4", "ports": [{"name": "web", "port": 5001}],  # first port
         "endpoints": [{"addresses": ["192.0.2.7", "192.0.2.8"]},  # first address only
                       {"addresses": ["192.0.2.1"]}]},
        {"addressType": "IPv4", "ports": [{"name": "http", "port": 8000}],  # a duplicate
         "endpoints": [{"addresses": ["192.0.2.1"]}]},
        {"addressType": "IPv6", "ports": [{"name": "http", "port": 8000}],
         "endpoints": [{"addresses": ["2001:db8::1"]}]},
        {"addressType": "FQDN", "ports": [{"name": "http", "port": 8000}],
         "endpoints": [{"addresses": ["model.example"]}]},
        {"addressType": "IPv4", "ports": [], "endpoints": [{"addresses": ["192.0.2.9"]}]},
        {"addressType": "IPv4", "ports": None, "endpoints": None},
    ]
    assert ready_addresses(slices) == [
        "192.0.2.1:5001", "192.0.2.1:8000", "192.0.2.2:8000", "192.0.2.3:8000",
        "192.0.2.4:8000", "192.0.2.7:5001", "[2001:db8::1]:8000"]
    assert ready_addresses(slices[:1], port=8081) == [
        "192.0.2.1:8081", "192.0.2.2:8081", "192.0.2.3:8081", "192.0.2.4:8081"]
    assert ready_addresses([]) == []


def test_listed_pods_are_every_pod_endpoint_in_any_condition() -> None:
    slices: list[dict[str, Any]] = [
        {"addressType": "IPv4", "ports": [{"name": "admin", "port": 8082}], "endpoints": [
            ep("192.0.2.1", pod="router-a"),
            ep("192.0.2.2", ready=False, pod="router-b"),  # starting or failing: still runs
            ep("192.0.2.3", ready=False, serving=True, terminating=True, pod="router-c"),
            ep("192.0.2.4"),  # no targetRef: names no pod
            {"addresses": ["192.0.2.5"], "targetRef": {"kind": "Node", "name": "node-1"}},
        ]},
        {"addressType": "IPv4", "endpoints": None},
        {"addressType": "IPv4", "endpoints": [ep("192.0.2.6", pod="router-d")]},
    ]
    assert listed_pods(slices) == {"router-a", "router-b", "router-c", "router-d"}
    assert listed_pods([]) == set()


# ---- following a Service -------------------------------------------------------------------


async def test_pool_follows_endpoints_as_they_come_and_go(
    fake: FakeKubeApi, api: KubeApi, clock: WatchedClock,
) -> None:
    fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.1"), ep("192.0.2.2", ready=False)])
    fake.put_slice(NS, "wine-a", "wine", [ep("192.0.2.50")])
    svc = RecordingService()
    w = watcher(api, svc, clock)
    w.start()
    try:
        await asyncio.wait_for(w.wait_synced(), 10)
        assert svc.calls == [["192.0.2.1:8000"]]
        await fake.wait_watching(1)

        fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.1"), ep("192.0.2.2")])  # now ready
        await svc.wait_for(["192.0.2.1:8000", "192.0.2.2:8000"])
        fake.put_slice(NS, "iris-b", "iris", [ep("192.0.2.3", ready=None)])  # a second slice
        await svc.wait_for(["192.0.2.1:8000", "192.0.2.2:8000", "192.0.2.3:8000"])
        fake.put_slice(NS, "iris-a", "iris", [  # one terminates, one goes unready
            ep("192.0.2.1", ready=False, serving=True, terminating=True),
            ep("192.0.2.2", ready=False)])
        await svc.wait_for(["192.0.2.3:8000"])
        fake.put_slice(NS, "wine-a", "wine", [ep("192.0.2.51")])  # another service: no news
        fake.delete_slice(NS, "iris-b")
        await svc.wait_for([])
        fake.put_slice(NS, "iris-c", "iris", [ep("192.0.2.4")], ports=[("http", 9000)])
        await svc.wait_for(["192.0.2.4:9000"])
    finally:
        await w.close()
    assert all(a != b for a, b in zip(svc.calls, svc.calls[1:], strict=False))  # no repeats
    assert len(fake.seen("GET", "endpointslices", watch=False)) == 1  # listed once
    assert clock.sleeps == []  # nothing went wrong, nothing waited


async def test_a_dropped_stream_resumes_from_the_last_version(
    fake: FakeKubeApi, api: KubeApi, clock: WatchedClock,
) -> None:
    fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.1")])
    svc = RecordingService()
    w = watcher(api, svc, clock)
    w.start()
    try:
        await fake.wait_watching(1)
        fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.1"), ep("192.0.2.2")])
        await svc.wait_for(["192.0.2.1:8000", "192.0.2.2:8000"])
        last_rv = w.resource_version
        assert last_rv == str(fake.rv)
        watches = len(fake.seen("GET", "endpointslices", watch=True))

        fake.drop_watches()  # the connection is cut mid-stream
        assert await clock.wait_sleeps(1) == 0.5  # backs off before reconnecting
        # What happens while it is away is not lost: the watch resumes from where it was.
        fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.2")])
        fake.put_slice(NS, "iris-b", "iris", [ep("192.0.2.3")])
        assert svc.replicas == ["192.0.2.1:8000", "192.0.2.2:8000"]  # kept while away
        mark = len(fake.requests)
        clock.advance(0.5)
        resumed = await fake.wait_request(lambda r: r.watch, after=mark)
        assert resumed.query["resourceVersion"] == last_rv
        await svc.wait_for(["192.0.2.2:8000", "192.0.2.3:8000"])
        await fake.wait_watching(2)

        # A stream that ends after it brought news is routine: resumed at once.
        mark = len(fake.requests)
        fake.drop_watches(clean=True)
        resumed = await fake.wait_request(lambda r: r.watch, after=mark)
        assert resumed.query["resourceVersion"] == str(fake.rv)
        assert len(clock.sleeps) == 1
        await fake.wait_watching(3)

        # One that ends early without a word is a drop too: backoff (reset by the good one).
        mark = len(fake.requests)
        fake.drop_watches(clean=True)
        assert await clock.wait_sleeps(2) == 0.5
        clock.advance(0.5)
        resumed = await fake.wait_request(lambda r: r.watch, after=mark)
        assert resumed.query["resourceVersion"] == str(fake.rv)
        assert len(fake.seen("GET", "endpointslices", watch=True)) == watches + 3
    finally:
        await w.close()
    assert len(fake.seen("GET", "endpointslices", watch=False)) == 1  # never listed again


async def test_an_expired_version_relists(
    fake: FakeKubeApi, api: KubeApi, clock: WatchedClock,
) -> None:
    fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.1")])
    fake.put_slice(NS, "iris-b", "iris", [ep("192.0.2.2")])
    svc = RecordingService()
    w = watcher(api, svc, clock)
    w.start()
    try:
        await fake.wait_watching(1)
        stale_rv = w.resource_version
        fake.drop_watches()
        await clock.wait_sleeps(1)
        # While it is away, slices change and the server forgets the history.
        fake.delete_slice(NS, "iris-b")
        fake.put_slice(NS, "iris-c", "iris", [ep("192.0.2.3")])
        fake.compact()
        clock.advance(0.5)
        relist = await fake.wait_request(lambda r: r.method == "GET" and not r.watch,
                                         after=1)
        gone = [r for r in fake.seen("GET", "endpointslices", watch=True)
                if r.query["resourceVersion"] == stale_rv]
        assert len(gone) == 2  # the first watch, then the resumed one that got 410
        await svc.wait_for(["192.0.2.1:8000", "192.0.2.3:8000"])  # iris-b's DELETE not missed
        await fake.wait_watching(1)
        latest = fake.seen("GET", "endpointslices", watch=True)[-1]
        assert latest.query["resourceVersion"] == str(fake.rv)  # from the fresh list
        assert fake.requests.index(relist) < fake.requests.index(latest)
        assert len(clock.sleeps) == 1  # the first 410 relists at once
        # Refused again right after a fresh list: then it backs off instead of spinning.
        def lists() -> int:
            return len(fake.seen("GET", "endpointslices", watch=False))

        fake.fail("GET", "endpointslices", 410, watch=True, times=2)
        fake.drop_watches()
        await clock.wait_sleeps(2)
        clock.advance(clock.sleeps[-1])
        await clock.wait_sleeps(3)  # 410, relist at once, 410 again: wait
        assert lists() == 3
        clock.advance(clock.sleeps[-1])
        await until(lambda: lists() == 4)
        await fake.wait_watching(3)
    finally:
        await w.close()


async def test_errors_back_off_exponentially(
    fake: FakeKubeApi, api: KubeApi, clock: WatchedClock,
) -> None:
    fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.1")])
    fake.fail("GET", "endpointslices", 500, times=4, watch=False)
    svc = RecordingService()
    w = watcher(api, svc, clock)
    w.start()
    try:
        for n, expected in enumerate([0.5, 1.0, 2.0, 4.0], start=1):
            assert await clock.wait_sleeps(n) == expected
            assert len(fake.seen("GET", "endpointslices")) == n  # no retry before the time
            assert svc.calls == []
            clock.advance(expected)
        await asyncio.wait_for(w.wait_synced(), 10)
        assert svc.replicas == ["192.0.2.1:8000"]
        await fake.wait_watching(1)
        # 429 with Retry-After: waits at least that long.
        fake.fail("GET", "endpointslices", 429, watch=True, retry_after=7)
        fake.drop_watches()
        await clock.wait_sleeps(5)
        clock.advance(clock.sleeps[-1])
        assert await clock.wait_sleeps(6) == 7.0
    finally:
        await w.close()


# ---- the target feeds the router's services ------------------------------------------------


async def test_target_feeds_the_router_service(fake: FakeKubeApi, api: KubeApi) -> None:
    cfg = parse_config({"services": {
        "iris": {"kubernetes": {"namespace": NS, "deployment": "iris"}, "auth_enabled": False},
        "local": {"upstreams": ["127.0.0.1:5001"], "auth_enabled": False},
    }})
    services = {"iris": Service("iris", cfg.services["iris"], NoAuth(), ServiceLinks(Supervisor()))}
    fake.put_deployment(NS, "iris", replicas=2)
    fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.1"), ep("192.0.2.2")])
    target = KubernetesTarget(services, api, clock=WatchedClock())
    target.configure(services, cfg.services)
    try:
        await asyncio.wait_for(target.wait_synced(), 10)
        pool = services["iris"].pool
        assert sorted(r.addr for r in pool.replicas) == ["192.0.2.1:8000", "192.0.2.2:8000"]
        assert target.current("iris") == 2
        fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.2"), ep("192.0.2.3")])
        await until(lambda: sorted(r.addr for r in pool.replicas)
                    == ["192.0.2.2:8000", "192.0.2.3:8000"])
        # A reload that brings a new Service object gets the current set at once.
        services2 = {"iris": Service("iris", cfg.services["iris"], NoAuth(), ServiceLinks(Supervisor()))}
        target.configure(services2, cfg.services)
        assert sorted(r.addr for r in services2["iris"].pool.replicas) == [
            "192.0.2.2:8000", "192.0.2.3:8000"]
        # A reload without the service stops following it.
        target.configure(services2, {})
        assert target.addresses("iris") is None
        with pytest.raises(KeyError):
            target.current("iris")
    finally:
        await target.close()
        for s in (*services.values(), *services2.values()):
            s.close()
