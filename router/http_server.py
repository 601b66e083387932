"""The client side of the scoring path: an HTTP/1.1 server protocol on httptools (llhttp).

It parses requests, enforces the protocol limits (header size and count, body size, timeouts),
answers pipelined requests in order, frames responses (Content-Length, chunked, or close for
HTTP/1.0), and applies flow control in both directions. It knows nothing of services, auth or
admission: each request is handed, once its headers are in and it is first in line, to a
`RequestHandler` as an `Exchange`, through which the handler reads the body and writes the
response.

Per request the work is callbacks only (no Task), and headers are kept as one list of
(lower-cased name, value) pairs that the handler scans once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from router import errors
from router.requestid import new_request_id
from router.writes import send

# Reasons the client's socket reading is paused; reading resumes when none is left.
PAUSE_PIPELINE = 1  # a later request is parsed while an earlier one is served
PAUSE_BUFFER = 2  # body bytes buffered before the handler is ready for them
PAUSE_UPSTREAM = 4  # the upstream cannot take the body as fast as the client sends it
PAUSE_CLOSING = 8  # a fatal error is being answered; nothing more is read

# Body bytes held for a request before its upstream is ready: past this the client is paused.
BUFFER_HIGH_WATER = 256 * 1024
# A lingering close reads and drops a client's input for at most this long.
LINGER_S = 5.0
# After an early response (an error), a body this small is read and discarded to keep the
# connection; a larger or unknown one closes it.
DISCARD_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100
    max_body_bytes: int = 100 * 1024 * 1024
    header_timeout_s: float = 60.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    # A body must also keep up this average rate (bytes/s) once it has been read for
    # min(body_rate_grace_s, body_timeout_s): the idle timeout alone lets a byte every few
    # seconds hold a replica slot for as long as the scoring timeout.
    min_body_rate: int = 1024
    body_rate_grace_s: float = 5.0


# Request headers the protocol itself looks at (one dict lookup for all the others).
_CONTENT_LENGTH, _TRANSFER_ENCODING, _HOST, _EXPECT = range(4)
_SPECIAL_REQUEST_HEADERS = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"host": _HOST,
    b"expect": _EXPECT,
}


class BodySink(Protocol):
    """What a handler attaches to an exchange to receive its body and client events."""

    def on_body(self, chunk: bytes) -> None: ...
    def on_body_end(self) -> None: ...
    def on_client_lost(self) -> None: ...
    def on_client_flush(self) -> None:
        """The bytes of one read are parsed: what was collected for the upstream can go."""
    def on_client_pause_writing(self) -> None: ...
    def on_client_resume_writing(self) -> None: ...


class RequestHandler(Protocol):
    def handle(self, ex: Exchange) -> None:
        """Called once per request, when its headers are complete and it is first in line."""


class _Closing(Exception):
    """Raised inside parser callbacks to stop parsing after a fatal protocol error."""


class Exchange:
    """One request and its response on a client connection."""

    __slots__ = (
        "_chunked_out",
        "_conn",
        "_corked",
        "_discarding",
        "_flowing",
        "_head",
        "_out",
        "_pending",
        "_pending_bytes",
        "body_bytes",
        "body_done",
        "bytes_out",
        "chunked",
        "close_after",
        "content_length",
        "expect_continue",
        "headers",
        "http10",
        "keep_alive",
        "method",
        "response_done",
        "response_started",
        "sink",
        "status",
        "url",
    )

    def __init__(self, conn: HttpServerProtocol) -> None:
        self._conn = conn
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http10 = False
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.body_bytes = 0
        self.body_done = False
        self.sink: BodySink | None = None
        self._flowing = False
        self._discarding = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.response_started = False
        self.response_done = False
        self.close_after = False
        self.status = 0
        self.bytes_out = 0
        self._chunked_out = False
        self._head: bytes | None = None
        self._corked = False
        self._out: list[bytes] = []

    # ---- request body ---------------------------------------------------------------------

    def attach(self, sink: BodySink) -> None:
        """Receive client events now; the body is held until `start_body`."""
        self.sink = sink

    def detach(self) -> None:
        """The handler is done with this exchange: what is left of the body is dropped. Also
        breaks the exchange <-> handler reference cycle, so both are freed at once instead of
        by the cyclic garbage collector (whose full passes pause the loop for milliseconds)."""
        self.sink = None
        if self._flowing:
            self._flowing = False
            self._discarding = True

    def start_body(self) -> None:
        """Deliver the body to the sink: what is buffered now, the rest as it arrives."""
        if self._flowing or self.response_done:
            return
        self._flowing = True
        sink = self.sink
        assert sink is not None
        if self.expect_continue and not self.body_done and not self.body_bytes:
            self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        self._conn.resume(PAUSE_BUFFER)
        for chunk in pending:
            sink.on_body(chunk)
        if self.body_done:
            sink.on_body_end()

    def _on_body(self, chunk: bytes) -> None:
        if self._flowing:
            assert self.sink is not None
            self.sink.on_body(chunk)
        elif self._discarding:
            return
        else:
            self._pending.append(chunk)
            self._pending_bytes += len(chunk)
            if self._pending_bytes > BUFFER_HIGH_WATER:
                self._conn.pause(PAUSE_BUFFER)

    def _on_body_end(self) -> None:
        self.body_done = True
        if self._flowing:
            assert self.sink is not None
            self.sink.on_body_end()

    def pause_body(self) -> None:
        """Back-pressure from the upstream: stop reading the client."""
        self._conn.pause(PAUSE_UPSTREAM)

    def resume_body(self) -> None:
        self._conn.resume(PAUSE_UPSTREAM)

    # ---- response -------------------------------------------------------------------------

    def cork(self) -> None:
        """Collect writes until `uncork`, so a head and a small body go out in one send."""
        self._corked = True

    def uncork(self) -> None:
        self._corked = False
        out = self._out
        if out:
            self._out = []
            self._conn.writelines(out)

    def _send(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self._corked:
            self._out.append(data)
        else:
            self._conn.write(data)

    def start_response(self, status: int, headers: bytes, content_length: int | None) -> None:
        """Send the head. `headers` is complete `name: value\\r\\n` lines without framing or
        connection headers; `content_length=None` streams (chunked, or close for HTTP/1.0)."""
        self.response_started = True
        self.status = status
        if status < 200 or status in (204, 304) or self.method == b"HEAD":
            framing = b"" if content_length is None else b"content-length: %d\r\n" % content_length
        elif content_length is not None:
            framing = b"content-length: %d\r\n" % content_length
        elif self.http10:
            framing = b""
            self.close_after = True
        else:
            framing = b"transfer-encoding: chunked\r\n"
            self._chunked_out = True
        if not self.keep_alive or self.close_after or self._conn.closing_now:
            self.close_after = True
            conn_hdr = b"connection: close\r\n"
        elif self.http10:
            conn_hdr = b"connection: keep-alive\r\n"
        else:
            conn_hdr = b""
        self._send(errors.status_line(status) + headers + framing + conn_hdr + b"\r\n")

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._chunked_out:
            self._send(b"%x\r\n" % len(chunk))
            self._send(chunk)
            self._send(b"\r\n")
        else:
            self._send(chunk)

    def end(self) -> None:
        """The response is complete."""
        if self._chunked_out:
            self._send(b"0\r\n\r\n")
        self.uncork()
        self.response_done = True
        self._conn.exchange_done(self)

    def respond(self, status: int, headers: bytes, body: bytes) -> None:
        """A whole response at once (router errors, health)."""
        self.start_response(status, headers, len(body))
        if body:
            self._send(body)
        self.end()

    def respond_error(self, err: errors.RouterError, headers: bytes = b"") -> None:
        self.respond(
            err.status,
            b"content-type: application/json\r\n" + err.headers + headers,
            errors.json_message(err.message),
        )

    def retract(self) -> bool:
        """Take back a response none of which has left the router (its head and body are still
        corked), so the exchange can be answered anew: True if it was."""
        if not self._corked or self.response_done or sum(map(len, self._out)) != self.bytes_out:
            return False
        self._out = []
        self._corked = False
        self.bytes_out = 0
        self.response_started = False
        self.status = 0
        self._chunked_out = False
        return True

    @property
    def peer(self) -> str:
        return self._conn.peer

    @property
    def scheme(self) -> bytes:
        return self._conn.scheme

    def abort(self) -> None:
        """The response cannot be completed (its head is out): close the connection."""
        self.response_done = True
        self._conn.abort()

    @property
    def in_read(self) -> bool:
        """True while the client's bytes are being parsed (`on_client_flush` will follow)."""
        return self._conn.feeding


