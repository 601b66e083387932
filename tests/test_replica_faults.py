"""The response side of the scoring path against replicas that misbehave on purpose.

Real processes on loopback: a router (`mlfe serve`) in front of tests/fake_replicas.py (whose
reply each request picks with `?mode=`) or of a small raw-socket server written here. Each
hostile reply is also checked on a reused upstream connection: the request before it leaves a
keep-alive connection in the pool (every service here has one slot, so one connection), and the
request after it must get its own, correct answer.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import Proc, Reader, raw_conn, start_fake_replica, start_router

ADMIN = "admin-token-for-replica-fault-tests"
TIMEOUT_MS = 400
HOSTILE = ("clte", "dupcl", "dupcl-same", "switch", "bighead", "manyheaders", "badchunk1")
Response = tuple[int, dict[str, str], bytes]


def path(service: str, query: str = "") -> str:
    return f"/api/v1/service/{service}/score" + (f"?{query}" if query else "")


def post(service: str, query: str = "", headers: tuple[str, ...] = (), body: bytes = b"{}"
         ) -> bytes:
    lines = [f"POST {path(service, query)} HTTP/1.1", "Host: t", *headers,
             f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def ask(port: int, raw: bytes, timeout: float = 10.0) -> Response:
    with raw_conn(port, timeout=timeout) as s:
        s.sendall(raw)
        return Reader(s).response()


def admin_url(router: Proc) -> str:
    cfg = yaml.safe_load(Path(router.extra["config_path"]).read_text())
    return "http://" + cfg["router"]["admin_listen"]


def stats(router: Proc, service: str) -> dict:
    r = httpx.get(admin_url(router) + "/v1/stats", headers={"Authorization": f"Bearer {ADMIN}"})
    found: dict = r.json()["services"][service]
    return found


def fake_stats(fake: Proc) -> dict:
    with raw_conn(fake.port) as s:
        s.sendall(b"GET /stats HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n")
        info: dict = json.loads(Reader(s).response()[2])
        return info


def release(fake: Proc, token: str) -> None:
    with raw_conn(fake.port) as s:
        s.sendall(f"GET /release?token={token} HTTP/1.1\r\nHost: f\r\n"
                  "Connection: close\r\n\r\n".encode())
        Reader(s).response()


def echo(resp: Response) -> dict:
    status, _, body = resp
    assert status == 200, resp
    info: dict = json.loads(body)
    return info


# ---- processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def fake(tmp: Path) -> Iterator[Proc]:
    p = start_fake_replica(tmp)
    yield p
    p.stop()


def _svc(port: int, **extra: object) -> dict:
    return {"upstreams": [f"127.0.0.1:{port}"], "auth_enabled": False,
            "replica_max_concurrent_requests": 1, **extra}


@pytest.fixture(scope="module")
def router(tmp: Path, fake: Proc) -> Iterator[Proc]:
    services = {f"h-{m}": _svc(fake.port) for m in HOSTILE}
    for name in ("desync", "hints", "bodyless", "connhdr", "reprobe", "hdrs", "drip"):
        services[name] = _svc(fake.port)
    services["drip"]["scoring_timeout_ms"] = 30000
    services["abandon"] = _svc(fake.port, scoring_timeout_ms=200, max_request_wait_time=5000)
    services["routing"] = _svc(fake.port, max_request_wait_time=1000)
    p = start_router(tmp, {
        "router": {"client_body_timeout_s": 1.0},
        "services": services,
    }, env={"MLFE_ADMIN_TOKEN": ADMIN})
    yield p
    p.stop()


# ---- item 1: bytes past a response never reach another client -------------------------------


def test_bytes_past_content_length_never_reach_the_next_client(router: Proc, fake: Proc) -> None:
    """The replica sends a whole second response after the first one's Content-Length, in the
    same write, while another client waits for the same (only) connection slot: that client
    must get its own answer from the replica, never the stray bytes."""
    before = fake_stats(fake)["requests"]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, router.port, post("desync", "mode=overflow&hold=ov1"))
        router.wait_for(lambda: fake_stats(fake)["requests"] > before, "first at the replica")
        second = pool.submit(ask, router.port, post("desync", "mode=echo&who=second"))
        router.wait_for(lambda: stats(router, "desync")["queued"] == 1, "second queued")
        release(fake, "ov1")
        assert first.result()[:1] == (200,) and first.result()[2] == b"hello"
        info = echo(second.result())
        assert info["query"] == "mode=echo&who=second"


# ---- the response side: framing, 1xx, 101, oversized heads, 204/304 -------------------------


def _around(router: Proc, service: str, query: str) -> Response:
    """An echo (leaving a pooled connection), the hostile request on it, and an echo after:
    returns the hostile request's response and checks the one after is its own."""
    echo(ask(router.port, post(service, "mode=echo&n=1")))
    resp = ask(router.port, post(service, query))
    assert echo(ask(router.port, post(service, "mode=echo&n=3")))["query"] == "mode=echo&n=3"
    return resp


