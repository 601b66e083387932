"""HTTP/1.1 protocol tests of the router over real sockets, side by side with nginx.

A real router (`mlfe serve`) and a real nginx (reverse proxy, HTTP/1.1 and keep-alive to the
upstream) sit in front of the same fake replica (tests/fake_replicas.py, whose behaviour each
request picks with `?mode=`). Each case sends the same raw bytes to both and checks the router
answers as nginx does, or better; where it answers differently on purpose the case says why
(431 rather than nginx's 400 for oversized headers, a JSON body, refusing what nginx lets by).

No fixed sleeps: every wait is a socket read with a timeout or a poll against a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    Proc,
    Reader,
    free_port,
    raw_conn,
    read_until_close,
    rss_kib,
    start_fake_replica,
    start_nginx,
    start_router,
)

MiB = 1024 * 1024
KEY = "protocol-test-primary-key-0123456789"
KEY2 = "protocol-test-secondary-key-0123456789"
MAX_BODY = 1 * MiB  # the main router's (and nginx's) body limit
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_COUNT = 50
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
KEEPALIVE_TIMEOUT_S = 2.0
SCORING_TIMEOUT_MS = 500
Response = tuple[int, dict[str, str], bytes]

# Every test that can disturb a service's replica slots (a failure marks a replica down, a
# leaked slot makes the next request wait) has a service of its own, all on one fake replica.
SERVICES = (
    "echo", "keepalive", "pipe", "pipe-bad", "pipe-close", "upgrade", "cont", "chunks",
    "smuggle", "limits", "slow", "drip", "bad", "closer", "resetter", "cut",
)


def path(service: str = "echo", query: str = "") -> str:
    return f"/api/v1/service/{service}/score" + (f"?{query}" if query else "")


def request(method: str = "POST", target: str | None = None, body: bytes | None = b"",
            headers: tuple[str, ...] = (), version: str = "1.1", chunked: bool = False) -> bytes:
    """A raw request: `Host`, the given header lines, and the body framed by Content-Length
    (or sent as one chunk per 1000 bytes when `chunked`; no body at all when `body` is None)."""
    lines = [f"{method} {target or path()} HTTP/{version}", "Host: test", *headers]
    if body is None:
        payload = b""
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = chunk_encode(body, 1000)
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def chunk_encode(body: bytes, size: int, ext: bytes = b"", trailer: bytes = b"") -> bytes:
    out = [b"%x%s\r\n%s\r\n" % (len(body[i:i + size]), ext, body[i:i + size])
           for i in range(0, len(body), size)]
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


def echo_of(resp: Response) -> dict:
    status, _, body = resp
    assert status == 200, resp
    info: dict = json.loads(body)
    return info


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def closed_soon(sock: socket.socket, timeout: float = 1.5) -> bool:
    """True if the peer closes (or resets) within `timeout` and sends nothing more first."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    assert not data, f"unexpected bytes after the response: {data[:200]!r}"
    return True


def roundtrip(port: int, raw: bytes, count: int = 1, timeout: float = 5.0) -> list[Response]:
    """Send `raw` on a new connection and read `count` responses."""
    with raw_conn(port, timeout=timeout) as s:
        s.sendall(raw)
        r = Reader(s)
        return [r.response() for _ in range(count)]


def outcome(port: int, raw: bytes, timeout: float = 5.0,
            check_closed: bool | None = None) -> tuple[int | None, bool]:
    """(status of the first response or None if there was none, whether the connection was
    closed after it: checked for error statuses, or as `check_closed` says). A response lost
    to a reset counts as none."""
    with raw_conn(port, timeout=timeout) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(raw)
        r = Reader(s)
        try:
            status, _, _ = r.response()
        except ConnectionError:
            return None, True
        if check_closed is None:
            check_closed = status >= 400
        if r.buf or not check_closed:
            return status, False
        return status, closed_soon(s)


def is_router(p: Proc) -> bool:
    return "config_path" in p.extra


def fake_get(fake: Proc, target: str) -> dict:
    with raw_conn(fake.port) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n".encode())
        info: dict = json.loads(Reader(s).response()[2])
        return info


def fake_stats(fake: Proc) -> dict:
    return fake_get(fake, "/stats")


# ---- processes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("protocol")


@pytest.fixture(scope="module")
def fake(tmp: Path) -> Iterator[Proc]:
    p = start_fake_replica(tmp)
    yield p
    p.stop()


def _service(upstream: str, **extra: object) -> dict:
    return {"upstreams": [upstream], "auth_enabled": False, **extra}


@pytest.fixture(scope="module")
def router(tmp: Path, fake: Proc) -> Iterator[Proc]:
    up = f"127.0.0.1:{fake.port}"
    services = {name: _service(up) for name in SERVICES}
    services["echo"]["replica_max_concurrent_requests"] = 4
    services["slow"]["scoring_timeout_ms"] = SCORING_TIMEOUT_MS
    services["keyed"] = {"upstreams": [up], "primary_key": KEY, "secondary_key": KEY2}
    services["refused"] = _service(f"127.0.0.1:{free_port()}")  # nothing listens there
    p = start_router(tmp, {
        "router": {
            "max_body_bytes": MAX_BODY,
            "max_header_bytes": MAX_HEADER_BYTES,
            "max_header_count": MAX_HEADER_COUNT,
            "client_header_timeout_s": HEADER_TIMEOUT_S,
            "client_body_timeout_s": BODY_TIMEOUT_S,
            "keepalive_timeout_s": KEEPALIVE_TIMEOUT_S,
        },
        "services": services,
    })
    yield p
    p.stop()


