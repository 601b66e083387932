"""Three `mlfe serve` router pods against the fake API server share one state (the Secret
`mlfe-keys`): an admin write on one pod is refused or stored, and once stored it is applied on
every pod; a write survives the pod that took it; concurrent writes lose nothing. A pod that
replaces the killed Lease holder, under a new name or restarted in place, serves within seconds
of the new slot broker (not after the old broker's whole hold time)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from aiohttp import web

from tests.fake_kube_api import FakeKubeApi, Seen, ep, fake_cluster
from tests.support import Proc, free_port, spawn

ADMIN = "admin-token-for-tests"
NS = "mlfe"
SECRET = "mlfe-keys"
APPLY_WITHIN_S = 1.0  # the bound: every pod applies a stored change within 1 s
LEASE = "mlfe-autoscaler"
ADMIN_SERVICE = "mlfe-router-admin"
# A pod that joins right after the Lease holder died serves within this of the new broker (the
# broker stops waiting for the dead pod's slots once it has left the router Service's slices
# for the grace time, 2 s; without that, the old broker's hold time: 32 s).
SERVES_WITHIN_S = 8.0


@contextlib.asynccontextmanager
async def echo_replica() -> AsyncIterator[int]:
    """A replica on loopback that answers every score with 200."""
    async def score(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", score)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        await runner.cleanup()


class Pod:
    def __init__(self, tmp: Path, fake: FakeKubeApi, name: str, replica_port: int,
                 router: dict[str, Any] | None = None, echo: dict[str, Any] | None = None,
                 iris: dict[str, Any] | None = None) -> None:
        self.name = name
        self.port, self.admin_port = free_port(), free_port()
        cfg = {
            "router": {"listen": f"127.0.0.1:{self.port}",
                       "admin_listen": f"127.0.0.1:{self.admin_port}",
                       "state_dir": str(tmp / f"{name}-state"), "access_log": False,
                       # Pods on one host: the slot broker (on the Lease holder) on any port.
                       "coordination": {"listen": "127.0.0.1:0"},
                       **(router or {})},
            "services": {
                "iris": {"kubernetes": {"namespace": "models", "deployment": "iris"},
                         "autoscale_min_replicas": 1, "autoscale_refresh_seconds": 0.2,
                         "autoscale_scale_down_window_seconds": 1, **(iris or {})},
                "echo": {"upstreams": [f"127.0.0.1:{replica_port}"], **(echo or {})},
            },
            "endpoints": {"myep": {"auth_enabled": False, "versions": {
                "v1": {"service": "echo", "traffic_percentile": 100, "is_default": True},
                "v2": {"service": "echo", "traffic_percentile": 0}}}},
        }
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.proc: Proc = spawn(
            ["serve", "--config", str(path)], tmp / f"{name}.log", self.port,
            {"MLFE_ADMIN_TOKEN": ADMIN, "KUBECONFIG": str(fake.kubeconfig()),
             "POD_NAME": name})
        self.http = httpx.AsyncClient(timeout=5)

    async def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.request(method, f"http://127.0.0.1:{self.admin_port}{path}",
                                       headers={"Authorization": f"Bearer {ADMIN}"}, **kw)

    async def score(self, key: str) -> int:
        r = await self.http.post(f"http://127.0.0.1:{self.port}/api/v1/service/echo/score",
                                 headers={"Authorization": f"Bearer {key}"}, json={})
        return r.status_code

    async def ready(self) -> bool:
        try:
            r = await self.http.get(f"http://127.0.0.1:{self.port}/-/ready")
            if r.status_code != 200:
                return False
            return (await self.admin("GET", "/v1/services")).status_code == 200
        except httpx.TransportError:
            return False

    def publish(self, fake: FakeKubeApi) -> None:
        """List this pod in the router's admin Service, as the endpoint controller would (one
        slice per pod: on one host each pod has its own admin port)."""
        fake.put_slice(NS, f"{ADMIN_SERVICE}-{self.name}", ADMIN_SERVICE,
                       [ep("127.0.0.1", pod=self.name)], ports=(("admin", self.admin_port),))

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.signal(sig)
        code: int = await asyncio.to_thread(self.proc.wait_exit)
        await self.http.aclose()
        return code


async def until(what: str, condition: Callable[[], Any], pods: list[Pod],
                within_s: float) -> None:
    """Poll the async ``condition`` until true, with a deadline; every pod must stay alive."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await condition():
        for p in pods:
            assert p.proc.alive(), p.proc.log()[-3000:]
        assert loop.time() < deadline, f"timed out ({within_s} s) waiting for {what}"
        await asyncio.sleep(0.02)


def stored_keys(fake: FakeKubeApi) -> dict[str, dict[str, str]]:
    keys: dict[str, dict[str, str]] = orjson.loads(fake.secret(NS, SECRET)["keys.json"])
    return keys


