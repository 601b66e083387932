"""Exact per-replica caps across router pods, by default: three `mlfe serve` pods against the
fake API server, with no coordination configured beyond where a broker may listen. The Lease
holder runs the slot broker and the pods find it through the Lease; under 200 concurrent
clients spread over the three pods, a replica that counts its own concurrency never sees more
than its cap, also while the Lease holder is killed and another pod takes over."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from aiohttp import web

from tests.fake_kube_api import ep, fake_cluster
from tests.support import post_many
from tests.test_kube_shared_state import ADMIN, ADMIN_SERVICE, NS, SECRET, Pod, start_pods, until

CAP = 4
LEASE = "mlfe-autoscaler"
BROKER_ANNOTATION = "mlfe.io/slot-broker"


class CountingReplica:
    """A replica that records how many requests it has in flight at once."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_seen = 0
        self.served = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.in_flight += 1
        self.max_seen = max(self.max_seen, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        self.served += 1
        return web.json_response({"ok": True})


@contextlib.asynccontextmanager
async def counting_replica(delay_s: float = 0.02,
                           ) -> AsyncIterator[tuple[CountingReplica, int]]:
    rep = CountingReplica(delay_s)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rep.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    try:
        yield rep, server.sockets[0].getsockname()[1]
    finally:
        await runner.cleanup()


async def test_the_cap_holds_across_three_pods_and_a_leader_kill(tmp_path: Path) -> None:
    async with fake_cluster(tmp_path, allow_loopback=True) as fake, \
            counting_replica() as (rep, rep_port):
        fake.put_deployment("models", "iris", replicas=1)
        fake.put_secret(NS, SECRET, {"admin-token": ADMIN.encode()})
        pods = await start_pods(
            tmp_path, fake, rep_port, 3, publish=True,
            router={"coordination": {"listen": "127.0.0.1:0", "grace_seconds": 1}},
            echo={"auth_enabled": False, "replica_max_concurrent_requests": CAP,
                  "max_request_wait_time": 20000})
        path = "/api/v1/service/echo/score"
        try:
            def holder() -> str:
                lease = fake.lease(NS, LEASE) or {}
                return str((lease.get("spec") or {}).get("holderIdentity") or "")

            async def advertised() -> bool:
                lease = fake.lease(NS, LEASE) or {}
                value = ((lease.get("metadata") or {}).get("annotations") or {}).get(
                    BROKER_ANNOTATION, "")
                return bool(holder()) and value.startswith(holder() + "@")

            await until("the Lease holder's broker advertised", advertised, pods, 30)

            async def load(pod: Pod, n: int) -> list[int]:
                return await post_many(pod.port, path, n, {}, concurrency=67)

            statuses = [s for batch in await asyncio.gather(*(load(p, 67 * 3) for p in pods))
                        for s in batch]
            assert set(statuses) == {200}, sorted(set(statuses))
            assert rep.max_seen == CAP  # the cap is reached, and never passed

            # Kill the Lease holder while the other two are under load.
            leader = next(p for p in pods if holder().startswith(p.name + "_"))
            others = [p for p in pods if p is not leader]
            before = rep.served
            loads = [asyncio.ensure_future(load(p, 100 * 8)) for p in others]
            await until("load on the followers", lambda: _true(rep.served > before + 50),
                        others, 30)
            assert await leader.stop(signal.SIGKILL) == -signal.SIGKILL
            fake.delete_slice(NS, f"{ADMIN_SERVICE}-{leader.name}")  # its Pod is deleted
            pods.remove(leader)

            async def taken_over() -> bool:
                return bool(holder()) and not holder().startswith(leader.name + "_") and (
                    await advertised())

            await until("another pod holds the Lease and runs the broker", taken_over, pods,
                        40)
            during = [s for batch in await asyncio.gather(*loads) for s in batch]
            assert set(during) <= {200, 503} and during.count(200) > len(during) // 2
            assert rep.max_seen == CAP
        finally:
            for p in pods:
                await p.stop()


async def _true(value: bool) -> bool:
    return value


async def test_the_leader_scales_on_the_load_of_every_pod(tmp_path: Path) -> None:
    """Load sent to the two followers only: the Lease holder, which serves none of it, scales
    the service up on the sum its broker hears from every pod."""
    async with fake_cluster(tmp_path, allow_loopback=True) as fake, \
            counting_replica(delay_s=0.05) as (rep, rep_port):
        fake.put_deployment("models", "iris", replicas=1)
        fake.put_slice("models", "iris-a", "iris", [ep("127.0.0.1")], ports=(("http", rep_port),))
        fake.put_secret(NS, SECRET, {"admin-token": ADMIN.encode()})
        pods = await start_pods(
            tmp_path, fake, rep_port, 3,
            router={"coordination": {"listen": "127.0.0.1:0", "grace_seconds": 1}},
            iris={"auth_enabled": False, "replica_max_concurrent_requests": 1,
                  "max_request_wait_time": 20000, "autoscale_max_replicas": 4})
        done = asyncio.Event()
        clients: list[asyncio.Task[None]] = []
        try:
            lease = fake.lease(NS, LEASE) or {}
            holder = str((lease.get("spec") or {}).get("holderIdentity") or "")
            leader = next(p for p in pods if holder.startswith(p.name + "_"))
            followers = [p for p in pods if p is not leader]

            async def client(pod: Pod) -> None:
                async with httpx.AsyncClient(timeout=30) as http:
                    while not done.is_set():
                        r = await http.post(
                            f"http://127.0.0.1:{pod.port}/api/v1/service/iris/score", json={})
                        assert r.status_code == 200, r.text

            clients = [asyncio.ensure_future(client(p)) for p in followers for _ in range(4)]

            async def scaled_up() -> bool:
                for c in clients:
                    if c.done():
                        c.result()  # a client's failure, raised here
                return bool(fake.deployment("models", "iris")["spec"]["replicas"] > 1)

            await until("the leader scaling the followers' load", scaled_up, pods, 30)
            stats = (await leader.admin("GET", "/v1/stats")).json()["services"]["iris"]
            assert stats["completed"] == 0  # the leader itself served none of it
            assert rep.max_seen == 1  # and the cap held across the pods meanwhile
        finally:
            done.set()
            await asyncio.gather(*clients, return_exceptions=True)
            for p in pods:
                await p.stop()
