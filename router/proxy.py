"""The scoring path: route, authenticate, admit, forward, and answer.

`ScoringHandler.handle` runs once per request when its headers are in. A `Forward` carries one
proxied request through admission (a slot now, a place in the queue, or a 503), the upstream
connection (reused or new), the response stream back to the client, and the release of its
slot, which hands the slot straight to the next waiter. Everything is callbacks on the event
loop; the only Task is a new upstream connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

from router import errors, routing
from router.accesslog import AccessLog
from router.admission import Rejection, Replica, Waiter
from router.datacollect import DataCollector
from router.http_server import Exchange
from router.metrics import UNROUTED
from router.requestid import new_request_id, valid_client_request_id
from router.routing import Route, RouteKind
from router.traffic import pick_version
from router.upstream import ReplicaConnections, UpstreamConnection, UpstreamFailure

if TYPE_CHECKING:
    from router.services import Endpoint, Service

    ScoringRoute = Route[Service, Endpoint]

log = logging.getLogger(__name__)

# Request headers not forwarded: hop-by-hop ones, the credential, and those the router sets.
_NOT_FORWARDED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"host",
        b"content-length",
        b"authorization",
        b"x-request-id",
        b"x-ms-request-id",
        b"x-ms-client-request-id",
        b"azureml-model-deployment",
        b"x-forwarded-proto",
    }
)
# Connection-header tokens that name no other header.
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive"})
_JSON = b"content-type: application/json\r\n"
_HEALTH = (RouteKind.HEALTHY, RouteKind.READY)
# A request body up to this size is kept until the response starts, so a request that met a
# stale keep-alive connection (closed by the replica while idle) can be sent again once.
REPLAY_LIMIT = 64 * 1024
# A request that timed out after reaching its replica keeps its slot while the replica is still
# working on it (the client has its 504), so the replica never runs more than its cap; past
# this many scoring timeouts more, its connection is closed and the slot freed.
ABANDONED_HOLD_FACTOR = 5

_WAITING, _CONNECTING, _SENT, _RESPONDING, _DONE = range(5)


class Capture:
    """Bodies copied aside for model data collection (references to the chunks, up to the
    collector's cap; nothing is copied on the request path)."""

    __slots__ = ("cap", "request", "request_bytes", "request_type", "response", "response_bytes",
                 "response_type", "status")

    def __init__(self, cap: int, request_type: bytes | None) -> None:
        self.cap = cap
        self.request: list[bytes] = []
        self.response: list[bytes] = []
        self.request_bytes = self.response_bytes = 0
        self.request_type = request_type
        self.response_type: bytes | None = None
        self.status = 0

    def add_request(self, chunk: bytes) -> None:
        if self.request_bytes <= self.cap:
            self.request.append(chunk)
            self.request_bytes += len(chunk)

    def add_response(self, chunk: bytes) -> None:
        if self.response_bytes <= self.cap:
            self.response.append(chunk)
            self.response_bytes += len(chunk)


def _without(parts: list[bytes], names: list[bytes]) -> list[bytes]:
    """`parts` (name, ": ", value, CRLF groups) without the headers called `names`."""
    out: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i] not in names:
            out += parts[i : i + 4]
    return out


def _header(headers: bytes, name: bytes) -> bytes | None:
    """A header's value from `name: value\r\n` lines with lower-cased names."""
    start = headers.find(name + b": ")
    if start < 0 or (start and headers[start - 1 : start] != b"\n"):
        return None
    start += len(name) + 2
    return headers[start : headers.find(b"\r\n", start)]