@pytest.mark.parametrize("mode", HOSTILE)
def test_malformed_framing_or_head_is_502_and_the_connection_is_not_reused(
        router: Proc, mode: str) -> None:
    query = {
        "dupcl": "mode=dupcl&second=6",
        "dupcl-same": "mode=dupcl&second=5",
        "bighead": "mode=bighead&size=200000",
        "manyheaders": "mode=manyheaders&count=5000",
    }.get(mode, f"mode={mode}")
    status, _, body = _around(router, f"h-{mode}", query)
    assert status == 502, body
    assert json.loads(body)["message"] == "Replica sent an invalid response"


def test_informational_response_is_skipped(router: Proc) -> None:
    status, headers, body = _around(router, "hints", "mode=hints")
    assert (status, body) == (200, b"hinted")
    assert "link" not in headers


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_status_with_a_body_drops_the_body_and_the_connection(
        router: Proc, status: int) -> None:
    got, _, body = _around(router, "bodyless", f"mode=bodyless&status={status}")
    assert (got, body) == (status, b"")


def test_headers_named_in_the_replica_connection_header_are_dropped(router: Proc) -> None:
    _, headers, body = _around(router, "connhdr", "mode=connhdr")
    assert body == b"ok" and headers["x-kept"] == "1"
    assert "x-secret" not in headers


def test_head_is_not_forwarded(router: Proc) -> None:
    raw = f"HEAD {path('hdrs')} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    assert ask(router.port, raw)[0] == 405


# ---- request headers: Connection, X-Forwarded-*, Authorization ------------------------------


def test_forwarded_headers_are_the_routers_own(router: Proc) -> None:
    info = echo(ask(router.port, post("hdrs", "mode=echo", headers=(
        "Connection: keep-alive, X-Drop", "X-Drop: secret", "X-Forwarded-For: 192.0.2.1",
        "X-Forwarded-Proto: https"))))
    got = {k.lower(): v for k, v in info["headers"]}
    assert "x-drop" not in got
    assert got["x-forwarded-for"] == "192.0.2.1, 127.0.0.1"
    assert got["x-forwarded-proto"] == "http"


def test_duplicate_authorization_is_400(router: Proc) -> None:
    raw = post("hdrs", "mode=echo", headers=("Authorization: Bearer a", "Authorization: Bearer b"))
    assert ask(router.port, raw)[0] == 400


# ---- item 6: a body dripped byte by byte cannot hold a slot ---------------------------------


def test_dripped_body_is_refused_long_before_the_scoring_timeout(router: Proc) -> None:
    head = (f"POST {path('drip', 'mode=echo')} HTTP/1.1\r\nHost: t\r\n"
            "Content-Length: 1000\r\n\r\n").encode()
    start = time.monotonic()
    with raw_conn(router.port, timeout=0.45) as s:
        s.sendall(head)
        reply = b""
        while time.monotonic() - start < 20:
            try:
                s.sendall(b"x")
                data = s.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert time.monotonic() - start < 15  # the service's scoring timeout is 30 s


