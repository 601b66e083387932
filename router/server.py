"""The router process: build services from config, listen, sweep timeouts, drain on SIGTERM.

Shutdown order (as KEDA's interceptor and uvicorn do it): readiness turns 503, the listener
closes, idle keep-alive connections close, in-flight and queued requests finish (each response
carries `Connection: close`) under `drain_timeout_s`, then whatever remains is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from mlfe.config import AuthSettings, ConfigError, MlfeConfig, parse_config
from router.accesslog import AccessLog
from router.auth import Credentials, KeyAuth, NoAuth
from router.datacollect import DataCollector
from router.http_server import HttpServerProtocol, Limits
from router.keystore import KeyStore, atomic_write
from router.metrics import RouterCollector, ServiceMetrics
from router.proxy import ScoringHandler
from router.routing import build_routes
from router.services import Endpoint, Service
from router.slots import SlotMember
from router.tls import TlsReloader
from router.tokens import ExternalJwks, SigningKeys, TokenAuth, TokenAuthority, TokenVerifier

log = logging.getLogger(__name__)


def limits_from(cfg: MlfeConfig) -> Limits:
    r = cfg.router
    return Limits(
        max_header_bytes=r.max_header_bytes,
        max_header_count=r.max_header_count,
        max_body_bytes=r.max_body_bytes,
        header_timeout_s=r.client_header_timeout_s,
        body_timeout_s=r.client_body_timeout_s,
        keepalive_timeout_s=r.keepalive_timeout_s,
    )


class ConnectionSet(set[HttpServerProtocol]):
    """The open client connections, with a way to wait until there are none."""

    def __init__(self) -> None:
        super().__init__()
        self._empty: asyncio.Event | None = None

    def discard(self, conn: object) -> None:
        super().discard(conn)
        if not self and self._empty is not None:
            self._empty.set()

    async def wait_empty(self) -> None:
        if self:
            self._empty = asyncio.Event()
            await self._empty.wait()


ENDPOINTS_FILE = "endpoints.json"


def with_persisted_endpoints(cfg: MlfeConfig) -> MlfeConfig:
    """Endpoints changed through the admin API are kept in the state dir and win over the
    config file's `endpoints` section (they are the newer truth)."""
    path = cfg.router.state_dir / ENDPOINTS_FILE
    if not path.exists():
        return cfg
    data = cfg.model_dump(mode="json", exclude_unset=True)
    data["endpoints"] = orjson.loads(path.read_bytes())
    log.info("endpoints from %s (changed through the admin API)", path)
    return parse_config(data, str(path))


