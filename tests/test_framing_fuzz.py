"""Differential fuzzing of request framing: the router against h11 as the reference parser.

hypothesis writes one to three pipelined requests with random framings (Content-Length,
chunked with random chunk sizes, extensions and trailers, no body), sometimes broken on purpose
(two lengths, a length with chunked, an unknown coding, a bad chunk size, bare LF, a folded
header, a signed length), and sends them to a real router split at random points across
writes. Each request the router forwards reaches tests/fake_replicas.py, whose echo names what
it received. The property: for every request, either the replica received exactly what h11
parsed (method, target, body bytes), or the router answered 4xx (or 501 for an unknown
Transfer-Encoding, as nginx does) and closed the connection, and no request h11 refuses is ever
forwarded.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Proc, Reader, raw_conn, start_fake_replica, start_router

MUTATIONS = ("dup_cl", "cl_te", "te_coding", "bad_hex", "lf_only", "obs_fold", "plus_cl")


@dataclass
class Parsed:
    method: str
    target: str
    body: bytes


@st.composite
def one_request(draw: st.DrawFn, i: int) -> bytes:
    method = draw(st.sampled_from(["POST", "GET"]))
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    body = b"" if framing == "none" else draw(st.binary(max_size=200))
    lines = [f"{method} /api/v1/service/fuzz/score?mode=echo&i={i} HTTP/1.1", "Host: t"]
    mutation = draw(st.sampled_from([None] * 5 + list(MUTATIONS)))
    payload = body
    if framing == "length":
        value = f"+{len(body)}" if mutation == "plus_cl" else str(len(body))
        lines.append(f"Content-Length: {value}")
        if mutation == "dup_cl":
            lines.append(f"Content-Length: {len(body) + 1}")
    elif framing == "chunked":
        coding = "gzip, chunked" if mutation == "te_coding" else "chunked"
        lines.append(f"Transfer-Encoding: {coding}")
        if mutation == "cl_te":
            lines.append(f"Content-Length: {len(body)}")
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        out = []
        for piece in pieces:
            if not piece:
                continue
            size = b"%x" % len(piece)
            if draw(st.booleans()):
                size = size.upper()
            if mutation == "bad_hex":
                size = b"z" + size
            ext = b";x=1" if draw(st.booleans()) else b""
            out.append(size + ext + b"\r\n" + piece + b"\r\n")
        trailer = b"x-t: 1\r\n" if draw(st.booleans()) else b""
        payload = b"".join(out) + b"0\r\n" + trailer + b"\r\n"
    if mutation == "obs_fold":
        lines.append("X-Folded: a\r\n b")
    eol = "\n" if mutation == "lf_only" else "\r\n"
    return (eol.join(lines) + eol + eol).encode() + payload


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    count = draw(st.integers(1, 3))
    data = b"".join(draw(one_request(i)) for i in range(count))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))))
    return data, cuts


def h11_parse(data: bytes) -> tuple[list[Parsed], bool]:
    """The complete requests h11 reads from `data`, and whether it refused what followed."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    parsed: list[Parsed] = []
    current: Parsed | None = None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return parsed, True
        if isinstance(event, h11.Request):
            current = Parsed(event.method.decode(), event.target.decode(), b"")
        elif isinstance(event, h11.Data):
            assert current is not None
            current.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert current is not None
            parsed.append(current)
            current = None
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
        else:  # NEED_DATA: nothing more is complete
            return parsed, False


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def router(tmp: Path) -> Iterator[Proc]:
    fake = start_fake_replica(tmp)
    r = start_router(tmp, {"services": {"fuzz": {
        "upstreams": [f"127.0.0.1:{fake.port}"], "auth_enabled": False,
        "replica_max_concurrent_requests": 4}}})
    yield r
    r.stop()
    fake.stop()


def _closed(s: socket.socket, reader: Reader) -> bool:
    if reader.buf:
        return False
    s.settimeout(3)
    try:
        return s.recv(65536) == b""
    except ConnectionResetError:
        return True


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=exchanges())
def test_router_framing_agrees_with_h11(router: Proc, case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    expected, refused = h11_parse(data)
    with raw_conn(router.port, timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            s.sendall(data[a:b])
        reader = Reader(s)
        for i in range(len(expected) + (1 if refused else 0)):
            try:
                status, _, body = reader.response()
            except ConnectionError:
                pytest.fail(f"closed without an answer to request {i}: {data!r}")
            if status != 200:
                assert 400 <= status < 500 or status == 501, (status, body, data)
                assert _closed(s, reader), f"not closed after {status}: {data!r}"
                return
            assert i < len(expected), f"forwarded a request h11 refuses: {data!r}"
            got = json.loads(body)
            want = expected[i]
            assert (got["method"], got["path"] + "?" + got["query"]) == (
                want.method, want.target.replace("/api/v1/service/fuzz/score", "/score")), data
            assert (got["length"], got["sha256"]) == (
                len(want.body), hashlib.sha256(want.body).hexdigest()), data