# ---- item 2: a timed-out request keeps its slot while the replica works ---------------------


def test_timed_out_requests_never_exceed_the_replica_cap(tmp: Path) -> None:
    """A model slower than scoring_timeout_ms under load: every client gets its 504 (or a 503
    once the queue wait is over), and the replica never has more than its cap at once."""
    own = start_fake_replica(tmp, name="slow-fake")
    r = start_router(tmp, {"services": {"slow": _svc(
        own.port, scoring_timeout_ms=150, replica_max_concurrent_requests=2,
        max_request_wait_time=3000)}}, name="slow-router")
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(
                lambda _: ask(r.port, post("slow", "mode=slow&ms=500"))[0], range(16)))
        assert set(statuses) <= {503, 504} and 504 in statuses
        assert fake_stats(own)["max_in_flight"] == 2
    finally:
        r.stop()
        own.stop()


def test_abandoned_request_frees_its_slot_within_the_bound(router: Proc) -> None:
    """A replica that never answers: 504, then its slot is held for at most five scoring
    timeouts, after which the next request gets through."""
    assert ask(router.port, post("abandon", "mode=hang"))[0] == 504
    assert echo(ask(router.port, post("abandon", "mode=echo&after=hang")))


# ---- item 3: a queue wait is not routing time -----------------------------------------------


def _metric(router: Proc, name: str, service: str) -> float:
    text = httpx.get(admin_url(router) + "/metrics",
                     headers={"Authorization": f"Bearer {ADMIN}"}).text
    for line in text.splitlines():
        if line.startswith(name) and f'service="{service}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for {service}")


def test_requests_that_expire_in_the_queue_count_as_queue_time(router: Proc, fake: Proc) -> None:
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(ask, router.port, post("routing", "mode=slow&ms=0&hold=rt1"))
        router.wait_for(lambda: stats(router, "routing")["busy"] == 1, "first in flight")
        assert ask(router.port, post("routing", "mode=echo"))[0] == 503  # after 1 s in queue
        release(fake, "rt1")
        held.result()
    # (the expiry timer runs on the loop's clock, the metric on perf_counter: a few µs apart)
    assert _metric(router, "mlfe_queue_wait_seconds_sum", "routing") >= 0.99
    assert _metric(router, "mlfe_routing_duration_seconds_sum", "routing") < 0.5


# ---- item 4: one failure of the only replica is no instant 503 ------------------------------


def test_one_failure_of_the_only_replica_does_not_refuse_the_next_request(router: Proc) -> None:
    assert ask(router.port, post("reprobe", "mode=reset"))[0] == 502
    assert echo(ask(router.port, post("reprobe", "mode=echo")))


# ---- item 5: a keep-alive client is answered after a failed retry ---------------------------


class _DyingReplica:
    """Serves one keep-alive request, then closes that connection on the next request without
    a reply and stops listening: a replica killed between two requests."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.listener:
            conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            buf = b""
            served = 0
            while served < 2:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf and served < 2:
                    _, _, buf = buf.partition(b"\r\n\r\n")
                    buf = buf[2:]  # the two-byte body "{}"
                    served += 1
                    if served == 1:
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


def test_client_connection_is_read_again_after_a_failed_retry(tmp: Path) -> None:
    dying = _DyingReplica()
    r = start_router(tmp, {"services": {"dying": _svc(dying.port)}}, name="dying-router")
    try:
        with raw_conn(r.port, timeout=10) as s:
            reader = Reader(s)
            s.sendall(post("dying"))
            assert reader.response()[0] == 200
            s.sendall(post("dying"))
            assert reader.response()[0] == 502  # closed, and refused on the retry
            s.sendall(post("dying"))
            assert reader.response()[0] == 502  # answered, not left unread
        dying.thread.join(timeout=10)
    finally:
        r.stop()