@pytest.fixture(scope="module")
def big_router(tmp: Path, fake: Proc) -> Iterator[Proc]:
    """A router that takes large bodies (the streaming and flow-control tests)."""
    p = start_router(tmp, {
        "router": {"max_body_bytes": 1024 * MiB},
        "services": {"big": _service(f"127.0.0.1:{fake.port}")},
    }, name="big-router")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def nginx(tmp: Path, fake: Proc) -> Iterator[Proc]:
    p = start_nginx(tmp, fake.port, server_extra=(
        "client_max_body_size 1m; client_header_timeout 1s; client_body_timeout 1s; "
        "keepalive_timeout 2s; proxy_read_timeout 10s; "
        # A streaming proxy, as the router is: replies pass through as they come.
        "proxy_buffering off;"
    ))
    yield p
    p.stop()


@pytest.fixture(params=["router", "nginx"])
def proxy(request: pytest.FixtureRequest) -> Proc:
    """The router, and nginx for comparison: a test run against both shows they agree."""
    p: Proc = request.getfixturevalue(request.param)
    return p


# ---- keep-alive -----------------------------------------------------------------------------


def test_keepalive_several_requests_on_one_connection(proxy: Proc) -> None:
    with raw_conn(proxy.port) as s:
        r = Reader(s)
        for i, body in enumerate((b'{"a": 1}', b"", b"x" * 70_000, b'{"last": true}')):
            s.sendall(request(target=path("keepalive"), body=body,
                              headers=(f"x-ms-client-request-id: ka-{i}",)))
            resp = r.response()
            info = echo_of(resp)
            assert (info["length"], info["sha256"]) == (len(body), sha(body))
            assert resp[1].get("connection", "keep-alive").lower() == "keep-alive"
        assert not r.buf


def test_connection_close_closes_after_the_response(proxy: Proc) -> None:
    with raw_conn(proxy.port) as s:
        s.sendall(request(target=path("keepalive"), body=b"bye", headers=("Connection: close",)))
        resp = Reader(s).response()
        assert echo_of(resp)["body"] == "bye"
        assert resp[1]["connection"].lower() == "close"
        assert closed_soon(s)


def test_http10_without_keepalive_closes(proxy: Proc) -> None:
    with raw_conn(proxy.port) as s:
        s.sendall(request(target=path("keepalive"), body=b"ten", version="1.0"))
        r = Reader(s)
        resp = r.response()
        assert echo_of(resp)["body"] == "ten"
        assert resp[1].get("connection", "close").lower() == "close"
        assert closed_soon(s)


def test_http10_with_keepalive_keeps_the_connection(proxy: Proc) -> None:
    with raw_conn(proxy.port) as s:
        r = Reader(s)
        for body in (b"one", b"two"):
            s.sendall(request(target=path("keepalive"), body=body, version="1.0",
                              headers=("Connection: keep-alive",)))
            resp = r.response()
            assert echo_of(resp)["body"] == body.decode()
            assert resp[1]["connection"].lower() == "keep-alive"
            assert "content-length" in resp[1]  # HTTP/1.0 keep-alive needs a length


def test_half_closed_client(proxy: Proc) -> None:
    """A client that shuts down its sending side after the request: nginx takes it for an
    abort (499) and closes; the router may do the same or answer first, but it must close
    promptly and leave the service's slot free."""
    with raw_conn(proxy.port) as s:
        s.sendall(request(target=path("keepalive"), body=b"half"))
        s.shutdown(socket.SHUT_WR)
        s.settimeout(3)
        data = read_until_close(s)
        assert data == b"" or data.startswith(b"HTTP/1.1 "), data[:200]
    resp = roundtrip(proxy.port, request(target=path("keepalive"), body=b"after"), timeout=3)
    assert echo_of(resp[0])["body"] == "after"


def test_client_leaving_mid_upload_frees_the_slot(router: Proc) -> None:
    """The service has one slot: a client that goes away halfway through its body must not
    keep it (the next request is answered, not queued until a 503)."""
    for _ in range(3):
        with raw_conn(router.port) as s:
            s.sendall(request(target=path("keepalive"), body=None)[:-2]
                      + b"Content-Length: 100000\r\n\r\n" + b"w" * 5000)
    resp = roundtrip(router.port, request(target=path("keepalive"), body=b"next"), timeout=3)
    assert echo_of(resp[0])["body"] == "next"


def test_keepalive_idle_timeout_closes(router: Proc) -> None:
    with raw_conn(router.port) as s:
        s.sendall(request(target=path("keepalive"), body=b"idle"))
        assert echo_of(Reader(s).response())["body"] == "idle"
        t0 = time.monotonic()
        assert closed_soon(s, timeout=KEEPALIVE_TIMEOUT_S + 3)
        assert time.monotonic() - t0 >= KEEPALIVE_TIMEOUT_S - 0.5


# ---- pipelining -----------------------------------------------------------------------------


def test_pipelined_requests_answered_in_order(proxy: Proc) -> None:
    bodies = [b'{"n": 0}', None, b"chunked body " * 300, b"x" * 5000, b'{"n": 4}']
    raw = b"".join(
        request(
            method="GET" if body is None else "POST",
            target=path("pipe", f"n={i}"),
            body=body,
            chunked=i == 2,
            headers=(f"x-ms-client-request-id: pipe-{i}",),
        )
        for i, body in enumerate(bodies)
    )
    with raw_conn(proxy.port) as s:
        s.sendall(raw)
        r = Reader(s)
        for i, body in enumerate(bodies):
            resp = r.response()
            info = echo_of(resp)
            assert info["query"] == f"n={i}"
            assert dict(info["headers"]).get("x-ms-client-request-id") == f"pipe-{i}"
            assert (info["length"], info["sha256"]) == (len(body or b""), sha(body or b""))
            if is_router(proxy):  # the router echoes the client's id
                assert resp[1]["x-ms-client-request-id"] == f"pipe-{i}"
        # The connection is still in step: one more request, one more answer.
        s.sendall(request(target=path("pipe", "n=last"), body=b"z"))
        assert echo_of(r.response())["query"] == "n=last"


