"""The replica side of the scoring path: keep-alive HTTP/1.1 connections on httptools.

`ReplicaConnections` is the idle pool of one replica (LIFO, so the warmest socket is reused and
the rest can time out); `UpstreamConnection` sends one request at a time and reports the response
to an `UpstreamSink` through callbacks. A connection that closes or misbehaves is never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol, cast

import httptools

from router.errors import UpstreamFailure
from router.writes import send

__all__ = ["ReplicaConnections", "UpstreamConnection", "UpstreamFailure", "UpstreamSink"]

# Response headers that belong to the replica hop, or that the router sets itself.
_DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
        b"x-ms-request-id",
        b"x-request-id",
        b"x-ms-client-request-id",
    }
)

# Limits on a replica's response head (nginx refuses a head larger than its proxy buffer with
# 502, "upstream sent too big header"): past either, the response is a 502 and the connection
# is closed.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 100
# Connection-header tokens that name no other header.
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive"})


class _Stop(Exception):
    """Raised in a parser callback to stop parsing the rest of the buffer."""


# Idle connections kept per replica. The pool only grows to the concurrency actually used (at
# most the replica's cap), so this bound is for safety; a low one makes a router that sends
# more than it at once close and reopen connections on every request.
MAX_IDLE_PER_REPLICA = 4096


class UpstreamSink(Protocol):
    def on_response_head(self, status: int, headers: bytes, content_length: int | None) -> None: ...
    def on_response_body(self, chunk: bytes) -> None: ...
    def on_response_end(self) -> None: ...
    def on_upstream_failure(self, failure: UpstreamFailure) -> None: ...
    def on_upstream_flush(self) -> None: ...
    def on_upstream_pause_writing(self) -> None: ...
    def on_upstream_resume_writing(self) -> None: ...


class ReplicaConnections:
    """Idle keep-alive connections to one replica."""

    __slots__ = ("_idle", "closed", "host", "host_header", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.host_header = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        self._idle: list[UpstreamConnection] = []
        self.closed = False

    def take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
        return None

    def put_idle(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self._idle) >= MAX_IDLE_PER_REPLICA:
            conn.close()
        else:
            self._idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    async def connect(self, loop: asyncio.AbstractEventLoop) -> UpstreamConnection:
        _, conn = await loop.create_connection(
            lambda: UpstreamConnection(self), self.host, self.port
        )
        return conn

    def close(self) -> None:
        """The replica left the pool: close idle connections now, busy ones when they finish."""
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_bad",
        "_chunked",
        "_close_delimited",
        "_complete",
        "_conn_tokens",
        "_content_length",
        "_corked",
        "_head_bytes",
        "_header_count",
        "_headers",
        "_in_head",
        "_informational",
        "_out",
        "_parser",
        "_pool",
        "_trailing",
        "_transport",
        "got_bytes",
        "reused",
        "sink",
        "usable",
    )

    def __init__(self, pool: ReplicaConnections) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self.sink: UpstreamSink | None = None
        self.usable = False
        self.reused = False
        self.got_bytes = False
        self._headers: list[bytes] = []
        self._content_length: int | None = None
        self._informational = False
        self._chunked = False
        self._close_delimited = False
        self._corked = False
        self._out: list[bytes] = []
        self._in_head = False
        self._head_bytes = 0
        self._header_count = 0
        self._conn_tokens: list[bytes] = []
        # Set while a buffer is parsed: the sink whose response just completed (told once the
        # whole buffer is parsed), bytes found past it, a response found malformed.
        self._complete: UpstreamSink | None = None
        self._trailing = False
        self._bad = False

    # ---- used by the proxy ----------------------------------------------------------------

    def begin(self, sink: UpstreamSink) -> None:
        self.sink = sink
        self.got_bytes = False

    def cork(self) -> None:
        self._corked = True

    def uncork(self) -> None:
        self._corked = False
        out = self._out
        if out and self._transport is not None:
            self._out = []
            send(self._transport, out)

    def send(self, data: bytes) -> None:
        if self._corked:
            self._out.append(data)
        elif self._transport is not None:
            self._transport.write(data)

    def pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def release(self) -> None:
        """The exchange is over: back to the idle pool if the connection is clean (its
        response was complete, nothing followed it, the replica keeps it alive), else closed."""
        self.sink = None
        self.reused = True
        if self.usable:
            self._pool.put_idle(self)
        else:
            self.close()

    def close(self) -> None:
        self.usable = False
        self.sink = None
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.usable = False
        self.sink = None
        if self._transport is not None:
            self._transport.abort()

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but implement it.
        self._transport = cast(asyncio.Transport, transport)
        self.usable = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self._transport = None
        self._pool.discard(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_upstream_failure(UpstreamFailure.CLOSED)

    def eof_received(self) -> bool | None:
        self.usable = False
        sink = self.sink
        if sink is not None and self._close_delimited:
            # A response delimited by the end of the connection is complete now.
            self.sink = None
            sink.on_response_end()
        return None

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes while idle: the replica is confused; never reuse this connection.
            self.abort()
            return
        self.got_bytes = True
        if self._in_head:
            self._head_bytes += len(data)  # a guard for a head line that never ends
        try:
            self._parser.feed_data(data)
        except _Stop:
            pass
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self._complete is None:
                self._bad = True
            else:
                self._trailing = True  # garbage after a complete response
        if self._in_head and self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            self._bad = True
        if self._bad:
            self._bad = False
            self._complete = None
            self.abort()
            sink.on_upstream_failure(UpstreamFailure.BAD_RESPONSE)
            return
        done = self._complete
        if done is not None:
            # The response ended in this buffer. Only now, with every byte of the buffer
            # parsed, may the connection be released (and handed to another request): bytes
            # past the response are an error that closes it, never the next one's response.
            self._complete = None
            if self._trailing:
                self._trailing = False
                self.usable = False
            done.on_response_end()
            return
        sink.on_upstream_flush()

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_resume_writing()

    # ---- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete is not None:
            self._trailing = True  # a second response in the buffer of the first one
            raise _Stop
        self._headers = []
        self._content_length = None
        self._chunked = False
        self._close_delimited = False
        self._conn_tokens = []
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_bytes += len(name) + len(value) + 4
        if (
            self._header_count > MAX_RESPONSE_HEADERS
            or self._head_bytes > MAX_RESPONSE_HEAD_BYTES
        ):
            self._bad = True
            raise _Stop
        name = name.lower()
        if name in _DROP_RESPONSE_HEADERS:
            if name == b"content-length":
                # One Content-Length, all digits, never with chunked: a replica that frames
                # its answer two ways is answered 502, never guessed at (nginx does the same).
                if self._content_length is not None or self._chunked or not value.isdigit():
                    self._bad = True
                    raise _Stop
                self._content_length = int(value)
            elif name == b"transfer-encoding":
                if (
                    self._chunked
                    or self._content_length is not None
                    or value.strip().lower() != b"chunked"
                ):
                    self._bad = True
                    raise _Stop
                self._chunked = True
            elif name == b"connection":
                self._conn_tokens += (t.strip().lower() for t in value.split(b","))
            return
        self._headers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        if status == 101:
            # The router never asks for an upgrade (it drops the client's Upgrade header).
            self._bad = True
            raise _Stop
        self._informational = 100 <= status < 200
        if self._informational:
            return  # 100 Continue and friends are the replica hop's business
        self._close_delimited = (
            self._content_length is None and not self._chunked and status not in (204, 304)
        )
        headers = self._headers
        named = [t for t in self._conn_tokens if t and t not in _CONNECTION_OPTIONS]
        if named:
            # Headers the replica names in Connection are hop-by-hop too.
            headers = [h for h in headers if h.split(b":", 1)[0] not in named]
        sink = self.sink
        if sink is not None:
            sink.on_response_head(status, b"".join(headers), self._content_length)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if not self._parser.should_keep_alive():
            self.usable = False
        # Told to the sink once the whole buffer is parsed (data_received).
        self._complete, self.sink = self.sink, None
