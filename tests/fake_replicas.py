"""Small misbehaving upstream servers for protocol tests, run as a process of their own.

    python tests/fake_replicas.py --port PORT

One asyncio server whose behaviour is chosen per request by the query string (the router and
nginx both forward it), so one process serves every case and a test names what it wants:

    ?mode=echo (default)    read the whole body (Content-Length or chunked) without storing it;
                            reply JSON: method, path, headers, framing, length, sha256, and the
                            body itself when it is at most 64 KiB
    ?mode=close             read the request head, close without replying
    ?mode=reset             read the request head, reset the connection (RST)
    ?mode=hang              read the request, never reply (until the peer goes away)
    ?mode=garbage           reply with bytes that are not HTTP
    ?mode=badstatus         reply with a status line whose code is not a number
    ?mode=badcl             reply with a Content-Length that is not a number
    ?mode=badchunk          reply 200 chunked and one chunk, then a chunk whose size is not hex
    ?mode=truncated         reply 200 with Content-Length 100, send 10 bytes, close
        (both with &hold=TOKEN: after the first part, wait for `GET /release?token=TOKEN`,
        so a test can see the head reach the client before the reply breaks off)
    ?mode=chunked&pieces=3,5,0x10&trailer=1
                            reply 200 chunked with pieces of those sizes (ASCII digits
                            '0'..'9' repeating), a chunk extension, optionally a trailer
    ?mode=close_delimited&size=N
                            reply 200 with neither Content-Length nor chunked, then close
    ?mode=huge&size=N       reply 200 with Content-Length N, streamed in 64 KiB writes with
                            flow control; progress is reported by GET /stats ("huge_sent")
    ?mode=continue          send "100 Continue", then the echo reply
    ?mode=early             reply 200 after the head, without reading the body, then close
    ?mode=slow&ms=N         read the body, wait N ms, reply 200 (in-flight counts in /stats;
                            &hold=TOKEN waits for its release first)

Hostile replies, each sent in one write on a connection kept alive (so a router that reuses it
afterwards shows what it made of the bytes); all take &hold=TOKEN (wait before replying):

    ?mode=overflow          200 with Content-Length 5 followed, in the same write, by a whole
                            second response ("stolen"), as a replica that miscounts does
    ?mode=clte              200 with both Content-Length and Transfer-Encoding: chunked
    ?mode=dupcl&second=N    200 with Content-Length 5 and a second Content-Length N
    ?mode=badchunk1         200 chunked, one chunk, then a chunk size that is not hex
    ?mode=hints             103 Early Hints, then 200 "hinted"
    ?mode=switch            101 Switching Protocols (nobody asked for an upgrade)
    ?mode=bighead&size=N    200 with one header N bytes long
    ?mode=manyheaders&count=N
                            200 with N headers
    ?mode=bodyless&status=S 204 or 304 with Content-Length 6 and a body "stolen"
    ?mode=connhdr           200 with "Connection: x-secret" and the header X-Secret

`GET /` answers `Healthy` (what probes ask); `GET /stats` answers counters as JSON (requests,
in-flight now and at most, connections, huge_sent); `GET /release?token=T` lets a held reply
go on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import socket
import struct
import sys
from urllib.parse import parse_qs, urlsplit

ECHO_BODY_LIMIT = 64 * 1024
READ_SIZE = 256 * 1024


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
        self.huge_sent = 0

    def as_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()


STATS = Stats()
RELEASES: dict[str, asyncio.Event] = {}


def _release_event(token: str) -> asyncio.Event:
    return RELEASES.setdefault(token, asyncio.Event())


async def _hold(query: dict[str, str]) -> None:
    token = query.get("hold")
    if token:
        await _release_event(token).wait()


class BadRequest(Exception):
    pass


def _response(status: str, body: bytes, ctype: bytes = b"application/json",
              close: bool = False) -> bytes:
    head = b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype + b"\r\n"
    head += b"content-length: %d\r\n" % len(body)
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


def _digits(n: int, start: int = 0) -> bytes:
    pattern = b"0123456789" * (n // 10 + 2)
    off = start % 10
    return pattern[off:off + n]


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> dict:
    """Read the body by its framing, hashing it as it goes (never holding more than a read)."""
    names = {k.lower(): v for k, v in headers}
    sha = hashlib.sha256()
    length = 0
    kept = bytearray()
    chunks = 0

    def take(data: bytes) -> None:
        nonlocal length
        sha.update(data)
        length += len(data)
        if len(kept) <= ECHO_BODY_LIMIT:
            kept.extend(data[: ECHO_BODY_LIMIT + 1 - len(kept)])

    te = names.get("transfer-encoding")
    if te is not None:
        if te.strip().lower() != "chunked":
            raise BadRequest(f"transfer-encoding {te!r}")
        framing = "chunked"
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                break
            chunks += 1
            left = size
            while left:
                data = await reader.read(min(left, READ_SIZE))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                take(data)
                left -= len(data)
            if await reader.readexactly(2) != b"\r\n":
                raise BadRequest("chunk not followed by CRLF")
    elif "content-length" in names:
        framing = "length"
        left = int(names["content-length"])
        while left:
            data = await reader.read(min(left, READ_SIZE))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            take(data)
            left -= len(data)
    else:
        framing = "none"
    return {
        "framing": framing,
        "length": length,
        "chunks": chunks,
        "sha256": sha.hexdigest(),
        "body": bytes(kept).decode("latin-1") if length <= ECHO_BODY_LIMIT else None,
    }


def _hostile(mode: str, query: dict[str, str]) -> bytes | None:
    """The bytes of a hostile reply (see the module's docstring), or None for another mode."""
    ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
    if mode == "overflow":
        return ok + b"content-length: 5\r\n\r\nhello" + ok + b"content-length: 6\r\n\r\nstolen"
    if mode == "clte":
        return ok + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    if mode == "badchunk1":
        return ok + b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n"
    if mode == "dupcl":
        second = query.get("second", "6").encode()
        return ok + b"content-length: 5\r\ncontent-length: " + second + b"\r\n\r\nhello!"
    if mode == "hints":
        return (b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n"
                + ok + b"content-length: 6\r\n\r\nhinted")
    if mode == "switch":
        return (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                b"connection: upgrade\r\n\r\n\x81\x05hello")
    if mode == "bighead":
        size = int(query.get("size", "200000"))
        return ok + b"x-big: " + b"a" * size + b"\r\ncontent-length: 2\r\n\r\nok"
    if mode == "manyheaders":
        count = int(query.get("count", "5000"))
        return ok + b"".join(b"x-h%d: v\r\n" % i for i in range(count)) + (
            b"content-length: 2\r\n\r\nok")
    if mode == "bodyless":
        status = query.get("status", "204").encode()
        return b"HTTP/1.1 " + status + b" X\r\ncontent-length: 6\r\n\r\nstolen"
    if mode == "connhdr":
        return (ok + b"connection: x-secret\r\nx-secret: 1\r\nx-kept: 1\r\n"
                b"content-length: 2\r\n\r\nok")
    return None


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """One request; True to keep the connection for another."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return False
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    url = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    mode = query.get("mode", "echo")
    conn_hdr = {k.lower(): v.lower() for k, v in headers}.get("connection", "")
    keep = "close" not in conn_hdr and (version == "HTTP/1.1" or "keep-alive" in conn_hdr)

    if method == "GET" and url.path == "/":
        writer.write(_response("200 OK", b"Healthy", b"text/plain"))
        return keep
    if method == "GET" and url.path == "/stats":
        writer.write(_response("200 OK", STATS.as_json()))
        return keep
    if method == "GET" and url.path == "/release":
        _release_event(query.get("token", "")).set()
        writer.write(_response("200 OK", b"{}"))
        return keep

    STATS.requests += 1
    if mode == "close":
        writer.close()
        return False
    if mode == "reset":
        _reset(writer)
        return False
    if mode == "early":
        writer.write(_response("200 OK", b'{"early":true}', close=True))
        await writer.drain()
        writer.close()
        return False

    STATS.in_flight += 1
    STATS.max_in_flight = max(STATS.max_in_flight, STATS.in_flight)
    try:
        if mode == "continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        info = await _read_body(reader, headers)
        if mode == "hang":
            await reader.read()  # until the peer closes
            return False
        if mode == "slow":
            await _hold(query)
            await asyncio.sleep(int(query.get("ms", "100")) / 1000)
            writer.write(_response("200 OK", b'{"slow":true}'))
            return keep
        hostile = _hostile(mode, query)
        if hostile is not None:
            await _hold(query)
            writer.write(hostile)
            return keep
        if mode in ("echo", "continue"):
            info.update(method=method, path=url.path, query=url.query, version=version,
                        headers=headers)
            writer.write(_response("200 OK", json.dumps(info).encode()))
            return keep
        if mode == "garbage":
            writer.write(b"this is not HTTP at all\r\n\r\n")
        elif mode == "badstatus":
            writer.write(b"HTTP/1.1 abc OK\r\ncontent-length: 0\r\n\r\n")
        elif mode == "badcl":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\nhello")
        elif mode == "badchunk":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n")
            await writer.drain()
            await _hold(query)
            writer.write(b"zz\r\nworld\r\n0\r\n\r\n")
            await writer.drain()
            await reader.read()  # the router must give up on us
        elif mode == "truncated":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
            await writer.drain()
            await _hold(query)
        elif mode == "chunked":
            pieces = [int(p, 0) for p in query.get("pieces", "3,5,16").split(",")]
            out = [b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                   b"transfer-encoding: chunked\r\n\r\n"]
            sent = 0
            for n in pieces:
                if n:
                    out.append(b"%x;ext=1\r\n" % n + _digits(n, sent) + b"\r\n")
                    sent += n
            out.append(b"0\r\n")
            if query.get("trailer"):
                out.append(b"x-trailer: yes\r\n")
            out.append(b"\r\n")
            writer.write(b"".join(out))
            return keep
        elif mode == "close_delimited":
            size = int(query.get("size", "1000"))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                         b"connection: close\r\n\r\n" + _digits(size))
        elif mode == "huge":
            size = int(query.get("size", str(1 << 20)))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                         b"content-length: %d\r\n\r\n" % size)
            block = _digits(64 * 1024)
            left = size
            while left:
                n = min(left, len(block))
                writer.write(block[:n])
                await writer.drain()
                STATS.huge_sent += n
                left -= n
            return keep
        else:
            writer.write(_response("400 Bad Request", b'{"message":"unknown mode"}'))
            return keep
        await writer.drain()
        writer.close()
        return False
    finally:
        STATS.in_flight -= 1


async def _connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    STATS.connections += 1
    try:
        while await _serve_one(reader, writer):
            await writer.drain()
    except (BadRequest, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as e:
        with contextlib.suppress(ConnectionError):
            writer.write(_response("400 Bad Request", json.dumps({"message": str(e)}).encode(),
                                   close=True))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(_connection, host, port, limit=1 << 20)
    print(f"fake replica on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
