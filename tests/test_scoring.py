"""The scoring path end to end: a real `mlfe serve` in front of real `mlfe score-server` replicas.

Covers every status code of README's "What the router does" with its body and headers, the per-replica cap under 200
concurrent clients, FIFO order out of the queue, a queued client that disconnects, and a
graceful drain. Waits poll the router's own /v1/stats with a deadline; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import EXAMPLES, Proc, free_port, spawn, start_replica, start_router

# The slow example model (its run() takes `ms` from the request; `seq` is the order run()
# calls began in, `tag` is echoed); without `ms`, it answers at once.
INSTANT = {"SLOW_RUN_MS": "0"}
KEY1 = "k1-" + "a" * 40
KEY2 = "k2-" + "b" * 40
ADMIN = "admin-token-for-tests"

ERRORS_SCRIPT = '''
import json

def init():
    pass

def run(raw_data):
    if json.loads(raw_data).get("fail"):
        raise RuntimeError("secret internal detail")
    return {"ok": True}
'''


def auth(key: str = KEY1) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def service(upstreams: list[str], **settings: Any) -> dict[str, Any]:
    return {"upstreams": upstreams, "primary_key": KEY1, "secondary_key": KEY2, **settings}


class Stats:
    def __init__(self, router: Proc) -> None:
        self.router = router
        self.url = f"http://127.0.0.1:{router.extra['admin_port']}/v1/stats"

    def get(self, name: str) -> dict[str, Any]:
        r = httpx.get(self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
        r.raise_for_status()
        stats: dict[str, Any] = r.json()["services"][name]
        return stats

    def wait(self, name: str, what: str, **expected: int) -> None:
        self.router.wait_for(
            lambda: all(self.get(name)[k] == v for k, v in expected.items()), what
        )


def router_with(tmp: Path, services: dict[str, Any], **router: Any) -> Proc:
    admin_port = free_port()
    p = start_router(
        tmp,
        {"router": {"admin_listen": f"127.0.0.1:{admin_port}", **router}, "services": services},
        env={"MLFE_ADMIN_TOKEN": ADMIN},
    )
    p.extra["admin_port"] = admin_port
    return p


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def script(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.py"
    path.write_text(text)
    return path


# ---- status codes ---------------------------------------------------------------------------


def test_success_passes_through_with_ids_and_both_keys(tmp_path: Path, procs: list[Proc]) -> None:
    rep = start_replica(tmp_path, EXAMPLES / "echo" / "score.py")
    procs.append(rep)
    router = router_with(tmp_path, {"echo": service([f"127.0.0.1:{rep.port}"])})
    procs.append(router)
    url = f"{router.url}/api/v1/service/echo/score"
    for key in (KEY1, KEY2):
        r = httpx.post(
            url, json={"data": [1]},
            headers={**auth(key), "x-ms-client-request-id": "client-1_A", "x-request-id": "spoof"},
        )
        assert r.status_code == 200
        assert r.json() == {"result": [1]}
        rid = r.headers["x-ms-request-id"]
        assert uuid.UUID(rid).version == 4
        assert r.headers["x-request-id"] == rid  # the client's x-request-id is replaced
        assert r.headers["x-ms-client-request-id"] == "client-1_A"
        assert "x-ms-run-fn-exec-ms" in r.headers  # the replica's own headers pass through
    # A client id that breaks azureml's rule is dropped, not echoed.
    r = httpx.post(url, json={}, headers={**auth(), "x-ms-client-request-id": "bad id!"})
    assert r.status_code == 200 and "x-ms-client-request-id" not in r.headers


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY1}"},
     {"Authorization": "Bearer"}],
    ids=["missing", "wrong-key", "wrong-scheme", "empty"],
)
def test_401_gives_no_hint(tmp_path: Path, procs: list[Proc], headers: dict[str, str]) -> None:
    router = router_with(tmp_path, {"echo": service(["127.0.0.1:9"])})
    procs.append(router)
    r = httpx.post(f"{router.url}/api/v1/service/echo/score", json={}, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"message": "Unauthorized"}
    assert "x-ms-request-id" in r.headers


def test_router_errors(tmp_path: Path, procs: list[Proc]) -> None:
    rep = start_replica(tmp_path, script(tmp_path, "errs", ERRORS_SCRIPT))
    procs.append(rep)
    slow = start_replica(tmp_path, EXAMPLES / "slow" / "score.py", env=INSTANT, name="slow")
    procs.append(slow)
    dead_port = free_port()  # nothing listens here
    router = router_with(
        tmp_path,
        {
            "errs": service([f"127.0.0.1:{rep.port}"]),
            "slow": service([f"127.0.0.1:{slow.port}"], scoring_timeout_ms=300),
            "dead": service([f"127.0.0.1:{dead_port}"]),
        },
    )
    procs.append(router)
    base = f"{router.url}/api/v1/service"

    r = httpx.post(f"{base}/nope/score", json={}, headers=auth())
    assert (r.status_code, r.json()) == (404, {"message": "Service nope not found"})
    r = httpx.put(f"{base}/errs/score", json={}, headers=auth())
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST, OPTIONS"

    # The replica's own statuses pass through untouched, body included.
    r = httpx.post(f"{base}/errs/score", content=b"\xff not utf-8", headers={
        **auth(), "content-type": "text/plain"})
    assert r.status_code == 400 and "message" in r.json()
    r = httpx.post(f"{base}/errs/score", json={"fail": True}, headers=auth())
    assert r.status_code == 500
    assert "secret internal detail" not in r.text
    assert r.headers["x-ms-run-function-failed"] == "True"

    # scoring_timeout_ms -> 504.
    t0 = time.monotonic()
    r = httpx.post(f"{base}/slow/score", json={"ms": 3000}, headers=auth(), timeout=10)
    assert r.status_code == 504
    assert r.json()["message"].startswith("Replica did not reply within scoring_timeout_ms")
    assert time.monotonic() - t0 < 2.5

    # Connection refused -> 502; the only replica is never ejected on a failure (the panic
    # threshold), so the next request is tried too, and fails as fast: no wait, no 503.
    for _ in range(2):
        r = httpx.post(f"{base}/dead/score", json={}, headers=auth())
        assert (r.status_code, r.json()) == (
            502, {"message": "Replica closed connection before replying"})


def test_replica_that_comes_back_is_probed_into_rotation(tmp_path: Path, procs: list[Proc]) -> None:
    port = free_port()
    router = router_with(tmp_path, {"late": service([f"127.0.0.1:{port}"])})
    procs.append(router)
    url = f"{router.url}/api/v1/service/late/score"
    assert httpx.post(url, json={}, headers=auth()).status_code == 502
    assert httpx.post(url, json={}, headers=auth()).status_code == 502  # still tried: the last
    rep = spawn(["score-server", "--entry-script", str(EXAMPLES / "echo" / "score.py"),
                 "--port", str(port)], tmp_path / "late.log", port)
    procs.append(rep)
    rep.wait_for(lambda: rep.get_ok("/"), "replica healthy")
    router.wait_for(
        lambda: httpx.post(url, json={}, headers=auth()).status_code == 200,
        "replica probed back into rotation",
    )


def test_queue_wait_gives_503_overloaded(tmp_path: Path, procs: list[Proc]) -> None:
    rep = start_replica(tmp_path, EXAMPLES / "slow" / "score.py", env=INSTANT)
    procs.append(rep)
    router = router_with(
        tmp_path, {"svc": service([f"127.0.0.1:{rep.port}"], max_request_wait_time=200)}
    )
    procs.append(router)
    stats = Stats(router)
    url = f"{router.url}/api/v1/service/svc/score"

    async def go() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            busy = asyncio.create_task(c.post(url, json={"ms": 2000}, headers=auth()))
            await asyncio.to_thread(stats.wait, "svc", "replica busy", busy=1)
            t0 = time.monotonic()
            r = await c.post(url, json={"ms": 0}, headers=auth())
            waited = time.monotonic() - t0
            assert r.status_code == 503
            assert r.json() == {"message": "Too many requests for service svc (overloaded)"}
            assert r.headers["retry-after"] == "1"
            assert 0.19 <= waited < 1.5  # waited max_request_wait_time, not the 2 s
            assert (await busy).status_code == 200

    asyncio.run(go())


def test_queue_full_is_refused_at_once(tmp_path: Path, procs: list[Proc]) -> None:
    rep = start_replica(tmp_path, EXAMPLES / "slow" / "score.py", env=INSTANT)
    procs.append(rep)
    router = router_with(tmp_path, {"svc": service(
        [f"127.0.0.1:{rep.port}"], max_request_wait_time=20000, max_queue_length=1)})
    procs.append(router)
    stats = Stats(router)
    url = f"{router.url}/api/v1/service/svc/score"

    async def go() -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            first = asyncio.create_task(c.post(url, json={"ms": 1500}, headers=auth()))
            await asyncio.to_thread(stats.wait, "svc", "busy", busy=1)
            second = asyncio.create_task(c.post(url, json={"ms": 0}, headers=auth()))
            await asyncio.to_thread(stats.wait, "svc", "queued", queued=1)
            r = await c.post(url, json={}, headers=auth())
            assert r.status_code == 503 and "overloaded" in r.json()["message"]
            assert (await first).status_code == 200
            assert (await second).status_code == 200

    asyncio.run(go())


# ---- admission under load ---------------------------------------------------------------------


def test_cap_holds_under_200_concurrent_clients(tmp_path: Path, procs: list[Proc]) -> None:
    cap = 2
    reps = [
        start_replica(tmp_path, EXAMPLES / "slow" / "score.py",
                      env={"WORKER_COUNT": "8", "SLOW_RUN_MS": "20"}, name=f"slow{i}")
        for i in range(2)
    ]
    procs.extend(reps)
    router = router_with(tmp_path, {"slow": service(
        [f"127.0.0.1:{r.port}" for r in reps],
        replica_max_concurrent_requests=cap, max_request_wait_time=60000)})
    procs.append(router)
    url = f"{router.url}/api/v1/service/slow/score"

    async def go() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            return await asyncio.gather(
                *(c.post(url, json={"ms": 20}, headers=auth()) for _ in range(200))
            )

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 200
    by_pid: dict[int, int] = {}
    for r in responses:
        body = r.json()
        by_pid[body["pid"]] = max(by_pid.get(body["pid"], 0), body["max_in_flight"])
    assert len(by_pid) == 2  # both replicas served
    # Each replica saw at most `cap` at once (and the cap was used, not just respected).
    assert max(by_pid.values()) == cap


def test_queue_is_fifo(tmp_path: Path, procs: list[Proc]) -> None:
    rep = start_replica(tmp_path, EXAMPLES / "slow" / "score.py", env=INSTANT)
    procs.append(rep)
    router = router_with(tmp_path, {"svc": service(
        [f"127.0.0.1:{rep.port}"], max_request_wait_time=30000)})
    procs.append(router)
    stats = Stats(router)
    url = f"{router.url}/api/v1/service/svc/score"

    async def go() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=60) as c:
            first = asyncio.create_task(c.post(url, json={"ms": 3000, "tag": "first"},
                                               headers=auth()))
            await asyncio.to_thread(stats.wait, "svc", "busy", busy=1)
            tasks = []
            for i in range(6):
                tasks.append(asyncio.create_task(
                    c.post(url, json={"ms": 0, "tag": i}, headers=auth())))
                await asyncio.to_thread(stats.wait, "svc", f"{i} queued", queued=i + 1)
            results = [r.json() for r in await asyncio.gather(first, *tasks)]
            return results

    results = asyncio.run(go())
    order = [r["tag"] for r in sorted(results, key=lambda r: r["seq"])]
    assert order == ["first", 0, 1, 2, 3, 4, 5]


def test_disconnected_waiter_frees_its_place(tmp_path: Path, procs: list[Proc]) -> None:
    rep = start_replica(tmp_path, EXAMPLES / "slow" / "score.py", env=INSTANT)
    procs.append(rep)
    router = router_with(tmp_path, {"svc": service(
        [f"127.0.0.1:{rep.port}"], max_request_wait_time=30000, max_queue_length=1)})
    procs.append(router)
    stats = Stats(router)
    url = f"{router.url}/api/v1/service/svc/score"
    body = b'{"ms": 0, "tag": "gone"}'

    async def go() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            first = asyncio.create_task(c.post(url, json={"ms": 1000}, headers=auth()))
            await asyncio.to_thread(stats.wait, "svc", "busy", busy=1)
            # A raw client queues, then hangs up.
            s = socket.create_connection(("127.0.0.1", router.port))
            s.sendall(
                b"POST /api/v1/service/svc/score HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + KEY1.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            await asyncio.to_thread(stats.wait, "svc", "queued", queued=1)
            s.close()
            await asyncio.to_thread(stats.wait, "svc", "left the queue", queued=0)
            # Its place is free: the next one queues (not "queue full") and is served.
            r = await c.post(url, json={"ms": 0, "tag": "next"}, headers=auth())
            assert r.status_code == 200 and r.json()["tag"] == "next"
            assert (await first).status_code == 200
            # The hung-up request never reached the replica.
            assert r.json()["seq"] == 1

    asyncio.run(go())


def test_graceful_drain_loses_no_accepted_request(tmp_path: Path, procs: list[Proc]) -> None:
    rep = start_replica(tmp_path, EXAMPLES / "slow" / "score.py", env={"WORKER_COUNT": "4"})
    procs.append(rep)
    router = router_with(tmp_path, {"svc": service(
        [f"127.0.0.1:{rep.port}"], replica_max_concurrent_requests=2,
        max_request_wait_time=30000)})
    procs.append(router)
    stats = Stats(router)
    url = f"{router.url}/api/v1/service/svc/score"

    async def go() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:
            tasks = [asyncio.create_task(c.post(url, json={"ms": 600}, headers=auth()))
                     for _ in range(5)]
            await asyncio.to_thread(stats.wait, "svc", "in flight and queued", busy=2, queued=3)
            router.signal(signal.SIGTERM)
            return [r.status_code for r in await asyncio.gather(*tasks)]

    assert asyncio.run(go()) == [200] * 5
    assert router.wait_exit() == 0