def holder(fake: FakeKubeApi) -> str:
    lease = fake.lease(NS, LEASE) or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


def lease_holder(fake: FakeKubeApi, pods: list[Pod]) -> Pod:
    return next(p for p in pods if holder(fake).startswith(p.name + "_"))


async def start_pods(tmp: Path, fake: FakeKubeApi, replica_port: int, n: int,
                     publish: bool = False, **kw: Any) -> list[Pod]:
    pods = [Pod(tmp, fake, f"mlfe-router-{i}", replica_port, **kw) for i in range(n)]
    for p in pods if publish else ():
        p.publish(fake)
    try:
        await until("every pod ready", lambda: _all(p.ready() for p in pods), pods, 60)
    except BaseException:
        for p in pods:
            await p.stop(signal.SIGKILL)
        raise
    return pods


async def _accepts(pod: Pod, key: str) -> bool:
    return await pod.score(key) == 200


async def _all(checks: Any) -> bool:
    return all(await asyncio.gather(*checks))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeKubeApi, int]]:
    async with fake_cluster(tmp_path, allow_loopback=True) as fake, \
            echo_replica() as replica_port:
        fake.put_deployment("models", "iris", replicas=1)
        fake.put_secret(NS, SECRET, {"admin-token": ADMIN.encode()})  # empty state: filled in
        yield fake, replica_port


async def test_three_pods_share_keys_endpoints_and_survive_a_kill(
        tmp_path: Path, cluster: tuple[FakeKubeApi, int]) -> None:
    fake, replica_port = cluster
    pods = await start_pods(tmp_path, fake, replica_port, 3, publish=True)
    try:
        # The keys one pod generated for `echo` (the Secret was empty) are every pod's keys.
        keys = stored_keys(fake)["echo"]
        old = keys["primaryKey"]
        for p in pods:
            assert (await p.admin("GET", "/v1/services/echo/keys")).json()["primaryKey"] == old
            assert await p.score(old) == 200
        assert fake.secret(NS, SECRET)["admin-token"] == ADMIN.encode()  # left as it was

        # regen-key on pod 0: stored before the answer; on all three within 1 s.
        r = await pods[0].admin("POST", "/v1/services/echo/regen-key",
                                json={"keyType": "Primary"})
        assert r.status_code == 200, r.text
        new = r.json()["primaryKey"]
        assert stored_keys(fake)["echo"]["primaryKey"] == new  # acknowledged once stored

        async def everywhere() -> bool:
            return await _all([_refused_and_accepted(p, old, new) for p in pods])

        await until("the new key on every pod", everywhere, pods, APPLY_WITHIN_S)

        # An endpoint's traffic, changed on pod 1, applied on all three.
        for version, share in (("v1", 0), ("v2", 100)):
            r = await pods[1].admin("PATCH", f"/v1/endpoints/myep/versions/{version}",
                                    json={"trafficPercentile": share})
            assert r.status_code == 200, r.text

        async def traffic_everywhere() -> bool:
            got = [(await p.admin("GET", "/v1/endpoints/myep")).json() for p in pods]
            return all(g["versions"]["v2"]["trafficPercentile"] == 100 and
                       g["versions"]["v1"]["trafficPercentile"] == 0 for g in got)

        await until("the traffic change on every pod", traffic_everywhere, pods,
                    APPLY_WITHIN_S)

        # kill -9 of the pod that took the write (the Lease holder, which runs the slot broker):
        # the others keep the write; a pod that replaces it (a new name, as a Deployment's
        # replacement pod has) has it, and serves within seconds of the new broker.
        await until("a Lease holder", lambda: _true(bool(holder(fake))), pods, 30)
        leader = lease_holder(fake, pods)
        r = await leader.admin("POST", "/v1/services/echo/regen-key",
                               json={"keyType": "Secondary"})
        assert r.status_code == 200, r.text
        secondary = r.json()["secondaryKey"]
        assert await leader.stop(signal.SIGKILL) == -signal.SIGKILL
        fake.delete_slice(NS, f"{ADMIN_SERVICE}-{leader.name}")  # its Pod object is deleted
        replacement = Pod(tmp_path, fake, "mlfe-router-3", replica_port)
        replacement.publish(fake)
        pods[pods.index(leader)] = replacement
        # Ready once it has joined the new Lease holder's broker (after the Lease expired).
        await until("the replacement pod ready", replacement.ready, pods, 60)

        async def keys_everywhere() -> bool:
            return await _all([_accepts(p, secondary) for p in pods] +
                              [_accepts(p, new) for p in pods])

        await until("both keys accepted on every pod", keys_everywhere, pods, SERVES_WITHIN_S)
        for p in pods:
            ep = (await p.admin("GET", "/v1/endpoints/myep")).json()
            assert ep["versions"]["v2"]["trafficPercentile"] == 100
    finally:
        codes = [await p.stop() for p in pods]
    assert codes == [0, 0, 0], [p.proc.log()[-2000:] for p in pods]