class ScoringHandler:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        access_log: AccessLog | None = None,
        collector: DataCollector | None = None,
    ) -> None:
        self.loop = loop
        self.collector = collector
        self.access_log = access_log or AccessLog(None)
        self.routes: dict[bytes, ScoringRoute] = routing.build_routes({})
        self.endpoint_names: frozenset[str] = frozenset()
        self.rand = random.random
        self.draining = False
        # Extra readiness (the sidecar follows its model's liveness); True when unset.
        self.ready_check: Callable[[], bool] = lambda: True
        self.in_progress = 0  # forwards not yet finished (what a graceful drain waits for)

    def handle(self, ex: Exchange) -> None:
        url = ex.url
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        route = self.routes.get(path)
        if route is not None and route.kind in _HEALTH:
            self._health(ex, route.kind)
            return
        t0 = perf_counter()
        rid_text = new_request_id()
        rid = rid_text.encode()
        ids = b"x-ms-request-id: " + rid + b"\r\nx-request-id: " + rid + b"\r\n"
        if route is None:
            self._early(ex, routing.not_found(path, self.endpoint_names), ids, rid_text, t0)
            return
        if ex.method not in route.methods:
            self._early(ex, errors.method_not_allowed(route.allow), ids, rid_text, t0, route)
            return

        # One pass over the headers: the credential, the client's id, and what is forwarded.
        authorization = client_id = pinned = forwarded_for = None
        connection_tokens: list[bytes] | None = None
        parts: list[bytes] = []
        for name, value in ex.headers:
            if name in _NOT_FORWARDED:
                if name == b"authorization":
                    if authorization is not None:
                        # Two credentials: which one counts is not guessed at.
                        self._early(ex, errors.bad_request("Duplicate Authorization header"),
                                    ids, rid_text, t0, route)
                        return
                    authorization = value
                elif name == b"x-ms-client-request-id" and valid_client_request_id(value):
                    client_id = value
                elif name == b"azureml-model-deployment":
                    pinned = value
                elif name == b"connection":
                    connection_tokens = [t.strip().lower() for t in value.split(b",")]
                continue
            if name == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
                continue
            parts += (name, b": ", value, b"\r\n")
        if connection_tokens is not None:
            named = [t for t in connection_tokens if t and t not in _CONNECTION_OPTIONS]
            if named:
                # Headers the client names in Connection are hop-by-hop: not forwarded.
                parts = _without(parts, named)
        # The router's own X-Forwarded-For (the client's, with the peer appended, as nginx's
        # $proxy_add_x_forwarded_for) and X-Forwarded-Proto (the router's scheme only).
        peer = ex.peer.encode()
        parts += (b"x-forwarded-for: ",
                  peer if forwarded_for is None else forwarded_for + b", " + peer,
                  b"\r\nx-forwarded-proto: ", ex.scheme, b"\r\n")
        client_hdr = b""
        if client_id is not None:
            client_hdr = b"x-ms-client-request-id: " + client_id + b"\r\n"
            ids += client_hdr

        ep = route.endpoint
        if ep is None:
            svc = route.service
            assert svc is not None
            version = ""
            if route.auth and not svc.auth.check(authorization):
                self._early(ex, errors.unauthorized(), ids, rid_text, t0, route, client_id)
                return
        else:
            if not ep.auth.check(authorization):
                self._early(ex, errors.unauthorized(), ids, rid_text, t0, route, client_id)
                return
            version = route.version or (
                pinned.decode("latin-1") if pinned is not None
                else pick_version(ep.split, self.rand())
            )
            found = ep.services.get(version)
            if found is None:
                err = routing.version_not_found(ep.name, version.encode())
                self._early(ex, err, ids, rid_text, t0, route, client_id)
                return
            svc = found
            ids += ep.version_headers[version]
        t_auth = perf_counter()

        if ex.chunked:
            framing = b"transfer-encoding: chunked\r\n"
        elif ex.content_length is not None:
            framing = b"content-length: %d\r\n" % ex.content_length
        elif ex.method == b"POST":
            framing = b"content-length: 0\r\n"
        else:
            framing = b""
        parts += (b"x-request-id: ", rid, b"\r\n", client_hdr, framing, b"\r\n")
        fwd = Forward(
            self,
            ex,
            svc,
            ex.method + b" " + route.upstream_path + (b"" if q < 0 else url[q:])
            + b" HTTP/1.1\r\nhost: ",
            b"".join(parts),
            ids,
            rid_text,
            client_id,
            version,
            t0,
            t_auth,
        )
        fwd.admit()

    def _early(
        self,
        ex: Exchange,
        err: errors.RouterError,
        ids: bytes,
        rid: str,
        t0: float,
        route: ScoringRoute | None = None,
        client_id: bytes | None = None,
    ) -> None:
        """A request refused before admission (404, 405, 401): answered, counted, logged.
        `ids` already carries the client's id header when there is one."""
        ex.respond_error(err, ids)
        svc = route.service if route is not None else None
        name = svc.name if svc is not None else (
            route.endpoint.name if route is not None and route.endpoint is not None else "")
        metrics = svc.metrics if svc is not None else UNROUTED
        metrics.count("", err.status)
        total = perf_counter() - t0
        metrics.total.observe(total)
        if self.access_log.enabled:
            self.log(ex, rid, client_id, name, "", None, err.status, t0, 0.0, 0.0, 0.0,
                     total, None)

    def log(
        self,
        ex: Exchange,
        rid: str,
        client_id: bytes | None,
        service: str,
        version: str,
        replica: str | None,
        status: int,
        t0: float,
        auth_s: float,
        queue_s: float,
        upstream_s: float,
        total_s: float,
        error: str | None,
    ) -> None:
        self.access_log.request(rid, client_id, service, version, replica, ex.method, status,
                                ex.body_bytes, ex.bytes_out, auth_s, queue_s, upstream_s,
                                total_s, error)

    def _health(self, ex: Exchange, kind: RouteKind) -> None:
        if ex.method not in (b"GET", b"HEAD"):
            ex.respond_error(errors.method_not_allowed(b"GET"))
        elif kind is RouteKind.READY and self.draining:
            ex.respond_error(errors.draining())
        elif kind is RouteKind.READY and not self.ready_check():
            ex.respond_error(errors.RouterError(503, "Not ready: the model is not live"))
        else:
            ex.respond(200, _JSON, b'{"status":"Healthy"}')


