"""Faults under load, with real processes on loopback: a replica SIGKILLed under 200 clients,
SIGTERM to `mlfe serve` with 2 worker processes under load, and admin writes and key rotation
while 2 workers serve.

The clients are raw asyncio sockets (httpx is too slow to keep 200 connections busy on a small
box), so every outcome is seen as it is on the wire: a complete response, a response cut off,
or a connection closed or reset before any byte of a response.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.support import EXAMPLES, Proc, free_port, keys_of, start_replica, start_router
from tests.test_workers import worker_pids

ADMIN = "admin-token-for-fault-load-tests"
CLIENTS = 200
BOUND_S = 25  # every scenario ends within this, or the test fails (never hangs)


# ---- a raw HTTP/1.1 client that tells every outcome apart ------------------------------------


@dataclass
class Outcome:
    sent: float  # time.monotonic() when the request was written
    done: float
    status: int  # 0: closed or reset before any byte of a response
    partial: bool = False  # some bytes of a response, then the connection went
    close: bool = False  # the response said Connection: close
    body: bytes = b""
    connected: bool = True  # False: the connection itself was refused


def request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
                   ) -> Outcome:
    sent = time.monotonic()
    got = b""
    try:
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        got = head
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(hdrs.get("content-length", "0")))
    except asyncio.IncompleteReadError as e:
        return Outcome(sent, time.monotonic(), 0, partial=bool(got or e.partial))
    except OSError:
        return Outcome(sent, time.monotonic(), 0, partial=bool(got))
    return Outcome(sent, time.monotonic(), status, close=hdrs.get("connection") == "close",
                   body=body)


async def open_conn(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_loop(port: int, raw: bytes, outcomes: list[Outcome], stop: asyncio.Event
                      ) -> None:
    """One client: requests back to back on a keep-alive connection until `stop`; a new
    connection after Connection: close or a failure."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while not stop.is_set():
            if conn is None:
                conn = await open_conn(port)
            out = await exchange(*conn, raw)
            outcomes.append(out)
            if out.status == 0 or out.close:
                conn[1].close()
                conn = None
    finally:
        if conn is not None:
            conn[1].close()


