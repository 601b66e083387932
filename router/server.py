"""The router process: build services from config, listen, sweep timeouts, drain on SIGTERM.

Shutdown order (as KEDA's interceptor and uvicorn do it): readiness turns 503, the listener
closes, idle keep-alive connections close, in-flight and queued requests finish (each response
carries `Connection: close`) under `drain_timeout_s`, then whatever remains is cut off.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from mlfe.config import AuthSettings, ConfigError, MlfeConfig, parse_config
from mlfe.stats import ServiceStats
from mlfe.supervise import Supervisor
from router.accesslog import AccessLog
from router.auth import Credentials, KeyAuth, NoAuth
from router.datacollect import DataCollector
from router.http_server import HttpServerProtocol, Limits
from router.keystore import KEYS_FILE, PREVIOUS_KEYS_FILE, SIGNING_KEY_FILE, KeyStore
from router.metrics import (
    RouterCollector,
    ServiceMetrics,
    access_log_metric,
    loop_tasks_metric,
)
from router.proxy import ScoringHandler
from router.routing import build_routes
from router.services import Endpoint, Service, ServiceLinks
from router.slots import BrokerServer, SlotMember
from router.state import ENDPOINTS_FILE, DirStateStore, StateStore

if TYPE_CHECKING:
    # Imported where used: both load cryptography (~8 MiB of an idle router's memory), which a
    # router without TLS and token auth never needs.
    from router.tls import TlsReloader
    from router.tokens import TokenAuthority, TokenVerifier

log = logging.getLogger(__name__)


def uses_tokens(cfg: MlfeConfig) -> bool:
    """Whether any service or endpoint takes tokens, or external issuers are configured."""
    owners: list[AuthSettings] = [*cfg.services.values(), *cfg.endpoints.values()]
    return bool(cfg.router.token_issuers) or any(o.token_auth_enabled for o in owners)


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


# A worker waits this long for its supervisor's state before it serves anyway.
SYNC_TIMEOUT_S = 10.0


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


@dataclass(frozen=True, slots=True)
class Membership:
    """This router shares replica slots with others through the slot broker at ``address``
    (docs/coordinated-admission.md). ``follows_supervisor``: a worker process, whose replica
    sets and state reloads come from its supervisor through the broker."""

    address: str  # "": learnt later (SlotMember.set_address: the Lease holder's broker)
    member_id: str
    follows_supervisor: bool = False
    hold_s: float | None = None  # without a broker this long, give the slots up


def _no_scaling(name: str) -> Mapping[str, Any]:
    return {}


class Router:
    """The scoring side of one process: services, endpoints, the listener and its drain.

    Everything it is connected to is given here, once: ``supervisor`` runs its long-lived tasks;
    ``workers`` (a worker supervisor) is the broker its worker processes report through, whose
    sums are this router's counts; ``membership`` makes it a slot broker member; ``scaling``
    tells what the autoscaler last decided per service; ``on_change`` hears of every persisted
    admin change (keys, endpoints) and returns once it is applied everywhere it must be (with
    worker processes: every live worker confirmed it, see ``BrokerServer.reload``);
    ``ready_check`` is more readiness (the sidecar follows its model's liveness); ``state``
    stores admin writes (the state dir unless given: in a cluster, the Kubernetes store every
    router pod shares).
    """

    def __init__(
        self,
        cfg: MlfeConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        supervisor: Supervisor,
        workers: BrokerServer | None = None,
        membership: Membership | None = None,
        scaling: Callable[[str], Mapping[str, Any]] = _no_scaling,
        on_change: Callable[[], Awaitable[None]] | None = None,
        ready_check: Callable[[], bool] | None = None,
        reuse_port: bool = False,
        data_file_prefix: str = "data",
        state: StateStore | None = None,
    ) -> None:
        cfg = with_persisted_endpoints(cfg)
        self.cfg = cfg
        self._loop = loop
        self._supervisor = supervisor
        self._workers = workers
        self._scaling = scaling
        self._state: StateStore = state or DirStateStore(cfg.router.state_dir)
        self._write_lock = asyncio.Lock()  # one admin write at a time in this process
        self.collector = DataCollector(cfg.router.data_dir or cfg.router.state_dir / "modeldata",
                                       file_prefix=data_file_prefix)
        self.handler = ScoringHandler(
            loop,
            AccessLog(sys.stdout.buffer if cfg.router.access_log else None, cfg.router.log_format),
            self.collector,
        )
        if ready_check is not None:
            self.handler.ready_check = ready_check
        # The state dir exists from the start: keys, endpoint changes, the workers' broker
        # socket and (with tokens) the signing key live there.
        cfg.router.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys = KeyStore(cfg.router.state_dir)
        self._tokens: tuple[TokenAuthority, TokenVerifier] | None = None
        if uses_tokens(cfg):
            self._token_parts()  # the signing key and the issuers' keys: errors at start
        self.tls: TlsReloader | None = None
        if cfg.router.tls is not None:
            from router.tls import TlsReloader

            try:
                self.tls = TlsReloader(cfg.router.tls.cert_file, cfg.router.tls.key_file)
            except ValueError as e:
                raise ConfigError(f"router.tls: {e}") from None
        self._reuse_port = reuse_port
        self.member: SlotMember | None = None
        self._follows = membership is not None and membership.follows_supervisor
        if membership is not None:
            follow = membership.follows_supervisor
            self.member = SlotMember(
                lambda: self.services, membership.address, membership.member_id, supervisor,
                on_replicas=self._set_replicas if follow else None,
                on_reload=self.reload_state if follow else None, hold_s=membership.hold_s)
        self._links = ServiceLinks(
            supervisor,
            on_release=self.member.replica_released if self.member is not None else None,
            workers=workers,
            coordinated=workers is not None or membership is not None,
        )
        if on_change is None and workers is not None:
            on_change = workers.reload  # the workers take the change from the state dir
        self._on_change = on_change
        self.services: dict[str, Service] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self._limits = limits_from(cfg)
        self._connections = ConnectionSet()
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(RouterCollector(
            lambda: list(self.services), self.service_metrics, self, self._scaling,
            self._collector_metrics))

    # ---- the one way to read this router's counts (mlfe/stats.py) ----------------------------

    def counts(self, service: str) -> ServiceStats:
        """``service``'s counts: this process's pool, or in a worker supervisor the sums its
        workers report (the replicas are the supervisor's own)."""
        svc = self.services[service]
        pool = svc.pool
        busy, queued = pool.busy, pool.queued
        if self._workers is not None:
            totals = self._workers.totals(service)
            busy, queued = totals["busy"], totals["queued"]
        arrivals, served, service_seconds = self.service_metrics(service).flow(busy, queued)
        return ServiceStats(
            busy=busy,
            queued=queued,
            replicas=pool.ready,
            max_concurrent=pool.max_concurrent,
            slots=sum(r.cap for r in pool.replicas if r.in_rotation),
            completed=svc.completed,
            members=len(pool.replicas),
            arrivals=arrivals,
            served=served,
            service_seconds=service_seconds,
        )

    def service_metrics(self, service: str) -> ServiceMetrics:
        """``service``'s counters: its own, or in a worker supervisor its workers' sums."""
        if self._workers is not None:
            return self._workers.metrics(service)
        return self.services[service].metrics

    def stats(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/stats``: per service, its counts and what the autoscaler decided."""
        return {name: {**self.counts(name).to_json(), **self._scaling(name)}
                for name in self.services}

    def _token_parts(self) -> tuple[TokenAuthority, TokenVerifier]:
        """The token issuer and verifier, built on first use (at start when the config uses
        tokens; else only for a JWKS request that finds a signing key in the state dir)."""
        if self._tokens is None:
            from router.tokens import ExternalJwks, SigningKeys, TokenAuthority, TokenVerifier

            r = self.cfg.router
            authority = TokenAuthority(SigningKeys(r.state_dir), lifetime_s=r.token_lifetime_s)
            try:
                issuers = [ExternalJwks.from_config(i) for i in r.token_issuers]
            except (OSError, ValueError) as e:
                raise ConfigError(f"router.token_issuers: {e}") from None
            self._tokens = (authority,
                            TokenVerifier(authority, issuers, leeway_s=r.token_leeway_s))
        return self._tokens

    @property
    def authority(self) -> TokenAuthority:
        return self._token_parts()[0]

    @property
    def tokens(self) -> TokenVerifier:
        return self._token_parts()[1]

    def jwks(self) -> dict[str, Any]:
        """The public keys of this router's tokens. A router that uses no tokens and has no
        signing key has signed nothing: an empty set, without making a key (or loading
        cryptography) for it."""
        state_dir = self.cfg.router.state_dir
        if self._tokens is None and not any(
                (state_dir / f).exists() for f in (SIGNING_KEY_FILE, PREVIOUS_KEYS_FILE)):
            return {"keys": []}
        return self.authority.jwks()

    def _auth_for(self, name: str, owner: AuthSettings) -> Credentials:
        if owner.token_auth_enabled:
            from router.tokens import TokenAuth

            return TokenAuth(self.tokens, name)
        if not owner.auth_enabled:
            return NoAuth()
        return KeyAuth(*self.keys.ensure(name, owner.primary_key, owner.secondary_key))

    def ensure_keys(self) -> None:
        """Make (and keep in the state dir) the keys of every service and endpoint that uses
        keys, now: a shared state store can then store them before this router serves."""
        owners: list[tuple[str, AuthSettings]] = [*self.cfg.services.items(),
                                                  *self.cfg.endpoints.items()]
        for name, owner in owners:
            if owner.auth_enabled and not owner.token_auth_enabled:
                self.keys.ensure(name, owner.primary_key, owner.secondary_key)

    def refresh_auth(self, name: str) -> None:
        """Keys of `name` (a service or an endpoint) changed in the key store: use them now."""
        if name in self.services:
            svc = self.services[name]
            svc.auth = self._auth_for(name, svc.cfg)
        elif name in self.endpoints:
            self._build_endpoints(self.cfg)

    async def _confirm_change(self) -> None:
        # One process: nothing to wait for, the change is live once applied above.
        if self._on_change is not None:
            await self._on_change()

    def _set_replicas(self, service: str, addrs: list[str]) -> None:
        """A worker's replica set, as its supervisor pushed it."""
        svc = self.services.get(service)
        if svc is not None:
            svc.set_replicas(addrs)

    def reload_state(self) -> None:
        """Another process changed keys, endpoints or the signing key in the shared state dir:
        take them."""
        state_dir = self.cfg.router.state_dir
        self.keys = KeyStore(state_dir)
        if self._tokens is not None:
            from router.tokens import SigningKeys

            self._tokens[0].keys = SigningKeys(state_dir)
        self.apply(with_persisted_endpoints(self.cfg))

    async def regenerate_key(self, name: str, key_type: str) -> tuple[str, str]:
        """A new primary or secondary key for ``name``: stored first (StateConflict or
        StateUnavailable: nothing changed), used here, then confirmed by every worker process
        (ReloadUnconfirmed if some did not: it is stored and used here)."""
        async with self._write_lock:
            await self._state.commit({KEYS_FILE: self.keys.regenerated(name, key_type)})
            self.keys = KeyStore(self.cfg.router.state_dir)
            self.refresh_auth(name)
        keys = self.keys.get(name)
        assert keys is not None
        await self._confirm_change()
        return keys

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
                svc = services[name] = Service(name, scfg, auth, self._links)
            else:
                svc.reconfigure(scfg, auth)
            if scfg.upstreams is not None:
                svc.set_replicas(scfg.upstreams)
        self.services = services
        self._build_endpoints(cfg)
        self.cfg = cfg

    async def change_endpoints(self, mutate: Callable[[dict[str, Any]], None]) -> None:
        """Apply an admin change to the endpoints: validated whole (ConfigError names what is
        wrong, and nothing changes), stored (StateConflict or StateUnavailable: nothing
        changed), swapped into the live routing table, then confirmed by every worker process
        (ReloadUnconfirmed if some did not: it is stored and live here)."""
        async with self._write_lock:
            data = self.cfg.model_dump(mode="json", exclude_unset=True)
            endpoints: dict[str, Any] = data.setdefault("endpoints", {})
            mutate(endpoints)
            new = parse_config(data, "change")
            await self._state.commit(
                {ENDPOINTS_FILE: orjson.dumps(endpoints, option=orjson.OPT_INDENT_2)})
            self.apply(new)
        await self._confirm_change()

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
            # azureml's metadata, kept as given.
            "description": svc.cfg.description,
            "tags": dict(svc.cfg.tags),
            "properties": dict(svc.cfg.properties),
        }

    def _collector_metrics(self) -> Iterable[Metric]:
        fam = CounterMetricFamily(
            "mlfe_datacollection_records", "Model data records, by result.", labels=["result"])
        fam.add_metric(["written"], self.collector.written)
        fam.add_metric(["dropped"], self.collector.dropped)
        return [fam, access_log_metric(self.handler.access_log), loop_tasks_metric()]

    async def start(self, listen: bool = True) -> None:
        """Build the services; listen on the scoring port unless worker processes do."""
        self.collector.start()
        if self._tokens is not None:
            await self._tokens[1].refresh_all()
        self.apply(self.cfg)
        if self.member is not None:
            self._tasks.append(self._supervisor.spawn(self.member.run(), name="slot member"))
            if self._follows:
                await self._await_sync(self.member)
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
            self._tasks.append(self._supervisor.spawn(self.tls.watch(), name="tls reload"))
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self._tasks.append(self._supervisor.spawn(self._sweep(), name="client timeout sweeper"))
        log.info("scoring on http://%s:%d", host, self.port)

    async def _await_sync(self, member: SlotMember) -> None:
        """A worker serves once it has its supervisor's current state (keys, endpoints and
        replica sets): an admin change made while it started is then not missed."""
        try:
            async with asyncio.timeout(SYNC_TIMEOUT_S):
                await member.synced.wait()
        except TimeoutError:
            log.warning("no state from the supervisor's broker after %.0f s; serving with "
                        "the state dir as read at start", SYNC_TIMEOUT_S)

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
        await self._supervisor.stop_tasks(self._tasks)
        self._tasks.clear()
        for svc in self.services.values():
            svc.close()
        if self._tokens is not None:
            await self._tokens[1].aclose()
        await self.collector.stop()  # every queued record is written
        self.handler.access_log.flush()
        # Bounded: a stalled stdout must not hold up the shutdown.
        await asyncio.to_thread(self.handler.access_log.drain)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