def test_pipelined_router_errors_keep_their_place(router: Proc) -> None:
    """Answers the router makes itself (404, 401) do not overtake an earlier proxied one."""
    raw = (
        request(target=path("pipe", "n=0"), body=b"a")
        + request(target=path("no-such-service"), body=b"b")
        + request(target=path("keyed"), body=b"c", headers=("Authorization: Bearer nope",))
        + request(target=path("keyed", "n=3"), body=b"d", headers=(f"Authorization: Bearer {KEY}",))
        + request("GET", "/-/healthy", body=None)
        + request(target=path("pipe", "n=5"), body=b"f")
    )
    with raw_conn(router.port) as s:
        s.sendall(raw)
        r = Reader(s)
        got = [r.response() for _ in range(6)]
    assert [st for st, _, _ in got] == [200, 404, 401, 200, 200, 200]
    assert json.loads(got[0][2])["query"] == "n=0"
    assert json.loads(got[3][2])["query"] == "n=3"
    assert json.loads(got[5][2])["query"] == "n=5"


def _warm(proxy: Proc, service: str) -> None:
    """One request first, so the proxy has an idle keep-alive connection to the replica (the
    usual state, and the path where a forwarded request starts at once)."""
    echo_of(roundtrip(proxy.port, request(target=path(service, "n=warm"), body=b"w"))[0])


def test_pipelined_connection_close_ends_the_pipeline(proxy: Proc) -> None:
    raw = (
        request(target=path("pipe-close", "n=0"), body=b"a")
        + request(target=path("pipe-close", "n=1"), body=b"b", headers=("Connection: close",))
        + request(target=path("pipe-close", "n=2"), body=b"c")
    )
    _warm(proxy, "pipe-close")
    with raw_conn(proxy.port, timeout=5) as s:
        s.sendall(raw)
        r = Reader(s)
        assert echo_of(r.response())["query"] == "n=0"
        assert echo_of(r.response())["query"] == "n=1"
        assert not r.buf
        assert closed_soon(s)