class Router:
    def __init__(
        self,
        cfg: MlfeConfig,
        loop: asyncio.AbstractEventLoop,
        coordinated: bool = False,
        reuse_port: bool = False,
        data_file_prefix: str = "data",
    ) -> None:
        cfg = with_persisted_endpoints(cfg)
        self.cfg = cfg
        self._loop = loop
        self.collector = DataCollector(cfg.router.data_dir or cfg.router.state_dir / "modeldata",
                                       file_prefix=data_file_prefix)
        self.handler = ScoringHandler(
            loop,
            AccessLog(sys.stdout.buffer if cfg.router.access_log else None, cfg.router.log_format),
            self.collector,
        )
        self.keys = KeyStore(cfg.router.state_dir)
        self.authority = TokenAuthority(
            SigningKeys(cfg.router.state_dir), lifetime_s=cfg.router.token_lifetime_s
        )
        try:
            issuers = [ExternalJwks.from_config(i) for i in cfg.router.token_issuers]
        except (OSError, ValueError) as e:
            raise ConfigError(f"router.token_issuers: {e}") from None
        self.tokens = TokenVerifier(self.authority, issuers, leeway_s=cfg.router.token_leeway_s)
        self.tls: TlsReloader | None = None
        if cfg.router.tls is not None:
            try:
                self.tls = TlsReloader(cfg.router.tls.cert_file, cfg.router.tls.key_file)
            except ValueError as e:
                raise ConfigError(f"router.tls: {e}") from None
        self._tls_watch: asyncio.Task[None] | None = None
        # Shares replica slots with other routers (worker processes or pods).
        self.coordinated = coordinated or cfg.router.coordination is not None
        self._reuse_port = reuse_port
        self.slot_member: SlotMember | None = None
        # Called after an admin change (keys, endpoints) is persisted: workers reload.
        self.on_change: Callable[[], None] = lambda: None
        self.services: dict[str, Service] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self._limits = limits_from(cfg)
        self._connections = ConnectionSet()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port = 0
        # What the co-located autoscaler last decided, per service (set by the runtime).
        self.scaling_status: Callable[[str], dict[str, Any]] = lambda name: {}
        # busy and queued of a service: this process's pools, or (a worker supervisor) the
        # sums its workers report.
        self.counts_of: Callable[[str], tuple[int, int]] = self._local_counts
        # More metric families from parts outside the router (data collection).
        self.extra_metrics: Callable[[], Iterable[Metric]] = self._collector_metrics
        self.metrics = CollectorRegistry(auto_describe=False)
        # A worker supervisor reads its workers' counters instead of its own (set by runtime).
        self.metrics_of: Callable[[Service], ServiceMetrics] = lambda svc: svc.metrics
        self.metrics.register(RouterCollector(
            lambda: self.services, lambda name: self.scaling_status(name),
            lambda: self.extra_metrics(), lambda svc: self.metrics_of(svc),
            lambda name: self.counts_of(name)))

    def _auth_for(self, name: str, owner: AuthSettings) -> Credentials:
        if owner.token_auth_enabled:
            return TokenAuth(self.tokens, name)
        if not owner.auth_enabled:
            return NoAuth()
        return KeyAuth(*self.keys.ensure(name, owner.primary_key, owner.secondary_key))

    def refresh_auth(self, name: str) -> None:
        """Keys of `name` (a service or an endpoint) changed in the key store: use them now."""
        if name in self.services:
            svc = self.services[name]
            svc.auth = self._auth_for(name, svc.cfg)
        elif name in self.endpoints:
            self._build_endpoints(self.cfg)
        self.on_change()

    def reload_state(self) -> None:
        """Another process changed keys or endpoints in the shared state dir: take them."""
        self.keys = KeyStore(self.cfg.router.state_dir)
        self.apply(with_persisted_endpoints(self.cfg))

    def _build_endpoints(self, cfg: MlfeConfig) -> None:
        self.endpoints = {
            name: Endpoint(name, ep, self._auth_for(name, ep), self.services)
            for name, ep in cfg.endpoints.items()
        }
        self.handler.endpoint_names = frozenset(self.endpoints)
        self.handler.routes = build_routes(self.services, self.endpoints)

    def apply(self, cfg: MlfeConfig) -> None:
        """Make the live services and endpoints match `cfg`; the routing table is swapped in
        one step, so no request sees half a change."""
        services = dict(self.services)
        for name in list(services):
            if name not in cfg.services:
                services.pop(name).close()
        for name, scfg in cfg.services.items():
            auth = self._auth_for(name, scfg)
            svc = services.get(name)
            if svc is None:
                svc = services[name] = Service(name, scfg, auth, coordinated=self.coordinated)
                svc.slot_member = self.slot_member
            else:
                svc.reconfigure(scfg, auth)
            if scfg.upstreams is not None:
                svc.set_replicas(scfg.upstreams)
        self.services = services
        self._build_endpoints(cfg)
        self.cfg = cfg

    def change_endpoints(self, mutate: Callable[[dict[str, Any]], None]) -> None:
        """Apply an admin change to the endpoints: validated whole (ConfigError names what is
        wrong, and nothing changes), persisted, then swapped into the live routing table."""
        data = self.cfg.model_dump(mode="json", exclude_unset=True)
        endpoints: dict[str, Any] = data.setdefault("endpoints", {})
        mutate(endpoints)
        new = parse_config(data, "change")
        atomic_write(
            self.cfg.router.state_dir / ENDPOINTS_FILE,
            orjson.dumps(endpoints, option=orjson.OPT_INDENT_2),
        )
        self.apply(new)
        self.on_change()

    def _local_counts(self, name: str) -> tuple[int, int]:
        pool = self.services[name].pool
        return pool.busy, pool.queued

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per service: what the autoscaler reads (DESIGN §7), plus what it decided."""
        out: dict[str, dict[str, Any]] = {}
        for name, svc in self.services.items():
            pool = svc.pool
            ready = pool.ready
            capacity = ready * pool.max_concurrent
            busy, queued = self.counts_of(name)
            out[name] = {
                "replicas": ready,
                "busy": busy,
                "queued": queued,
                "utilization": (busy + queued) / capacity if capacity else None,
                "completed": svc.completed,
                # Slots this instance may use (all of them, unless coordinated).
                "slots": sum(r.cap for r in pool.replicas if r.in_rotation),
                **self.scaling_status(name),
            }
        return out

    @property
    def base_url(self) -> str:
        host, _ = self.cfg.router.listen_addr
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def scoring_uri(self, path: str) -> str:
        return f"{self.base_url}/api/v1/{path}/score"

    def describe(self, name: str) -> dict[str, Any]:
        svc = self.services[name]
        base = f"{self.base_url}/api/v1/service/{name}"
        return {
            "name": name,
            "scoringUri": f"{base}/score",
            "swaggerUri": f"{base}/swagger.json",
            "authEnabled": svc.cfg.auth_enabled,
            "tokenAuthEnabled": svc.cfg.token_auth_enabled,
            "replicas": [
                {"address": r.addr, "inRotation": r.in_rotation, "inFlight": r.in_flight}
                for r in svc.pool.replicas
            ],
            "scoringTimeoutMs": svc.cfg.scoring_timeout_ms,
            "replicaMaxConcurrentRequests": svc.cfg.replica_max_concurrent_requests,
            "maxRequestWaitTime": svc.cfg.max_request_wait_time,
        }

    def _collector_metrics(self) -> Iterable[Metric]:
        fam = CounterMetricFamily(
            "mlfe_datacollection_records", "Model data records, by result.", labels=["result"])
        fam.add_metric(["written"], self.collector.written)
        fam.add_metric(["dropped"], self.collector.dropped)
        return [fam]

    async def start(self, listen: bool = True) -> None:
        """Build the services; listen on the scoring port unless worker processes do."""
        self.collector.start()
        await self.tokens.refresh_all()
        self.apply(self.cfg)
        host, port = self.cfg.router.listen_addr
        if not listen:
            self.port = port
            return
        handler, limits, loop, conns = self.handler, self._limits, self._loop, self._connections
        self._server = await loop.create_server(
            lambda: HttpServerProtocol(handler, limits, loop, conns),
            host,
            port,
            backlog=4096,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
            ssl=self.tls.context if self.tls is not None else None,
            # A client that never finishes its handshake is invisible to the sweeper.
            ssl_handshake_timeout=min(10.0, limits.header_timeout_s) if self.tls else None,
        )
        if self.tls is not None:
            self._tls_watch = loop.create_task(self.tls.watch(), name="tls reload")
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self._sweeper = loop.create_task(self._sweep(), name="client timeout sweeper")
        log.info("scoring on http://%s:%d", host, self.port)

    async def _sweep(self) -> None:
        """Close connections past their header, body or keep-alive timeout. One periodic pass
        costs nothing per request, unlike a timer per request."""
        lim = self._limits
        interval = min(1.0, lim.header_timeout_s / 4, lim.body_timeout_s / 4,
                       lim.keepalive_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            now = self._loop.time()
            for conn in list(self._connections):
                conn.check_timeouts(now)

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking connections and let accepted requests finish; True if all did."""
        self.handler.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.close_when_idle()
        # Each connection closes itself after its last response: wait for them to be gone.
        try:
            async with asyncio.timeout(timeout_s):
                await self._connections.wait_empty()
        except TimeoutError:
            pass
        done = not self._connections
        for conn in list(self._connections):
            conn.abort()
        return done

    async def close(self) -> None:
        for task in (self._sweeper, self._tls_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for svc in self.services.values():
            svc.close()
        await self.tokens.aclose()
        await self.collector.stop()  # every queued record is written
        self.handler.access_log.flush()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