class Forward:
    """One proxied request, from admission to the end of its response."""

    __slots__ = (
        "_abandoned",
        "_body_sent",
        "_capture",
        "_chunked",
        "_client_gone",
        "_conn",
        "_handler",
        "_head_tail",
        "_ids",
        "_replay",
        "_replay_bytes",
        "_replica",
        "_request_line",
        "_retried",
        "_state",
        "_svc",
        "_timer",
        "_waiter",
        "client_id",
        "ex",
        "failure",
        "rid",
        "t0",
        "t_auth",
        "t_dispatch",
        "t_start",
        "t_upstream_end",
        "version",
    )

    def __init__(
        self,
        handler: ScoringHandler,
        ex: Exchange,
        svc: Service,
        request_line: bytes,
        head_tail: bytes,
        ids: bytes,
        rid: str,
        client_id: bytes | None,
        version: str,
        t0: float,
        t_auth: float,
    ) -> None:
        self._handler = handler
        self.ex = ex
        self._svc = svc
        self._request_line = request_line
        self._head_tail = head_tail
        self._ids = ids
        self._chunked = ex.chunked
        self._state = _WAITING
        self._replica: Replica | None = None
        self._conn: UpstreamConnection | None = None
        self._waiter: Waiter | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._client_gone = False
        self._abandoned = False  # timed out, answered 504, the replica still has it
        self._body_sent = False
        self._retried = False
        self._replay: list[bytes] | None = []
        self._replay_bytes = 0
        self.t_start = handler.loop.time()  # admission's clock (the loop's)
        # Measured on perf_counter (the loop's time is cached per iteration).
        self.t0 = t0
        self.t_auth = t_auth
        self.t_dispatch = self.t_upstream_end = 0.0
        self.rid = rid
        self.client_id = client_id
        self.version = version
        self.failure: str | None = None
        self._capture: Capture | None = None
        if svc.cfg.collect_model_data and handler.collector is not None:
            ctype = next((v for n, v in ex.headers if n == b"content-type"), None)
            self._capture = Capture(handler.collector.max_body_bytes, ctype)
        handler.in_progress += 1
        ex.attach(self)

    # ---- admission ------------------------------------------------------------------------

    def admit(self) -> None:
        svc = self._svc
        result = svc.pool.admit(self.t_start, self._granted, self._expired)
        if isinstance(result, Replica):
            self._dispatch(result)
        elif isinstance(result, Waiter):
            self._waiter = result
            svc.schedule_expiry()
        elif result is Rejection.QUEUE_FULL:
            self.failure = "queue_full"
            self._fail(errors.overloaded(svc.name))

    def _granted(self, replica: Replica) -> None:
        self._waiter = None
        self._dispatch(replica)

    def _expired(self) -> None:
        self._waiter = None
        svc = self._svc
        if svc.pool.ready:
            self.failure = "queue_timeout"
            self._fail(errors.overloaded(svc.name))
        else:  # it waited for a replica to come (back) into rotation, and none did
            self.failure = "no_replica"
            self._fail(errors.no_replicas(svc.name))

    def _dispatch(self, replica: Replica) -> None:
        self._replica = replica
        self.t_dispatch = perf_counter()
        loop = self._handler.loop
        self._timer = loop.call_later(self._svc.timeout_s, self._on_timeout)
        conns = replica.conns
        assert isinstance(conns, ReplicaConnections)
        conn = None if self._retried else conns.take_idle()
        if conn is not None:
            self._send_on(conn)
            return
        self._state = _CONNECTING
        loop.create_task(conns.connect(loop)).add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        exc = task.exception() if not task.cancelled() else None
        if task.cancelled() or exc is not None:
            if self._state == _CONNECTING:
                self._upstream_failed(UpstreamFailure.REFUSED)
            return
        conn = task.result()
        if self._state != _CONNECTING:  # timed out or the client left meanwhile
            conn.release()
            return
        self._send_on(conn)

    def _send_on(self, conn: UpstreamConnection) -> None:
        self._state = _SENT
        self._conn = conn
        conns = self._replica.conns if self._replica is not None else None
        assert isinstance(conns, ReplicaConnections)
        conn.begin(self)
        conn.cork()
        conn.send(self._request_line + conns.host_header + b"\r\n" + self._head_tail)
        if self._retried:
            for chunk in self._replay or ():
                self._send_body(conn, chunk)
            if self._body_sent:
                self._send_end(conn)
            self.ex.resume_body()
        else:
            self.ex.start_body()
        if not self.ex.in_read:
            conn.uncork()
        # else: the body is usually in the same read as the head; on_client_flush sends both.

    # ---- request body (BodySink) ----------------------------------------------------------

    def on_body(self, chunk: bytes) -> None:
        conn = self._conn
        if conn is None or self._state >= _DONE:
            return
        if self._capture is not None:
            self._capture.add_request(chunk)
        if self._replay is not None:
            self._replay_bytes += len(chunk)
            if self._replay_bytes <= REPLAY_LIMIT:
                self._replay.append(chunk)
            else:
                self._replay = None
        self._send_body(conn, chunk)

    def _send_body(self, conn: UpstreamConnection, chunk: bytes) -> None:
        if self._chunked:
            conn.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        else:
            conn.send(chunk)

    def on_body_end(self) -> None:
        self._body_sent = True
        if self._conn is not None and self._state < _DONE:
            self._send_end(self._conn)

    def _send_end(self, conn: UpstreamConnection) -> None:
        if self._chunked:
            conn.send(b"0\r\n\r\n")

    def on_client_lost(self) -> None:
        self._client_gone = True
        state = self._state
        if state == _WAITING:
            if self._waiter is not None:
                self._svc.pool.cancel(self._waiter)
            self._finish(None)
        elif state == _CONNECTING:
            self._finish(None)
        elif state < _DONE and not self._body_sent:
            # The replica can never get the whole request: cut the upstream exchange.
            self._finish(None)
        # Otherwise the replica is working on it: its slot stays taken until it answers,
        # so the per-replica cap holds; the answer is dropped.

    def on_client_flush(self) -> None:
        if self._conn is not None:
            self._conn.uncork()

    def on_client_pause_writing(self) -> None:
        if self._conn is not None:
            self._conn.pause_reading()

    def on_client_resume_writing(self) -> None:
        if self._conn is not None:
            self._conn.resume_reading()

    # ---- response (UpstreamSink) ----------------------------------------------------------

    def on_response_head(self, status: int, headers: bytes, content_length: int | None) -> None:
        self._state = _RESPONDING
        self._replay = None
        if self._capture is not None:
            self._capture.status = status
            self._capture.response_type = _header(headers, b"content-type")
        if self._client_gone:
            return
        ex = self.ex
        ex.cork()
        ex.start_response(status, headers + self._ids, content_length)

    def on_response_body(self, chunk: bytes) -> None:
        if self._capture is not None:
            self._capture.add_response(chunk)
        if not self._client_gone:
            self.ex.write(chunk)

    def on_response_end(self) -> None:
        self.t_upstream_end = perf_counter()
        conn = self._conn
        self._conn = None
        if conn is not None:
            if self._body_sent:
                conn.release()
            else:
                conn.close()  # answered before the whole body was sent: the stream is unusable
        if not self._client_gone:
            self.ex.end()
        self._finish(None, release_conn=False)

    def on_upstream_flush(self) -> None:
        if not self._client_gone and self._state == _RESPONDING:
            self.ex.uncork()

    def on_upstream_failure(self, failure: UpstreamFailure) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.reused and not conn.got_bytes and self._retry_stale(failure):
            return
        self._upstream_failed(failure)

    def on_upstream_pause_writing(self) -> None:
        self.ex.pause_body()

    def on_upstream_resume_writing(self) -> None:
        self.ex.resume_body()

    # ---- failure paths --------------------------------------------------------------------

    def _retry_stale(self, failure: UpstreamFailure) -> bool:
        """A reused keep-alive connection that closes before a byte of response was most
        likely closed by the replica while idle: send the request once more on a new one.
        Only while the body sent so far is small enough to have been kept for this."""
        if (
            failure is not UpstreamFailure.CLOSED
            or self._state != _SENT
            or self._retried
            or self._replay is None
            or self._client_gone
            or self._replica is None
        ):
            return False
        self._retried = True
        self._state = _CONNECTING
        self.ex.pause_body()  # body bytes wait in the client socket until the new connection
        loop = self._handler.loop
        conns = self._replica.conns
        assert isinstance(conns, ReplicaConnections)
        loop.create_task(conns.connect(loop)).add_done_callback(self._connected)
        return True

    def _upstream_failed(self, failure: UpstreamFailure) -> None:
        if self._state == _DONE:
            return
        if self._abandoned:  # the replica closed a request that had timed out: slot free now
            self._finish(None)
            return
        self.t_upstream_end = perf_counter()
        self.failure = failure.value
        if self._replica is not None and failure is not UpstreamFailure.BAD_RESPONSE and (
            self._state != _RESPONDING
        ):
            self._svc.replica_failed(self._replica)
        self._fail(errors.for_upstream_failure(failure))

    def _on_timeout(self) -> None:
        self._timer = None
        if self._state >= _DONE:
            return
        if self._abandoned:  # the replica never answered the abandoned request either
            self._finish(None)
            return
        self.t_upstream_end = perf_counter()
        self.failure = "timeout"
        err = errors.replica_timeout(self._svc.cfg.scoring_timeout_ms)
        if self._conn is None or not self._body_sent:
            self._fail(err)  # not (wholly) at the replica: nothing runs there
            return
        # The replica is working on it: the client gets its 504 now, but the slot stays taken
        # until the replica answers (dropped) or closes, so the replica is never sent more
        # than its cap while abandoned work runs on. Bounded: then the connection is closed.
        self._answer(err)
        self._client_gone = True
        self._abandoned = True
        self.ex.detach()
        self._timer = self._handler.loop.call_later(
            self._svc.timeout_s * ABANDONED_HOLD_FACTOR, self._on_timeout
        )

    def _answer(self, err: errors.RouterError) -> None:
        """Answer with a router error; if the replica's response has begun, take it back while
        none of it has left the router, else cut the client off."""
        if self._client_gone:
            return
        ex = self.ex
        if ex.response_started and not ex.retract():
            ex.abort()
        else:
            ex.respond_error(err, self._ids)

    def _fail(self, err: errors.RouterError) -> None:
        self._answer(err)
        self._finish(err)

    def _finish(self, err: errors.RouterError | None, release_conn: bool = True) -> None:
        if self._state == _DONE:
            return
        self._state = _DONE
        self.ex.detach()
        self._handler.in_progress -= 1
        self._svc.completed += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self._conn
        if conn is not None and release_conn:
            self._conn = None
            conn.abort()  # mid-exchange: the connection's state is unknown
        replica = self._replica
        if replica is not None:
            self._replica = None
            self._svc.release(replica)
        self._account(err, replica)

    def _account(self, err: errors.RouterError | None, replica: Replica | None) -> None:
        """Metrics and the access log line, once per request."""
        now = perf_counter()
        ex = self.ex
        if ex.response_started:
            status = ex.status
        elif err is not None and not self._client_gone:
            status = err.status
        else:
            status = 499  # the client left before an answer (nginx's code)
        capture = self._capture
        if capture is not None and self.t_upstream_end and self.failure is None:
            # What the model answered (router errors are not model data).
            assert self._handler.collector is not None
            self._handler.collector.submit(
                self._svc.name, self.version or "default", self.rid, capture.status,
                capture.request, capture.request_type, capture.response, capture.response_type,
            )
        m = self._svc.metrics
        m.count(self.version, status)
        total = now - self.t0
        m.total.observe(total)
        queue = upstream = 0.0
        if self.t_dispatch:
            queue = self.t_dispatch - self.t0
            upstream = (self.t_upstream_end or now) - self.t_dispatch
            m.queue_wait.observe(queue)
            m.upstream.observe(upstream)
        elif self.t_auth:
            # Never reached a replica (refused, expired in the queue, or the client left while
            # queued): its wait is queue time, not the router's own work.
            queue = now - self.t_auth
            m.queue_wait.observe(queue)
        m.routing.observe(max(total - queue - upstream, 0.0))
        failure = self.failure
        if failure is not None:
            if failure in m.rejected:
                m.rejected[failure] += 1
            else:
                m.upstream_errors[failure] += 1
        handler = self._handler
        if handler.access_log.enabled:
            handler.log(ex, self.rid, self.client_id, self._svc.name, self.version,
                        replica.addr if replica is not None else None, status, self.t0,
                        self.t_auth - self.t0, queue, upstream, total,
                        failure or ("client_gone" if self._client_gone else None))