async def test_a_lease_holder_restarted_in_place_serves_again_within_seconds(
        tmp_path: Path, cluster: tuple[FakeKubeApi, int]) -> None:
    """kill -9 of the Lease holder's container, restarted in its pod (same name, still listed):
    it rejoins the new broker holding nothing, which ends the broker's wait for it."""
    fake, replica_port = cluster
    pods = await start_pods(tmp_path, fake, replica_port, 3, publish=True)
    try:
        key = stored_keys(fake)["echo"]["primaryKey"]
        await until("a Lease holder", lambda: _true(bool(holder(fake))), pods, 30)
        leader = lease_holder(fake, pods)
        assert await leader.stop(signal.SIGKILL) == -signal.SIGKILL
        restarted = Pod(tmp_path, fake, leader.name, replica_port)
        restarted.publish(fake)  # the same pod, its endpoint updated (here: a new port)
        pods[pods.index(leader)] = restarted
        await until("the restarted pod ready", restarted.ready, pods, 60)
        await until("every pod serving", lambda: _all([_accepts(p, key) for p in pods]), pods,
                    SERVES_WITHIN_S)
    finally:
        codes = [await p.stop() for p in pods]
    assert codes == [0, 0, 0], [p.proc.log()[-2000:] for p in pods]


async def _true(value: bool) -> bool:
    return value


async def _refused_and_accepted(pod: Pod, old: str, new: str) -> bool:
    return await pod.score(old) == 401 and await pod.score(new) == 200


async def test_a_write_that_lost_a_race_is_refused_and_nothing_is_lost(
        tmp_path: Path, cluster: tuple[FakeKubeApi, int]) -> None:
    fake, replica_port = cluster
    pods = await start_pods(tmp_path, fake, replica_port, 2)
    try:
        # Another writer changes the Secret between pod 0's read and its write: pod 0's write
        # is refused (409, nothing stored), and pod 0 takes the other writer's state.
        other = dict(stored_keys(fake))
        other["echo"] = {**other["echo"], "secondaryKey": "set-by-another-writer-0123456789"}

        def race(seen: Seen) -> None:
            if seen.method == "PUT" and "/secrets/" in seen.path and fake.before is race:
                fake.before = None
                files = fake.secret(NS, SECRET)
                fake.put_secret(NS, SECRET, {**files, "keys.json": orjson.dumps(other)})

        fake.before = race
        r = await pods[0].admin("POST", "/v1/services/echo/regen-key",
                                json={"keyType": "Primary"})
        assert r.status_code == 409, r.text
        assert "another admin write" in r.json()["message"]
        assert stored_keys(fake) == other
        for p in pods:
            await until("the other writer's key", lambda p=p: _accepts(  # type: ignore[misc]
                p, other["echo"]["secondaryKey"]), pods, APPLY_WITHIN_S)

        # Two admins at once, on two pods: each is stored or refused; none is lost.
        r0, r1 = await asyncio.gather(
            pods[0].admin("POST", "/v1/services/echo/regen-key", json={"keyType": "Primary"}),
            pods[1].admin("POST", "/v1/services/echo/regen-key",
                          json={"keyType": "Secondary"}))
        assert {r0.status_code, r1.status_code} <= {200, 409}
        assert 200 in (r0.status_code, r1.status_code)
        final = stored_keys(fake)["echo"]
        assert (final["primaryKey"] == r0.json().get("primaryKey")) == (r0.status_code == 200)
        assert (final["secondaryKey"] == r1.json().get("secondaryKey")) == (
            r1.status_code == 200)
    finally:
        codes = [await p.stop() for p in pods]
    assert codes == [0, 0], [p.proc.log()[-2000:] for p in pods]


async def test_admin_writes_are_refused_while_the_api_server_is_unreachable(
        tmp_path: Path, cluster: tuple[FakeKubeApi, int]) -> None:
    fake, replica_port = cluster
    pods = await start_pods(tmp_path, fake, replica_port, 1)
    try:
        key = stored_keys(fake)["echo"]["primaryKey"]
        fake.fail("PUT", "/secrets/", 503, times=1)
        r = await pods[0].admin("POST", "/v1/services/echo/regen-key",
                                json={"keyType": "Primary"})
        assert r.status_code == 503, r.text
        assert "cannot be written now" in r.json()["message"]
        assert stored_keys(fake)["echo"]["primaryKey"] == key  # nothing changed
        assert await pods[0].score(key) == 200  # and it keeps serving with the state it has
    finally:
        assert await pods[0].stop() == 0, pods[0].proc.log()[-2000:]
