"""The reference: the smallest correct asyncio.Protocol + httptools forwarder (uvloop).

    python -m benchmarks.bareproxy --port PORT --upstream HOST:PORT [--path /score]

What the proxy hop costs in Python when it does nothing else: no routing table, no auth, no
admission, no metrics, no log. Each client connection parses requests with httptools, sends
each one (every URL rewritten to `--path`, hop-by-hop headers dropped, body re-framed by
Content-Length) on a kept-alive upstream connection from a free list (a new one when none is
idle), and streams the upstream's response bytes back as they come, handing the upstream
connection back when its response is complete. One request at a time per client connection
(no pipelining); chunked request bodies are forwarded chunked. 502 when the upstream fails.
benchmarks/overhead.py runs it as the `bare` path, next to nginx and mlfe.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any, cast

import httptools
import uvloop

_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                  b"transfer-encoding", b"upgrade", b"host", b"content-length"})
_BAD_GATEWAY = (b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")


class Upstream(asyncio.Protocol):
    """One kept-alive connection to the replica; forwards response bytes to its client."""

    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.done = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            self._drop()
            return
        client.write(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._drop()
            client.fail()
            return
        if self.done:
            self.done = False
            self.client = None
            client.response_done()
            if self.keep_alive:
                self.pool.append(self)  # (the parser goes on to the next response by itself)
            else:
                self._drop()

    def on_headers_complete(self) -> None:
        # Asked here: once the message is complete the parser has moved on to the next one.
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.done = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        client, self.client = self.client, None
        self.transport = None
        if client is not None:
            client.fail()

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Client(asyncio.Protocol):
    """One client connection: parse a request, forward it, stream the answer back."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.head: list[bytes] = []
        self.body: list[bytes] = []
        self.chunked = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.head = [self.parser.get_method(), b" ", self.proxy.path, b" HTTP/1.1\r\n",
                     self.proxy.host_header]
        self.body = []
        self.chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"transfer-encoding":
            self.chunked = True
        if lower not in _HOP:
            self.head += (name, b": ", value, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        if self.chunked:
            framing = b"transfer-encoding: chunked\r\n\r\n"
            body = (b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
        else:
            framing = b"content-length: %d\r\n\r\n" % len(body)
        self.head += (framing, body)
        self.proxy.forward(self, b"".join(self.head))

    # from the upstream side
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def response_done(self) -> None:
        if not self.keep_alive and self.transport is not None:
            self.transport.close()

    def fail(self) -> None:
        if self.transport is not None:
            self.transport.write(_BAD_GATEWAY)
            self.transport.close()


class Proxy:
    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int, path: str) -> None:
        self.loop = loop
        self.host, self.port = host, port
        self.path = path.encode()
        self.host_header = f"host: {host}:{port}\r\n".encode()
        self.idle: list[Upstream] = []

    def forward(self, client: Client, request: bytes) -> None:
        if self.idle:
            self._send(self.idle.pop(), client, request)
        else:
            self.loop.create_task(self._connect(client, request))

    def _send(self, up: Upstream, client: Client, request: bytes) -> None:
        up.client = client
        assert up.transport is not None
        up.transport.write(request)

    async def _connect(self, client: Client, request: bytes) -> None:
        try:
            _, up = await self.loop.create_connection(
                lambda: Upstream(self.idle), self.host, self.port)
        except OSError:
            client.fail()
            return
        self._send(up, client, request)


async def serve(port: int, upstream: str, path: str) -> None:
    loop = asyncio.get_running_loop()
    host, _, up_port = upstream.rpartition(":")
    proxy = Proxy(loop, host, int(up_port), path)
    server = await loop.create_server(lambda: Client(proxy), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: Any = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bareproxy", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="HOST:PORT")
    p.add_argument("--path", default="/score", help="the path every request is sent to")
    a = p.parse_args(argv)
    uvloop.run(serve(a.port, a.upstream, a.path))


if __name__ == "__main__":
    main()