async def until(condition: Callable[[], bool], what: str, within: float = BOUND_S) -> None:
    """Poll `condition` (cheap, in-process) until true, with a deadline."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def workers_serving(router: Proc) -> int:
    """Workers that logged "scoring on": each does once it is in its supervisor's broker and
    has its state (the supervisor's own "mlfe: scoring on ..." line is not one)."""
    return sum(1 for line in router.log().splitlines()
               if "scoring on http" in line and not line.startswith("mlfe:"))


def admin(port: int, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"http://127.0.0.1:{port}{path}",
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30, **kw)


# ---- a replica SIGKILLed under 200 clients ---------------------------------------------------

CAP = 20
WAIT_MS = 5000
SCORING_MS = 5000


def test_a_replica_killed_under_load_fails_only_its_in_flight_requests(tmp_path: Path) -> None:
    reps = [start_replica(tmp_path, EXAMPLES / "slow" / "score.py",
                          env={"WORKER_COUNT": str(CAP)}, name=f"slow{i}") for i in range(2)]
    router = start_router(tmp_path, {"services": {"slow": {
        "upstreams": [f"127.0.0.1:{r.port}" for r in reps], "auth_enabled": False,
        "replica_max_concurrent_requests": CAP, "max_request_wait_time": WAIT_MS,
        "scoring_timeout_ms": SCORING_MS, "max_queue_length": 10_000}}})
    victim, survivor = reps
    raw = request("/api/v1/service/slow/score", b'{"ms": 100}')
    outcomes: list[Outcome] = []

    async def scenario() -> tuple[float, float]:
        stop = asyncio.Event()
        clients = [asyncio.create_task(closed_loop(router.port, raw, outcomes, stop))
                   for _ in range(CLIENTS)]
        try:
            async with asyncio.timeout(BOUND_S):
                # Both replicas full (200 clients, 2 x CAP slots), then the kill.
                await until(lambda: {pid(o) for o in outcomes[-100:]} == {victim.proc.pid,
                                                                         survivor.proc.pid}
                            and len(outcomes) >= 2 * CLIENTS, "load on both replicas")
                t_kill = time.monotonic()
                victim.proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(victim.proc.wait, 10)
                t_dead = time.monotonic()
                after = len(outcomes)
                await until(lambda: len(outcomes) >= after + 2 * CLIENTS, "load after the kill")
        finally:
            stop.set()
            async with asyncio.timeout(BOUND_S):
                await asyncio.gather(*clients)
        return t_kill, t_dead

    try:
        t_kill, t_dead = asyncio.run(scenario())
    finally:
        router.stop()
        for r in reps:
            r.stop()
    statuses = [o.status for o in outcomes]
    assert not [o for o in outcomes if o.status == 0 or o.partial], "a client connection broke"
    assert set(statuses) <= {200, 502}, sorted(set(statuses))
    failed = [o for o in outcomes if o.status == 502]
    # Only what was on the killed replica: at most its CAP slots, all sent before it died (a
    # request after that is never sent to it: it is out of rotation at its first failure).
    assert 1 <= len(failed) <= CAP, len(failed)
    assert all(o.sent < t_dead for o in failed)
    assert all(o.done >= t_kill for o in failed)
    # Every request answered within its deadlines (queue wait + scoring timeout + slack).
    assert max(o.done - o.sent for o in outcomes) < (WAIT_MS + SCORING_MS) / 1000 + 2
    # After the death, the survivor answers everything.
    late = [o for o in outcomes if o.sent > t_dead and o.status == 200]
    assert len(late) >= CLIENTS and {pid(o) for o in late} == {survivor.proc.pid}


def pid(o: Outcome) -> int | None:
    if o.status != 200:
        return None
    found: int = orjson.loads(o.body)["pid"]
    return found


# ---- SIGTERM to `mlfe serve` with 2 workers under load ---------------------------------------

DRAIN_S = 20.0


def test_sigterm_with_two_workers_answers_every_accepted_request(tmp_path: Path) -> None:
    """Accepted: the router counted the request (busy + queued on the supervisor's
    /v1/stats, summed over both workers) before the SIGTERM, or answered any byte of it. Every
    accepted request is answered in full with 200: draining refuses no scoring request it read
    (only readiness turns 503). A request whose connection was refused, or closed or reset
    before any byte of an answer (a listener that closed with it in its accept queue), was
    never accepted; a response cut off midway would be a failure."""
    reps = [start_replica(tmp_path, EXAMPLES / "slow" / "score.py",
                          env={"WORKER_COUNT": str(CAP)}, name=f"slow{i}") for i in range(2)]
    admin_port = free_port()
    router = start_router(tmp_path, {
        "router": {"workers": 2, "admin_listen": f"127.0.0.1:{admin_port}",
                   "drain_timeout_s": DRAIN_S},
        "services": {"slow": {
            "upstreams": [f"127.0.0.1:{r.port}" for r in reps], "auth_enabled": False,
            "replica_max_concurrent_requests": CAP, "max_request_wait_time": 15_000,
            "scoring_timeout_ms": 10_000, "max_queue_length": 10_000}},
    }, env={"MLFE_ADMIN_TOKEN": ADMIN})
    router.wait_for(lambda: workers_serving(router) == 2, "both workers listening")
    # 200 requests of 0.6 s on 2 x CAP slots: 3 s of work, all of it in the router at SIGTERM.
    accepted_raw = request("/api/v1/service/slow/score", b'{"ms": 600}')
    late_raw = request("/api/v1/service/slow/score", b'{"ms": 10}')

    def counted() -> int:
        s = admin(admin_port, "GET", "/v1/stats").json()["services"]["slow"]
        return int(s["busy"]) + int(s["queued"])

    async def one_accepted() -> Outcome:
        reader, writer = await open_conn(router.port)
        try:
            return await exchange(reader, writer, accepted_raw)
        finally:
            writer.close()

    async def late_load(late: list[Outcome], stop: asyncio.Event) -> None:
        """Fresh connections during the drain, until the port refuses them."""
        while not stop.is_set():
            t = time.monotonic()
            try:
                reader, writer = await open_conn(router.port)
            except OSError:
                late.append(Outcome(t, time.monotonic(), 0, connected=False))
                await asyncio.sleep(0.01)  # pacing the retries, not a check
                continue
            try:
                late.append(await exchange(reader, writer, late_raw))
            finally:
                writer.close()

    async def scenario() -> tuple[list[Outcome], list[Outcome], float]:
        async with asyncio.timeout(BOUND_S):
            accepted = [asyncio.create_task(one_accepted()) for _ in range(CLIENTS)]
            await until(lambda: counted() == CLIENTS, "all 200 requests counted by the router",
                        within=15)
            t_term = time.monotonic()
            router.signal(signal.SIGTERM)
            late: list[Outcome] = []
            stop = asyncio.Event()
            lates = [asyncio.create_task(late_load(late, stop)) for _ in range(8)]
            results = await asyncio.gather(*accepted)
            code = await asyncio.to_thread(router.wait_exit, DRAIN_S + 5)
            t_exit = time.monotonic()
            stop.set()
            await asyncio.gather(*lates)
            assert code == 0, router.log()[-3000:]
            return results, late, t_exit - t_term

    try:
        results, late, took = asyncio.run(scenario())
    finally:
        router.stop()
        for r in reps:
            r.stop()
    assert [o.status for o in results] == [200] * CLIENTS, sorted({o.status for o in results})
    # The second half to finish (1.5 s of work after the SIGTERM at least) was answered while
    # draining: with Connection: close.
    assert all(o.close for o in sorted(results, key=lambda o: o.done)[CLIENTS // 2:])
    assert took < DRAIN_S
    assert not [o for o in late if o.partial], "a response was cut off"
    assert {o.status for o in late} <= {0, 200}
    assert any(not o.connected for o in late)  # the load went on until the port closed


# ---- admin writes and key rotation while 2 workers serve -------------------------------------


def accepting_pid(port: int, local_port: int, pids: list[int]) -> int | None:
    """The process among `pids` holding the server side of the loopback connection from
    `local_port` to `port` (None until a worker has accepted it)."""
    want_local, want_remote = f":{port:04X}", f":{local_port:04X}"
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[1].endswith(want_local) and f[2].endswith(want_remote) and f[9] != "0":
                inode = f[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for p in pids:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{p}/fd/{fd}") == target:
                    return p
            except OSError:
                continue
    return None


async def refused_everywhere(port: int, raw: bytes, pids: list[int]) -> dict[int, list[int]]:
    """The old key on fresh connections until both workers answered (at least 16): the
    statuses each worker gave."""
    by_worker: dict[int, list[int]] = {p: [] for p in pids}
    for _ in range(64):
        reader, writer = await open_conn(port)
        try:
            local = writer.get_extra_info("sockname")[1]
            owner = None
            deadline = time.monotonic() + 5
            while owner is None and time.monotonic() < deadline:
                owner = accepting_pid(port, local, pids)
                if owner is None:
                    await asyncio.sleep(0.005)
            assert owner is not None, "no worker accepted the connection"
            by_worker[owner].append((await exchange(reader, writer, raw)).status)
        finally:
            writer.close()
        if sum(map(len, by_worker.values())) >= 16 and all(by_worker.values()):
            break
    return by_worker


def test_admin_writes_and_key_rotation_under_load_with_two_workers(tmp_path: Path) -> None:
    rep = start_replica(tmp_path, EXAMPLES / "slow" / "score.py", env={"WORKER_COUNT": "8"})
    admin_port = free_port()
    up = [f"127.0.0.1:{rep.port}"]
    router = start_router(tmp_path, {
        "router": {"workers": 2, "admin_listen": f"127.0.0.1:{admin_port}"},
        "services": {
            "model": {"upstreams": up, "replica_max_concurrent_requests": 8,
                  "max_request_wait_time": 10_000, "max_queue_length": 10_000},
        },
        "endpoints": {"myep": {"versions": {
            "v1": {"service": "model"},  # the default: takes what v2 leaves
            "v2": {"service": "model", "traffic_percentile": 50}}}},
    }, env={"MLFE_ADMIN_TOKEN": ADMIN})
    router.wait_for(lambda: workers_serving(router) == 2, "both workers listening")
    router.wait_for(lambda: len(worker_pids(router)) == 2, "two worker processes")
    pids = worker_pids(router)
    svc_secondary = keys_of(router, "model")[1]
    ep_secondary = keys_of(router, "myep")[1]
    body = b'{"ms": 1}'
    svc_raw = request("/api/v1/service/model/score", body,
                      {"Authorization": f"Bearer {svc_secondary}"})
    ep_raw = request("/api/v1/endpoint/myep/score", body,
                     {"Authorization": f"Bearer {ep_secondary}"})
    outcomes: list[Outcome] = []
    rotations: list[dict[int, list[int]]] = []
    writes: list[int] = []

    async def admin_call(method: str, path: str, **kw: Any) -> httpx.Response:
        r = await asyncio.to_thread(admin, admin_port, method, path, **kw)
        writes.append(r.status_code)
        return r

    async def rotate(owner: str, kind: str, raw_for: Callable[[str], bytes]) -> None:
        for _ in range(3):
            old = keys_of(router, owner)[0]
            r = await admin_call("POST", f"/v1/{kind}/{owner}/regen-key",
                                 json={"keyType": "Primary"})
            assert r.status_code == 200, r.text
            assert r.json()["primaryKey"] != old
            # Returned: the old key is refused by every worker, at once.
            rotations.append(await refused_everywhere(router.port, raw_for(old), pids))

    async def shift_traffic() -> None:
        for share in (20, 80, 35, 65, 50, 50):
            r = await admin_call("PATCH", "/v1/endpoints/myep/versions/v2",
                                 json={"trafficPercentile": share})
            assert r.status_code == 200, r.text

    async def scenario() -> None:
        stop = asyncio.Event()
        clients = [asyncio.create_task(closed_loop(router.port, raw, outcomes, stop))
                   for raw in (svc_raw, ep_raw) * 8]
        try:
            async with asyncio.timeout(BOUND_S):
                await until(lambda: len(outcomes) >= 100, "load running")
                await asyncio.gather(
                    rotate("model", "services", lambda k: request(
                        "/api/v1/service/model/score", body, {"Authorization": f"Bearer {k}"})),
                    rotate("myep", "endpoints", lambda k: request(
                        "/api/v1/endpoint/myep/score", body, {"Authorization": f"Bearer {k}"})),
                    shift_traffic())
                during = len(outcomes)
                await until(lambda: len(outcomes) >= during + 100, "load after the writes")
        finally:
            stop.set()
            async with asyncio.timeout(BOUND_S):
                await asyncio.gather(*clients)

    try:
        asyncio.run(scenario())
    finally:
        router.stop()
        rep.stop()
    assert writes and set(writes) == {200}
    statuses = sorted({o.status for o in outcomes})
    assert statuses == [200], statuses  # valid keys: never a 401, never a 5xx
    assert len(rotations) == 6
    for by_worker in rotations:
        assert all(by_worker[p] for p in pids), by_worker  # both workers were asked
        assert {s for ss in by_worker.values() for s in ss} == {401}, by_worker



def test_an_admin_change_a_worker_cannot_confirm_is_503_naming_how_many(tmp_path: Path) -> None:
    """A stopped worker (SIGSTOP: alive, connected, silent) cannot confirm a regenerated key:
    the call answers 503 after its bound, naming 1 of 2; once the worker runs again it has
    the change, and the next change is confirmed by both."""
    rep = start_replica(tmp_path, EXAMPLES / "slow" / "score.py")
    admin_port = free_port()
    router = start_router(tmp_path, {
        "router": {"workers": 2, "admin_listen": f"127.0.0.1:{admin_port}"},
        "services": {"model": {"upstreams": [f"127.0.0.1:{rep.port}"]}},
    }, env={"MLFE_ADMIN_TOKEN": ADMIN})
    try:
        router.wait_for(lambda: workers_serving(router) == 2, "both workers")
        router.wait_for(lambda: len(worker_pids(router)) == 2, "two worker processes")
        pids = worker_pids(router)
        old = keys_of(router, "model")[0]
        os.kill(pids[0], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = admin(admin_port, "POST", "/v1/services/model/regen-key",
                      json={"keyType": "Primary"})
            took = time.monotonic() - t0
        finally:
            os.kill(pids[0], signal.SIGCONT)
        assert r.status_code == 503, r.text
        assert "1 of 2 worker processes did not confirm" in r.json()["message"]
        assert took >= 5  # the bound (RELOAD_TIMEOUT_S), not a quick refusal
        assert keys_of(router, "model")[0] != old  # stored all the same
        raw_old = request("/api/v1/service/model/score", b"{}",
                          {"Authorization": f"Bearer {old}"})

        def old_refused_everywhere() -> bool:
            by_worker = asyncio.run(refused_everywhere(router.port, raw_old, pids))
            return {s for ss in by_worker.values() for s in ss} == {401}

        router.wait_for(old_refused_everywhere, "the resumed worker to take the change")
        r = admin(admin_port, "POST", "/v1/services/model/regen-key",
                  json={"keyType": "Primary"})
        assert r.status_code == 200, r.text
    finally:
        router.stop()
        rep.stop()
