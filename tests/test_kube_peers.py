"""Counts summed over router pods: each peer's GET /v1/stats (the real admin API handler, over
real HTTP on loopback), its busy and queued added to the local router's; a peer that does not
answer is left out and logged at most once a minute; the peers themselves come from the
router's own EndpointSlices."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from autoscaler.decider import Counts
from deploy.kube.peers import PeerCounts, peer_watcher
from mlfe.clock import FakeClock
from router.admin import AdminApi
from tests.fake_kube_api import connect_in_cluster, ep, fake_cluster, until

TOKEN = "admin-token-1"


# Every test here must leave no task running (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


class StatsOnly:
    """The part of the Router that GET /v1/stats reads."""

    def __init__(self, stats: dict[str, dict[str, Any]]) -> None:
        self.stats_value = stats

    def stats(self) -> dict[str, dict[str, Any]]:
        return self.stats_value


class Local:
    def __init__(self, busy: int = 1, queued: int = 0, replicas: int = 3) -> None:
        self.value = Counts(busy=busy, queued=queued, replicas=replicas)

    def counts(self, service: str) -> Counts:
        return self.value


@pytest.fixture
async def peer_admins() -> AsyncIterator[list[tuple[AdminApi, StatsOnly]]]:
    """Two router pods' admin APIs."""
    out = []
    for stats in ({"iris": {"replicas": 3, "busy": 2, "queued": 1, "utilization": 1.0}},
                  {"iris": {"replicas": 3, "busy": 1, "queued": 0, "utilization": 0.33},
                   "wine": {"replicas": 1, "busy": 4, "queued": 4, "utilization": 8.0}}):
        stub = StatsOnly(stats)
        admin = AdminApi(stub, TOKEN)  # type: ignore[arg-type]
        await admin.start("127.0.0.1", 0)
        out.append((admin, stub))
    yield out
    for admin, _ in out:
        await admin.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_counts_add_up_over_router_pods(
    peer_admins: list[tuple[AdminApi, StatsOnly]], caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    peers = PeerCounts(Local(busy=1, queued=0, replicas=3), admin_token=TOKEN,
                       self_hosts=["192.0.2.10"], clock=clock, timeout_s=2.0)
    dead = f"127.0.0.1:{closed_port()}"
    live = [f"127.0.0.1:{admin.port}" for admin, _ in peer_admins]
    peers.set_peers([*live, dead, "192.0.2.10:8081"])  # this pod is left out
    assert peers.peers == sorted([*live, dead])
    try:
        assert peers.counts("iris") == Counts(busy=1, queued=0, replicas=3)  # nothing yet
        with caplog.at_level(logging.WARNING, logger="deploy.kube.peers"):
            await peers.refresh()
            # Busy and queued are summed; replicas are the same replicas for every pod.
            assert peers.counts("iris") == Counts(busy=1 + 2 + 1, queued=0 + 1 + 0, replicas=3)
            assert peers.counts("wine") == Counts(busy=1 + 4, queued=4, replicas=3)
            assert caplog.text.count(f"router peer {dead}: no stats") == 1
            await peers.refresh()
            clock.advance(59)
            await peers.refresh()
            assert caplog.text.count(f"router peer {dead}: no stats") == 1  # once a minute
            clock.advance(1)
            await peers.refresh()
            assert caplog.text.count(f"router peer {dead}: no stats") == 2

        peer_admins[0][1].stats_value = {"iris": {"replicas": 3, "busy": 0, "queued": 0}}
        await peers.refresh()
        assert peers.counts("iris") == Counts(busy=1 + 0 + 1, queued=0, replicas=3)
        # Counts that are not refreshed age out instead of freezing the sums.
        clock.advance(10)
        assert peers.counts("iris") == Counts(busy=1, queued=0, replicas=3)
        # A pod that leaves the Service leaves the sums.
        await peers.refresh()
        peers.set_peers(live[1:])
        assert peers.counts("iris") == Counts(busy=1 + 1, queued=0, replicas=3)
    finally:
        await peers.close()


async def test_a_wrong_token_or_a_slow_peer_is_left_out(
    peer_admins: list[tuple[AdminApi, StatsOnly]],
) -> None:
    hang = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await hang.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/stats", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    slow_addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    peers = PeerCounts(Local(), admin_token="wrong", clock=FakeClock(), timeout_s=0.2)
    good = PeerCounts(Local(), admin_token=TOKEN, clock=FakeClock(), timeout_s=0.2)
    try:
        peers.set_peers([f"127.0.0.1:{peer_admins[0][0].port}"])
        await peers.refresh()
        assert peers.counts("iris") == Local().value
        good.set_peers([f"127.0.0.1:{peer_admins[0][0].port}", slow_addr])
        loop = asyncio.get_running_loop()
        started = loop.time()
        await good.refresh()  # bounded by the timeout, not by the slow peer
        assert loop.time() - started < 2.0
        assert good.counts("iris") == Counts(busy=1 + 2, queued=1, replicas=3)
    finally:
        hang.set()
        await peers.close()
        await good.close()
        await runner.cleanup()


async def test_peers_come_from_the_router_service(tmp_path: Path) -> None:
    async with fake_cluster(tmp_path) as fake:
        api = await connect_in_cluster(fake)
        peers = PeerCounts(Local(), admin_token=TOKEN, self_hosts=["192.0.2.10"],
                           clock=FakeClock())
        watcher = peer_watcher(api, peers, clock=FakeClock())
        fake.put_slice("mlfe", "mlfe-router-admin-x", "mlfe-router-admin", [
            ep("192.0.2.10", pod="router-0"),  # this pod
            ep("192.0.2.11", pod="router-1"),
            ep("192.0.2.12", ready=False, pod="router-2"),
        ], ports=[("admin", 8081)])
        fake.put_slice("mlfe", "mlfe-router-x", "mlfe-router", [  # the scoring Service
            ep("192.0.2.10"), ep("192.0.2.11"), ep("192.0.2.12")], ports=[("http", 8080)])
        watcher.start()
        try:
            await until(lambda: peers.peers == ["192.0.2.11:8081"])
            assert watcher.namespace == "mlfe"  # the router's own namespace
            fake.put_slice("mlfe", "mlfe-router-admin-x", "mlfe-router-admin", [
                ep("192.0.2.10"), ep("192.0.2.11"), ep("192.0.2.12")],
                ports=[("admin", 8081)])
            await until(lambda: peers.peers == ["192.0.2.11:8081", "192.0.2.12:8081"])
        finally:
            await watcher.close()
            await peers.close()
            await api.close()


async def test_arrivals_add_up_from_when_a_peer_is_first_seen(
    peer_admins: list[tuple[AdminApi, StatsOnly]],
) -> None:
    """The demand policy's cumulative counts: a peer's totals before it was first seen are its
    past, not a burst of arrivals now; what it counts after that is added."""
    clock = FakeClock()
    local = Local()
    local.value = Counts(busy=0, queued=0, replicas=3, arrivals=100, served=90,
                         service_seconds=4.5)
    peers = PeerCounts(local, admin_token=TOKEN, clock=clock, timeout_s=2.0)
    admin, stub = peer_admins[0]
    stub.stats_value["iris"].update(arrivals=5000, served=4990, serviceSeconds=250.0)
    peers.set_peers([f"127.0.0.1:{admin.port}"])
    try:
        await peers.refresh()
        first = peers.counts("iris")
        assert (first.arrivals, first.served, first.service_seconds) == (100, 90, 4.5)
        stub.stats_value["iris"].update(arrivals=5070, served=5060, serviceSeconds=253.5)
        await peers.refresh()
        later = peers.counts("iris")
        assert (later.arrivals, later.served) == (170, 160)
        assert later.service_seconds == pytest.approx(8.0)
    finally:
        await peers.close()