def test_pipelined_bad_request_after_good_ones(proxy: Proc, fake: Proc) -> None:
    """Earlier requests are answered, the malformed one gets 400 and the connection closes
    (nginx: 200, 200, 400, close); nothing of the bad one reaches the replica, and no slot
    of the service is left taken."""
    bad = (b"POST " + path("pipe-bad").encode() + b" HTTP/1.1\r\nHost: test\r\n"
           b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
    raw = (request(target=path("pipe-bad", "n=0"), body=b"a")
           + request(target=path("pipe-bad", "n=1"), body=b"b") + bad)
    _warm(proxy, "pipe-bad")
    before = fake_stats(fake)["requests"]
    with raw_conn(proxy.port, timeout=5) as s:
        s.sendall(raw)
        r = Reader(s)
        assert echo_of(r.response())["query"] == "n=0"
        assert echo_of(r.response())["query"] == "n=1"
        status, _, _ = r.response()
        assert status == 400
        assert closed_soon(s)
    assert fake_stats(fake)["requests"] - before == 2
    # The service's one slot is free again: a new request is answered at once.
    resp = roundtrip(proxy.port, request(target=path("pipe-bad", "n=after"), body=b"c"),
                     timeout=3)[0]
    assert echo_of(resp)["query"] == "n=after"


# ---- Expect: 100-continue -------------------------------------------------------------------


def test_expect_100_continue(proxy: Proc) -> None:
    body = b"continue " * 1000
    head = request(target=path("cont"), body=body, headers=("Expect: 100-continue",))
    head = head[: len(head) - len(body)]
    with raw_conn(proxy.port) as s:
        s.sendall(head)
        r = Reader(s)
        status, _, _ = r.response()  # the body is not sent until this arrives
        assert status == 100
        s.sendall(body)
        info = echo_of(r.response())
        assert (info["length"], info["sha256"]) == (len(body), sha(body))
        assert "expect" not in {k.lower() for k, _ in info["headers"]}


def _after_early_refusal(s: socket.socket, r: Reader, headers: dict[str, str],
                         body_len: int) -> None:
    """After a final status sent instead of 100 Continue, the connection must stay in step:
    either the router says it closes (and does), or it goes on reading the body (RFC 9110
    10.1.1), which the client then sends, and the next request on it is answered."""
    if headers.get("connection", "").lower() == "close":
        assert closed_soon(s)
        return
    s.sendall(b"b" * body_len + request(target=path("cont", "n=next"), body=b"next"))
    assert echo_of(r.response())["query"] == "n=next"


def test_expect_100_continue_refused_early_wrong_key(router: Proc) -> None:
    """A request that fails auth gets its final status at once, without 100 Continue, so
    the client need not send the body."""
    head = request(target=path("keyed"), body=None, headers=(
        "Authorization: Bearer not-the-key", "Expect: 100-continue", "Content-Length: 5000"))
    with raw_conn(router.port) as s:
        s.sendall(head)
        r = Reader(s)
        status, headers, body = r.response()
        assert status == 401
        assert headers["www-authenticate"] == "Bearer"
        assert "message" in json.loads(body)
        _after_early_refusal(s, r, headers, 5000)


def test_expect_100_continue_refused_early_unknown_service(router: Proc) -> None:
    head = request(target=path("no-such-service"), body=None,
                   headers=("Expect: 100-continue", "Content-Length: 5000"))
    with raw_conn(router.port) as s:
        s.sendall(head)
        r = Reader(s)
        status, headers, body = r.response()
        assert status == 404
        assert "no-such-service" in json.loads(body)["message"]
        _after_early_refusal(s, r, headers, 5000)


def test_expect_100_continue_ignored_for_http10(proxy: Proc) -> None:
    """RFC 9110 10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0
    request (an HTTP/1.0 client cannot read a 1xx)."""
    body = b"old client"
    head = request(target=path("cont"), body=body, version="1.0",
                   headers=("Expect: 100-continue",))
    with raw_conn(proxy.port) as s:
        s.sendall(head[: len(head) - len(body)])
        s.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            early = s.recv(65536)
            pytest.fail(f"answered before the body: {early[:100]!r}")
        s.settimeout(5)
        s.sendall(body)
        data = read_until_close(s)
    assert data.startswith(b"HTTP/1.1 200 "), data[:100]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["body"] == body.decode()


@pytest.mark.parametrize("key", [KEY, KEY2], ids=["primary", "secondary"])
def test_expect_100_continue_with_the_right_key(router: Proc, key: str) -> None:
    body = b'{"data": [1, 2, 3]}'
    head = request(target=path("keyed"), body=body, headers=(
        f"Authorization: Bearer {key}", "Expect: 100-continue"))
    with raw_conn(router.port) as s:
        s.sendall(head[: len(head) - len(body)])
        r = Reader(s)
        assert r.response()[0] == 100
        s.sendall(body)
        info = echo_of(r.response())
        assert info["body"] == body.decode()
        assert "authorization" not in {k.lower() for k, _ in info["headers"]}


# ---- chunked both ways ----------------------------------------------------------------------


def test_chunked_request_body_forwarded_intact(proxy: Proc) -> None:
    body = bytes(range(256)) * 200  # every byte value, CRLFs included
    raw = request(target=path("chunks"), body=None)[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
    raw += chunk_encode(body, 777, ext=b";name=value", trailer=b"X-Trailer: yes\r\n")
    info = echo_of(roundtrip(proxy.port, raw)[0])
    assert (info["length"], info["sha256"]) == (len(body), sha(body))


def test_chunked_request_with_zero_length_body(proxy: Proc) -> None:
    info = echo_of(roundtrip(proxy.port, request(target=path("chunks"), body=b"",
                                                 chunked=True))[0])
    assert info["length"] == 0


def _digits(n: int) -> bytes:
    return (b"0123456789" * (n // 10 + 1))[:n]


def test_chunked_response_reframed_for_http11(proxy: Proc) -> None:
    pieces = [1, 10, 100, 0x1000, 3]
    target = path("chunks", "mode=chunked&trailer=1&pieces=" + ",".join(map(str, pieces)))
    with raw_conn(proxy.port) as s:
        r = Reader(s)
        for _ in range(2):  # twice: the connection stays usable after a chunked response
            s.sendall(request("GET", target, body=None))
            status, headers, body = r.response()
            assert status == 200
            assert headers.get("transfer-encoding") == "chunked" or (
                headers.get("content-length") == str(sum(pieces)))
            assert body == _digits(sum(pieces))


def test_chunked_response_to_http10_is_close_delimited(proxy: Proc) -> None:
    target = path("chunks", "mode=chunked&pieces=5,500,5000")
    with raw_conn(proxy.port) as s:
        s.sendall(request("GET", target, body=None, version="1.0"))
        data = read_until_close(s)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert body == _digits(5505)


def test_close_delimited_response_reframed(proxy: Proc) -> None:
    """A replica answering with neither length nor chunks (ended by close): an HTTP/1.1 client
    gets a framed response (chunked) and keeps its connection."""
    target = path("chunks", "mode=close_delimited&size=3000")
    with raw_conn(proxy.port) as s:
        r = Reader(s)
        s.sendall(request("GET", target, body=None))
        status, headers, body = r.response()
        assert status == 200
        assert body == _digits(3000)
        if headers.get("connection", "").lower() != "close":
            s.sendall(request(target=path("chunks"), body=b"again"))
            assert echo_of(r.response())["body"] == "again"


# ---- bodies: large, limits ------------------------------------------------------------------


def test_large_body_streamed_with_flat_rss(big_router: Proc) -> None:
    """256 MiB through the router to a replica that counts and hashes without storing: the
    router's resident memory stays flat (the body is streamed, never held)."""
    size, block = 256 * MiB, 1 * MiB
    chunk = bytes(range(256)) * (block // 256)
    digest = hashlib.sha256()
    target = path("big")
    with raw_conn(big_router.port, timeout=30) as s:  # warm up: connections, buffers
        s.sendall(request(target=target, body=chunk))
        echo_of(Reader(s).response())
    pid = big_router.proc.pid
    base = peak = rss_kib(pid)
    with raw_conn(big_router.port, timeout=30) as s:
        s.sendall(request(target=target, body=None)[:-2] + b"Content-Length: %d\r\n\r\n" % size)
        for i in range(size // block):
            s.sendall(chunk)
            digest.update(chunk)
            if i % 8 == 0:
                peak = max(peak, rss_kib(pid))
        info = echo_of(Reader(s).response())
    peak = max(peak, rss_kib(pid))
    assert (info["length"], info["sha256"]) == (size, digest.hexdigest())
    assert peak - base < 64 * 1024, f"router RSS grew {(peak - base) // 1024} MiB"


def test_large_chunked_body_streamed(big_router: Proc) -> None:
    size, block = 32 * MiB, 256 * 1024
    chunk = bytes(range(256)) * (block // 256)
    digest = hashlib.sha256()
    with raw_conn(big_router.port, timeout=30) as s:
        s.sendall(request(target=path("big"), body=None)[:-2]
                  + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(size // block):
            s.sendall(b"%x\r\n" % block + chunk + b"\r\n")
            digest.update(chunk)
        s.sendall(b"0\r\n\r\n")
        info = echo_of(Reader(s).response())
    assert (info["length"], info["sha256"]) == (size, digest.hexdigest())


def test_body_over_limit_by_content_length_refused_early(proxy: Proc, fake: Proc) -> None:
    """413 on the head alone: the client has not sent (and need not send) the body."""
    before = fake_stats(fake)["requests"]
    head = request(target=path("limits"), body=None)[:-2] + b"Content-Length: %d\r\n\r\n" % (
        MAX_BODY + 1)
    with raw_conn(proxy.port) as s:
        s.sendall(head)
        status, _, body = Reader(s).response()
        assert status == 413
        # The router closes rather than read a body it refused; nginx keeps the connection
        # and reads the body to throw it away.
        assert not is_router(proxy) or closed_soon(s)
    assert fake_stats(fake)["requests"] == before
    if is_router(proxy):
        assert str(MAX_BODY) in json.loads(body)["message"]


def test_body_over_limit_with_expect_gets_413_without_100(proxy: Proc) -> None:
    head = request(target=path("limits"), body=None, headers=("Expect: 100-continue",))
    head = head[:-2] + b"Content-Length: %d\r\n\r\n" % (MAX_BODY * 10)
    with raw_conn(proxy.port) as s:
        s.sendall(head)
        assert Reader(s).response()[0] == 413
        assert not is_router(proxy) or closed_soon(s)


def test_chunked_body_over_limit_gets_413(proxy: Proc) -> None:
    head = request(target=path("limits"), body=None)[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
    piece = b"%x\r\n" % (64 * 1024) + b"y" * (64 * 1024) + b"\r\n"
    with raw_conn(proxy.port) as s:
        s.sendall(head)
        try:
            for _ in range(2 * MAX_BODY // (64 * 1024)):
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while sending: the answer is already waiting
        status, _, _ = Reader(s).response()
        assert status == 413


def test_refusal_while_the_client_sends_ends_with_a_clean_close(proxy: Proc) -> None:
    """RFC 9112 9.6: closing a socket with unread input sends a reset, which can destroy the
    response in the client's buffers before it is read; a server should half-close and drain
    instead (nginx's lingering close). After the 413 the client must see a FIN, not a RST."""
    head = request(target=path("limits"), body=None)[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
    piece = b"%x\r\n" % (64 * 1024) + b"y" * (64 * 1024) + b"\r\n"
    with raw_conn(proxy.port) as s:
        try:
            s.sendall(head + piece * (2 * MAX_BODY // (64 * 1024) + 8))
        except ConnectionResetError:
            pytest.fail("reset while sending the body")
        r = Reader(s)
        assert r.response()[0] == 413
        assert not r.buf
        s.settimeout(5)
        try:
            rest = s.recv(65536)
        except ConnectionResetError:
            pytest.fail("the connection was reset after the 413, not closed")
        assert rest == b""


# ---- request smuggling and malformed requests -----------------------------------------------

P = path("smuggle").encode()
H = b" HTTP/1.1\r\nHost: test\r\n"

REFUSED = (400, 501)
# (id, raw request, nginx's status, the router's status (or those it may answer), why they
# differ if they do).
# Every refusal must close the connection: what follows a request whose end is in doubt
# is never read as a request.
SMUGGLING = [
    ("cl-and-te", b"POST " + P + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /x HTTP/1.1\r\nHost: test\r\n\r\n", 400, 400, ""),
    ("te-and-cl", b"POST " + P + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
     b"0\r\n\r\n", 400, 400, ""),
    ("two-content-lengths", b"POST " + P + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
     b"hello!", 400, 400, ""),
    ("same-content-length-twice", b"POST " + P + H + b"Content-Length: 5\r\n"
     b"Content-Length: 5\r\n\r\nhello", 400, 400, ""),
    ("content-length-list", b"POST " + P + H + b"Content-Length: 5, 5\r\n\r\nhello", 400, 400,
     ""),
    ("content-length-plus", b"POST " + P + H + b"Content-Length: +5\r\n\r\nhello", 400, 400, ""),
    ("content-length-negative", b"POST " + P + H + b"Content-Length: -5\r\n\r\nhello", 400, 400,
     ""),
    ("space-before-colon", b"POST " + P + H + b"Content-Length : 5\r\n\r\nhello", 400, 400, ""),
    ("te-space-before-colon", b"POST " + P + H + b"Transfer-Encoding : chunked\r\n\r\n"
     b"0\r\n\r\n", 400, 400, ""),
    ("bad-chunk-size", b"POST " + P + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"
     b"0\r\n\r\n", 400, 400, ""),
    ("chunk-size-overflow", b"POST " + P + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"fffffffffffffffff1\r\nhello\r\n0\r\n\r\n", 400, 400, ""),
    ("chunk-without-crlf", b"POST " + P + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhelloX0\r\n\r\n", 400, 400, ""),
    ("two-transfer-encodings", b"POST " + P + H + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n", 400, 400, ""),
    ("te-unknown-coding", b"POST " + P + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
     501, REFUSED, "refused either way; llhttp calls it malformed"),
    ("te-chunked-twice", b"POST " + P + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n"
     b"0\r\n\r\n", 501, REFUSED, "refused either way"),
    ("te-gzip", b"POST " + P + H + b"Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n", 501, REFUSED,
     "refused either way"),
    ("te-vertical-tab", b"POST " + P + H + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
     501, REFUSED, "refused either way"),
    ("te-gzip-chunked", b"POST " + P + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
     b"0\r\n\r\n", 501, REFUSED,
     "a coding the router cannot forward (it re-frames the body as plain chunked, so the "
     "replica would take gzip bytes for the body): RFC 9112 6.1, 501"),
    ("te-in-http10", b"POST " + P + b" HTTP/1.0\r\nHost: test\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n0\r\n\r\n", 400, 400,
     "RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing (a smuggling vector)"),
    ("obs-fold", b"POST " + P + H + b"X-Foo: a\r\n  b\r\nContent-Length: 0\r\n\r\n", 400, 400,
     ""),
    ("obs-fold-te", b"POST " + P + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
     400, 400, ""),
    ("leading-whitespace-header", b"POST " + P + b" HTTP/1.1\r\n Host: test\r\n"
     b"Content-Length: 0\r\n\r\n", 400, 400, ""),
    ("nul-in-header-value", b"POST " + P + H + b"X-Foo: a\x00b\r\nContent-Length: 0\r\n\r\n",
     400, 400, ""),
    ("bare-cr-in-header", b"POST " + P + H + b"X-Foo: a\rb\r\nContent-Length: 0\r\n\r\n", 400,
     400, ""),
    ("space-in-header-name", b"POST " + P + H + b"X Foo: a\r\nContent-Length: 0\r\n\r\n", 400,
     400, ""),
    ("control-char-in-header-value", b"POST " + P + H + b"X-Foo: a\x01b\r\n"
     b"Content-Length: 0\r\n\r\n", 200, 400, "better: RFC 9110 5.5 forbids CTLs in values"),
    ("del-in-header-value", b"POST " + P + H + b"X-Foo: a\x7fb\r\nContent-Length: 0\r\n\r\n",
     200, 400, "better: RFC 9110 5.5"),
    ("header-without-colon", b"POST " + P + H + b"XFoo\r\nContent-Length: 0\r\n\r\n", 200, 400,
     "better: nginx drops the line silently"),
    ("bare-lf-line-ends", b"POST " + P + b" HTTP/1.1\nHost: test\nContent-Length: 0\n\n", 200,
     400, "better: a lenient line end is where parsers disagree"),
    ("chunk-size-trailing-space", b"POST " + P + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"5 \r\nhello\r\n0\r\n\r\n", 200, 400, "better: RFC 9112 7.1 has no whitespace there"),
    ("chunk-lf-only", b"POST " + P + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
     200, 400, "better: bare-LF chunk lines are a known smuggling vector"),
    ("control-char-in-chunk-ext", b"POST " + P + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"5;\x01\r\nhello\r\n0\r\n\r\n", 200, 400, "better"),
    ("no-host-http11", b"POST " + P + b" HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400, 400,
     "RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host"),
    ("two-hosts", b"POST " + P + H + b"Host: other\r\nContent-Length: 0\r\n\r\n", 400, 400,
     "RFC 9112 3.2: a server MUST answer 400 to more than one Host"),
    ("http-version-2", b"POST " + P + b" HTTP/2.0\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
     505, (505, 400), "an HTTP/2.0 request line is not an HTTP/1.1 request"),
    ("bad-version", b"POST " + P + b" HTTP/1.x\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
     400, 400, ""),
    ("space-in-target", b"POST " + P + b"x y HTTP/1.1\r\nHost: test\r\nContent-Length: 0"
     b"\r\n\r\n", 400, 400, ""),
    ("lower-case-method", b"post " + P + H + b"Content-Length: 0\r\n\r\n", 400, 400, ""),
]


@pytest.mark.parametrize(
    ("raw", "nginx_status", "router_status"),
    [pytest.param(raw, n, r if isinstance(r, tuple) else (r,), id=name)
     for name, raw, n, r, _ in SMUGGLING],
)
def test_smuggling_and_malformed_requests(router: Proc, nginx: Proc, fake: Proc, raw: bytes,
                                          nginx_status: int,
                                          router_status: tuple[int, ...]) -> None:
    # nginx's answer is for comparison only (its exact codes change between versions); the
    # router's is what is checked.
    got_nginx = outcome(nginx.port, raw)
    before = fake_stats(fake)["requests"]
    got = outcome(router.port, raw)
    refused = router_status[0] >= 400
    assert got[0] in router_status and got[1] == refused, (
        f"router answered {got}, expected one of {router_status} and closed={refused} "
        f"(nginx: {got_nginx}, nginx 1.22 answered {nginx_status})")
    if refused:
        assert fake_stats(fake)["requests"] == before, "a refused request reached the replica"


def test_refused_request_answer_is_json(router: Proc) -> None:
    raw = SMUGGLING[0][1]
    status, headers, body = roundtrip(router.port, raw)[0]
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert isinstance(json.loads(body)["message"], str)


def test_upgrade_request_is_not_left_hanging(router: Proc) -> None:
    """`Connection: Upgrade` (websocket) is not supported: the router still answers (the
    request itself, or an error; nginx passes it on as a plain request), and the service's
    slot is not left taken."""
    raw = (b"GET " + path("upgrade").encode() + H
           + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    for _ in range(2):  # the second time on a warm (reused) upstream connection
        assert outcome(router.port, raw, check_closed=False)[0] is not None
    resp = roundtrip(router.port, request(target=path("upgrade"), body=b"ok"), timeout=3)[0]
    assert echo_of(resp)["body"] == "ok"


# ---- oversized headers ----------------------------------------------------------------------


def _with_headers(lines: list[str], service: str = "limits") -> bytes:
    return request(target=path(service), body=b"{}", headers=tuple(lines))


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param([f"x-big: {'a' * (MAX_HEADER_BYTES + 1000)}"], id="one-huge-header"),
        pytest.param([f"x-h{i}: {'b' * 6000}" for i in range(6)], id="many-large-headers"),
    ],
)
def test_oversized_headers_get_431(router: Proc, nginx: Proc, lines: list[str]) -> None:
    """The router answers 431 (RFC 6585) where nginx answers 400 ("Request Header Or Cookie Too
    Large"): the same refusal, with the status made for it."""
    raw = _with_headers(lines)
    assert outcome(nginx.port, raw)[0] == 400
    status, headers, body = roundtrip(router.port, raw)[0]
    assert status == 431
    assert headers["connection"] == "close"
    assert "message" in json.loads(body)


def test_oversized_headers_sent_in_pieces_get_431(router: Proc) -> None:
    raw = _with_headers([f"x-h{i}: {'c' * 1000}" for i in range(MAX_HEADER_BYTES // 1000 + 4)])
    with raw_conn(router.port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i in range(0, len(raw), 700):
                s.sendall(raw[i:i + 700])
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert Reader(s).response()[0] == 431


def test_small_head_split_across_reads_with_body_is_not_431(proxy: Proc) -> None:
    """A small head whose end arrives in the same read as a large body: the body's bytes are
    not header bytes. (The pause between the two sends is a read with a timeout.)"""
    body = b"q" * (4 * MAX_HEADER_BYTES)
    raw = request(target=path("limits"), body=body)
    first, rest = raw[:30], raw[30:]
    with raw_conn(proxy.port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(first)
        s.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            pytest.fail(f"answered a partial request line: {s.recv(200)!r}")
        s.settimeout(5)
        s.sendall(rest)
        info = echo_of(Reader(s).response())
    assert (info["length"], info["sha256"]) == (len(body), sha(body))


def test_headers_just_under_the_limit_pass(router: Proc) -> None:
    lines = [f"x-h{i}: {'d' * 1000}" for i in range(MAX_HEADER_BYTES // 1000 - 3)]
    assert echo_of(roundtrip(router.port, _with_headers(lines))[0])["body"] == "{}"


def test_too_many_headers_get_431(router: Proc, nginx: Proc) -> None:
    """More than max_header_count headers: 431. nginx has no count limit (only its buffer
    size) and passes them on: the router is stricter here."""
    raw = _with_headers([f"x-n{i}: v" for i in range(MAX_HEADER_COUNT + 10)])
    assert outcome(nginx.port, raw)[0] == 200
    status, headers, _ = roundtrip(router.port, raw)[0]
    assert status == 431
    assert headers["connection"] == "close"


def test_header_count_at_the_limit_passes(router: Proc) -> None:
    # Host, Content-Length, and the rest up to the limit.
    raw = _with_headers([f"x-n{i}: v" for i in range(MAX_HEADER_COUNT - 2)])
    assert echo_of(roundtrip(router.port, raw)[0])["body"] == "{}"


# ---- slow clients ---------------------------------------------------------------------------


def _drip(port: int, data: bytes, deadline_s: float) -> tuple[bytes, float, bool]:
    """Send `data` a byte at a time, pacing with a socket read (it returns early if the server
    answers or closes). Returns (what the server sent, seconds taken, whether it closed)."""
    t0 = time.monotonic()
    got = b""
    with raw_conn(port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(10**6):
            if time.monotonic() - t0 > deadline_s:
                return got, time.monotonic() - t0, False
            try:
                s.send(data[i % len(data):i % len(data) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return got, time.monotonic() - t0, True
            s.settimeout(0.1)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return got, time.monotonic() - t0, True
            if not chunk:
                return got, time.monotonic() - t0, True
            got += chunk
    raise AssertionError("unreachable")


def test_slowloris_headers_closed(proxy: Proc) -> None:
    """Headers dripped a byte at a time never complete (the header lines repeat): the
    connection is closed once the header timeout (1 s) passes, with 408 or without a word."""
    data = (b"POST " + path("slow").encode() + b" HTTP/1.1\r\nHost: test\r\n"
            + b"x-drip: a\r\n" * 1000)
    got, took, closed = _drip(proxy.port, data, deadline_s=HEADER_TIMEOUT_S + 4)
    assert closed, f"still open after {took:.1f} s"
    assert took >= HEADER_TIMEOUT_S - 0.3
    assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got[:200]


def test_slow_body_closed(proxy: Proc) -> None:
    """A body that stops arriving: closed after the body timeout (1 s), with 408 or not."""
    with raw_conn(proxy.port) as s:
        s.sendall(request(target=path("drip"), body=None)[:-2]
                  + b"Content-Length: 100\r\n\r\n" + b"z" * 10)
        t0 = time.monotonic()
        s.settimeout(BODY_TIMEOUT_S + 4)
        try:
            got = read_until_close(s)
        except TimeoutError:
            pytest.fail("not closed")
        took = time.monotonic() - t0
    assert took >= BODY_TIMEOUT_S - 0.3
    assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got[:200]


def test_idle_connection_without_a_request_closed(router: Proc) -> None:
    with raw_conn(router.port) as s:
        assert closed_soon(s, timeout=KEEPALIVE_TIMEOUT_S + 3)


# ---- misbehaving replicas -------------------------------------------------------------------


def _router_error(port: int, target: str, body: bytes = b"{}") -> tuple[int, str]:
    status, headers, payload = roundtrip(port, request(target=target, body=body))[0]
    assert headers["content-type"] == "application/json"
    assert headers["x-ms-request-id"]
    message: str = json.loads(payload)["message"]
    return status, message


@pytest.mark.parametrize("mode", ["garbage", "badstatus", "badcl"])
def test_malformed_replica_reply_is_502(router: Proc, mode: str) -> None:
    """Better than nginx 1.22, which relays the first two as an HTTP/0.9 reply and the third
    (Content-Length: -5) as a body ended by close."""
    status, message = _router_error(router.port, path("bad", f"mode={mode}"))
    assert status == 502
    assert message


def test_replica_closing_before_reply_is_502(router: Proc, nginx: Proc) -> None:
    raw = request(target=path("closer", "mode=close"), body=b"{}")
    assert outcome(nginx.port, raw, check_closed=False)[0] == 502
    assert _router_error(router.port, path("closer", "mode=close")) == (
        502, "Replica closed connection before replying")


def test_replica_reset_is_502(router: Proc, nginx: Proc) -> None:
    raw = request(target=path("resetter", "mode=reset"), body=b"{}")
    assert outcome(nginx.port, raw, check_closed=False)[0] == 502
    assert _router_error(router.port, path("resetter", "mode=reset")) == (
        502, "Replica closed connection before replying")


def test_replica_connection_refused_is_502(router: Proc) -> None:
    assert _router_error(router.port, path("refused")) == (
        502, "Replica closed connection before replying")


def test_replica_not_answering_in_time_is_504(router: Proc) -> None:
    t0 = time.monotonic()
    status, message = _router_error(router.port, path("slow", "mode=hang"))
    assert status == 504
    assert str(SCORING_TIMEOUT_MS) in message
    assert time.monotonic() - t0 < SCORING_TIMEOUT_MS / 1000 + 2


@pytest.mark.parametrize("mode", ["badchunk", "truncated"])
def test_replica_breaking_off_mid_response_cuts_the_client(proxy: Proc, fake: Proc,
                                                            mode: str) -> None:
    """The head is out when the replica misbehaves: the client must see an incomplete
    response and a closed connection, never a complete-looking one."""
    token = f"{mode}-{proxy.port}"
    with raw_conn(proxy.port) as s:
        s.sendall(request(target=path("cut", f"mode={mode}&hold={token}"), body=b"{}"))
        r = Reader(s)
        while b"\r\n\r\n" not in r.buf:  # the head reaches the client first
            r._fill()
        fake_get(fake, f"/release?token={token}")
        s.settimeout(5)
        data = r.buf + read_until_close(s)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    if b"transfer-encoding: chunked" in head.lower():
        assert b"hello" in body
        assert not body.endswith(b"0\r\n\r\n")
    else:
        assert b"content-length: 100" in head.lower()
        assert body == b"0123456789"


def test_replica_breaking_off_in_the_first_read_is_502(router: Proc) -> None:
    """Head and a broken chunk in one read: nothing has reached the client yet, so the 200
    head the router had collected is taken back and the client gets a 502 (nginx 1.22 sends
    nothing at all and closes)."""
    with raw_conn(router.port) as s:
        s.sendall(request(target=path("cut", "mode=badchunk1"), body=b"{}"))
        s.settimeout(5)
        data = read_until_close(s)
    assert data.startswith(b"HTTP/1.1 502 "), data[:300]
    assert b"Replica sent an invalid response" in data


# ---- flow control ---------------------------------------------------------------------------


def test_slow_reader_of_large_response_is_not_buffered(big_router: Proc, fake: Proc) -> None:
    """A client that stops reading a 256 MiB response: the router stops reading the replica
    (which then stops sending) instead of buffering the rest; reading resumes it."""
    size = 256 * MiB
    pid = big_router.proc.pid
    base = rss_kib(pid)
    sent0 = fake_stats(fake)["huge_sent"]
    with raw_conn(big_router.port, timeout=30) as s:
        s.sendall(request("GET", path("big", f"mode=huge&size={size}"), body=None))
        r = Reader(s)
        while b"\r\n\r\n" not in r.buf:
            r._fill()
        head, _, rest = r.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        # Wait until the replica has stopped sending: its count holds for 0.5 s.
        deadline = time.monotonic() + 20
        last, since = -1, time.monotonic()
        while True:
            sent = fake_stats(fake)["huge_sent"] - sent0
            if sent != last:
                last, since = sent, time.monotonic()
            elif time.monotonic() - since > 0.5:
                break
            assert time.monotonic() < deadline, "the replica never stopped sending"
            fake.pause(0.05)
        assert last < 64 * MiB, f"replica sent {last // MiB} MiB to a client that read none"
        grew = rss_kib(pid) - base
        assert grew < 64 * 1024, f"router RSS grew {grew // 1024} MiB"
        received = len(rest)
        while received < size:
            data = s.recv(1 << 20)
            assert data, f"closed after {received} bytes"
            received += len(data)
        assert received == size


# ---- request ids on the answers the protocol layer gives itself ------------------------------
# azureml's clients log x-ms-request-id from every answer; 413 and 431 are answered before a
# request reaches the scoring path, which sets it on the rest.


def _assert_request_ids(headers: dict[str, str]) -> None:
    rid = headers.get("x-ms-request-id")
    assert rid is not None and len(rid) == 36, headers
    assert headers.get("x-request-id") == rid


def test_413_by_content_length_carries_request_ids(router: Proc) -> None:
    head = request(target=path("limits"), body=None)[:-2] + b"Content-Length: %d\r\n\r\n" % (
        MAX_BODY + 1)
    with raw_conn(router.port) as s:
        s.sendall(head)
        status, headers, _ = Reader(s).response()
    assert status == 413
    _assert_request_ids(headers)


def test_413_while_streaming_a_chunked_body_carries_request_ids(router: Proc) -> None:
    head = request(target=path("limits"), body=None)[:-2] + b"Transfer-Encoding: chunked\r\n\r\n"
    piece = b"%x\r\n" % (64 * 1024) + b"y" * (64 * 1024) + b"\r\n"
    with raw_conn(router.port) as s:
        s.sendall(head)
        try:
            for _ in range(2 * MAX_BODY // (64 * 1024)):
                s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while sending: the answer is already waiting
        status, headers, _ = Reader(s).response()
    assert status == 413
    _assert_request_ids(headers)


def test_431_for_header_bytes_carries_request_ids(router: Proc) -> None:
    status, headers, _ = roundtrip(
        router.port, _with_headers([f"x-big: {'a' * (MAX_HEADER_BYTES + 1000)}"]))[0]
    assert status == 431
    _assert_request_ids(headers)


def test_431_for_header_count_carries_fresh_request_ids(router: Proc) -> None:
    raw = _with_headers([f"x-n{i}: v" for i in range(MAX_HEADER_COUNT + 10)])
    first = roundtrip(router.port, raw)[0]
    second = roundtrip(router.port, raw)[0]
    assert first[0] == second[0] == 431
    _assert_request_ids(first[1])
    _assert_request_ids(second[1])
    assert first[1]["x-ms-request-id"] != second[1]["x-ms-request-id"]