def _request_ids() -> bytes:
    """The request id headers of an answer the protocol layer gives itself (413, 431, 400, ...):
    azureml's clients expect them on every answer, as the scoring path sets them."""
    rid = new_request_id().encode()
    return b"x-ms-request-id: " + rid + b"\r\nx-request-id: " + rid + b"\r\n"


def _abandon(ex: Exchange) -> None:
    """Tell the handler its exchange is over from the client's side (gone or refused)."""
    sink, ex.sink = ex.sink, None
    ex._flowing = False
    if sink is not None:
        sink.on_client_lost()


class HttpServerProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(
        self,
        handler: RequestHandler,
        limits: Limits,
        loop: asyncio.AbstractEventLoop,
        connections: set[HttpServerProtocol],
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._loop = loop
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._current: Exchange | None = None  # first in line: being answered
        self._parsing: Exchange | None = None  # the one the parser is filling
        self._pipeline: deque[Exchange] = deque()  # parsed, waiting for the current to finish
        self._paused = 0
        self.write_paused = False
        self.feeding = False  # inside data_received: a flush follows
        self.closing = False
        self._ignore_input = False
        self._linger_until = 0.0  # closing gracefully: reading and dropping until then
        self._pending_error: errors.RouterError | None = None
        self._head_bytes = 0
        self._head_size = 0
        self._header_count = 0
        self._hosts = 0
        self._in_head = False
        # Timeouts are checked by the server's sweeper from these (no timer per request).
        self._head_started = 0.0
        self.last_activity = 0.0
        # Time spent reading the current body while the router was not the one pausing it,
        # as the sweeper sees it (for the minimum body rate).
        self._body_active_s = 0.0
        self._body_checked = 0.0
        self.peer: str = ""
        self.scheme = b"http"

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but implement it.
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)
        self.last_activity = self._loop.time()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = str(peer[0])
        if transport.get_extra_info("ssl_object") is not None:
            self.scheme = b"https"

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self.closing = True
        for ex in (self._current, *self._pipeline):
            if ex is not None:
                ex.response_done = True
                _abandon(ex)
        self._current = None
        self._pipeline.clear()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        if self._ignore_input:
            return  # after `Connection: close`, an upgrade, or while lingering: dropped
        if self._in_head:
            self._head_bytes += len(data)
        self.feeding = True
        try:
            self._parser.feed_data(data)
        except _Closing:
            pass
        except httptools.HttpParserUpgrade:
            self._upgrade_requested()
        except httptools.HttpParserError:
            if not self._ignore_input:  # (bytes after `Connection: close` are just dropped)
                self._fatal(errors.bad_request("Malformed HTTP request"))
        else:
            if self._in_head and self._head_bytes > self._limits.max_header_bytes:
                self._fatal(errors.headers_too_large())
        finally:
            self.feeding = False
        # Whatever happened, what was collected for the current upstream request goes now.
        cur = self._current
        if cur is not None and cur.sink is not None:
            cur.sink.on_client_flush()

    def _upgrade_requested(self) -> None:
        """Protocol upgrades (websocket) are not proxied: the request was answered as a plain
        one (its Upgrade headers are hop-by-hop and not forwarded), then the connection closes,
        since what follows on it is not HTTP."""
        self._ignore_input = True
        self.pause(PAUSE_CLOSING)
        last = self._pipeline[-1] if self._pipeline else self._current
        if last is None:
            self._close()
        else:
            last.close_after = True

    def eof_received(self) -> bool | None:
        # A client that closes its side has gone, as nginx sees it (499): a queued request
        # leaves the queue now instead of taking a replica slot for nobody.
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self._current
        if ex is not None and ex.sink is not None:
            ex.sink.on_client_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_activity = self._loop.time()
        ex = self._current
        if ex is not None and ex.sink is not None:
            ex.sink.on_client_resume_writing()

    # ---- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = Exchange(self)
        self._in_head = True
        self._head_bytes = 0
        self._head_size = 0
        self._header_count = 0
        self._hosts = 0
        self._head_started = self._loop.time()

    def on_url(self, url: bytes) -> None:
        ex = self._parsing
        assert ex is not None
        ex.url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self._parsing
        assert ex is not None
        self._header_count += 1
        # The parsed size counts exactly; the raw byte count in data_received only guards a
        # header line that never ends.
        self._head_size += len(name) + len(value) + 4
        if (self._header_count > self._limits.max_header_count
                or self._head_size > self._limits.max_header_bytes):
            self._fatal(errors.headers_too_large())
            raise _Closing
        name = name.lower()
        ex.headers.append((name, value))
        special = _SPECIAL_REQUEST_HEADERS.get(name)
        if special is None:
            return
        if special == _CONTENT_LENGTH:
            # llhttp refuses conflicting duplicates and CL with TE; it has checked the digits.
            ex.content_length = int(value)
        elif special == _TRANSFER_ENCODING:
            # Only plain chunked is understood; anything else is refused (nginx: 501), never
            # guessed at, since a proxy and a replica that frame a body differently is how
            # requests get smuggled.
            if value.strip().lower() != b"chunked":
                self._fatal(errors.RouterError(501, "Transfer-Encoding not supported"))
                raise _Closing
            ex.chunked = True
        elif special == _HOST:
            self._hosts += 1
        elif value.lower() == b"100-continue":
            ex.expect_continue = True

    def on_headers_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        self._in_head = False
        self._body_active_s = 0.0
        self._body_checked = self._loop.time()
        parser = self._parser
        ex.method = parser.get_method()
        version = parser.get_http_version()
        ex.http10 = version == "1.0"
        ex.keep_alive = parser.should_keep_alive()
        problem = None
        if version not in ("1.1", "1.0"):
            problem = errors.RouterError(505, "HTTP version not supported")
        elif self._hosts > 1 or (self._hosts == 0 and not ex.http10):
            problem = errors.bad_request("A request needs exactly one Host header")
        elif ex.chunked and ex.http10:
            problem = errors.bad_request("Transfer-Encoding is not allowed in HTTP/1.0")
        if problem is not None:
            self._fatal(problem)
            raise _Closing
        if ex.http10:
            ex.expect_continue = False  # an HTTP/1.0 client does not wait for 100 Continue
        if ex.content_length is not None and ex.content_length > self._limits.max_body_bytes:
            # Refused before a byte of the body is read, and the connection is not kept.
            ex.close_after = True
        if self._current is None:
            self._current = ex
            self._start(ex)
        else:
            self._pipeline.append(ex)
            self.pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        assert ex is not None
        ex.body_bytes += len(body)
        if ex.body_bytes > self._limits.max_body_bytes:
            self._body_too_large(ex)
            raise _Closing
        ex._on_body(body)

    def on_message_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        self._parsing = None
        self.last_activity = self._loop.time()
        if not ex.keep_alive:
            # Nothing after `Connection: close` is read (nginx ignores it too; llhttp errors).
            self._ignore_input = True
        ex._on_body_end()
        if ex.response_done and ex is self._current:
            self._next()

    # ---- flow and lifecycle ---------------------------------------------------------------

    def pause(self, reason: int) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self._transport is not None:
                self._transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        if self._transport is not None:
            send(self._transport, data)

    @property
    def closing_now(self) -> bool:
        """Closing after the current response (not after answering earlier pipelined ones)."""
        return self.closing and self._pending_error is None

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    def close_when_idle(self) -> None:
        """Graceful shutdown: finish the current response, then close."""
        self.closing = True
        if self._current is None and self._transport is not None:
            self._transport.close()

    def _start(self, ex: Exchange) -> None:
        if ex.close_after and ex.content_length is not None and (
            ex.content_length > self._limits.max_body_bytes
        ):
            ex._discarding = True
            ex.respond_error(errors.body_too_large(self._limits.max_body_bytes), _request_ids())
            return
        self._handler.handle(ex)

    def exchange_done(self, ex: Exchange) -> None:
        """The response of the current exchange has been written in full."""
        if ex is not self._current:
            return
        self.last_activity = self._loop.time()
        # Back-pressure from this exchange's upstream is over with it (else a keep-alive
        # client's next request would never be read).
        self.resume(PAUSE_UPSTREAM)
        if ex.close_after or not ex.keep_alive or self.closing_now:
            self._close()
            return
        if ex.body_done:
            self._next()
            return
        # Answered before its body was read (an error, or a replica that replied early):
        # read and drop a small rest to keep the connection, close on a large or unknown one.
        remaining = None if ex.content_length is None else ex.content_length - ex.body_bytes
        if remaining is None or remaining > DISCARD_LIMIT or (ex.sink is not None and ex._flowing):
            self._close()
            return
        ex._discarding = True
        ex._pending = []
        self.resume(PAUSE_BUFFER)

    def _next(self) -> None:
        self._current = None
        if self._pending_error is not None and not self._pipeline:
            err, self._pending_error = self._pending_error, None
            self._write_fatal(err)
            return
        if self._pipeline:
            ex = self._pipeline.popleft()
            self._current = ex
            if not self._pipeline:
                self.resume(PAUSE_PIPELINE)
            self._start(ex)
        elif self.closing:
            self._close()

    def _close(self) -> None:
        """Close after what is written. A client still sending its body would get a reset
        (and might lose our answer) if we closed with unread input: like nginx's lingering
        close, stop writing, then read and drop its input for a while before closing."""
        self.closing = True
        transport = self._transport
        if transport is None:
            return
        ex = self._current or self._parsing
        still_sending = ex is not None and not ex.body_done and not self._ignore_input
        if still_sending and transport.can_write_eof() and not self._linger_until:
            self._ignore_input = True
            self._linger_until = self._loop.time() + LINGER_S
            self._paused = 0
            transport.resume_reading()
            transport.write_eof()
            return
        self.pause(PAUSE_CLOSING)
        transport.close()

    def _body_too_large(self, ex: Exchange) -> None:
        err = errors.body_too_large(self._limits.max_body_bytes)
        if ex is self._current and not ex.response_started:
            _abandon(ex)
            ex.close_after = True
            ex.respond_error(err, _request_ids())
            self._close()
        else:
            self._fatal(err)

    def _fatal(self, err: errors.RouterError) -> None:
        """A protocol error: answer it once every earlier response is out, then close."""
        self.pause(PAUSE_CLOSING)
        self.closing = True
        cur = self._current
        if cur is None or (cur is self._parsing and not cur.response_started):
            if cur is not None:
                _abandon(cur)
            self._current = None
            self._write_fatal(err)
        elif cur is self._parsing:
            # The error is in the body of a request whose response has started: cut it off.
            self.abort()
        else:
            # Earlier pipelined requests are still answered; the broken one is dropped.
            self._pending_error = err
            if self._parsing is not None and self._parsing in self._pipeline:
                self._pipeline.remove(self._parsing)

    def _write_fatal(self, err: errors.RouterError) -> None:
        body = errors.json_message(err.message)
        self.write(
            errors.status_line(err.status)
            + b"content-type: application/json\r\n"
            + err.headers
            + _request_ids()
            + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            + body
        )
        self._close()

    # ---- timeouts (called by the server's sweeper) ----------------------------------------

    def check_timeouts(self, now: float) -> None:
        limits = self._limits
        if self._linger_until:
            if now > self._linger_until and self._transport is not None:
                self._transport.close()
            return
        if self._in_head:
            if now - self._head_started > limits.header_timeout_s:
                # nginx answers a slow header with 408 and closes; so do we.
                self._fatal(errors.RouterError(408, "Request header timeout"))
            return
        cur = self._current
        if cur is None:
            if self._parsing is None and now - self.last_activity > limits.keepalive_timeout_s:
                self._close()
            return
        if self._paused & (PAUSE_BUFFER | PAUSE_UPSTREAM | PAUSE_PIPELINE):
            self._body_checked = now
            return  # we are the ones not reading
        reading_body = self._parsing is cur and not cur.body_done
        if reading_body:
            if self._body_checked:
                self._body_active_s += now - self._body_checked
            self._body_checked = now
            active = self._body_active_s
            if (active > min(limits.body_rate_grace_s, limits.body_timeout_s)
                    and cur.body_bytes < active * limits.min_body_rate
                    and not cur.response_started):
                self._fatal(errors.RouterError(408, "Request body too slow"))
                return
        if (reading_body or self.write_paused) and (
            now - self.last_activity > limits.body_timeout_s
        ):
            if cur.response_started or not reading_body:
                self.abort()
            else:
                self._fatal(errors.RouterError(408, "Request body timeout"))
