"""Load across router pods: the leader's autoscaler sees the busy and queued counts of every
router pod, not only its own.

:class:`PeerCounts` is a ``StatsSource`` (mlfe/stats.py). ``counts()`` stays an in-process
read that never blocks: the local router's counters, plus the last counts fetched from every
peer pod. A background loop fetches each peer's ``GET /v1/stats`` (admin port, shared admin
token) concurrently, with a short timeout, every ``interval_s``. A peer that does not answer is
left out of the sums (logged at most once a minute per peer); counts older than ``max_age_s``
are ignored, so a stalled loop cannot freeze the sums. Replicas are not summed: every router
pod routes to the same replicas, so the local ready count is the count.

The peers are the ready endpoints of the router's own admin Service (:func:`peer_watcher`),
at its ``admin`` port; this pod is left out by address (``POD_IP``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from deploy.kube.api import KubeApi
from deploy.kube.discovery import EndpointWatcher
from mlfe.clock import Clock, MonotonicClock
from mlfe.config import parse_hostport
from mlfe.stats import ServiceStats, StatsSource
from mlfe.supervise import Supervisor

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0


def pod_ip() -> str | None:
    """This pod's IP: ``POD_IP`` (downward API), else what the hostname resolves to."""
    ip = os.environ.get("POD_IP")
    if ip:
        return ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class PeerStats:
    at: float  # clock time of the fetch
    services: dict[str, tuple[int, int]]  # name -> (busy, queued)
    # name -> cumulative (arrivals, served, service seconds), for the demand policy's rates
    totals: dict[str, tuple[int, int, float]] = dataclasses.field(default_factory=dict)


def _parse_totals(data: Any) -> dict[str, tuple[int, int, float]]:
    out: dict[str, tuple[int, int, float]] = {}
    for name, s in (data.get("services") or {}).items():
        if isinstance(s, dict):
            a, n, sec = s.get("arrivals", 0), s.get("served", 0), s.get("serviceSeconds", 0.0)
            if isinstance(a, int) and isinstance(n, int) and isinstance(sec, int | float):
                out[str(name)] = (a, n, float(sec))
    return out


def _parse_stats(data: Any) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    services = data.get("services") if isinstance(data, dict) else None
    if not isinstance(services, dict):
        raise ValueError("no 'services' object")
    for name, s in services.items():
        if isinstance(s, dict):
            busy, queued = s.get("busy", 0), s.get("queued", 0)
            if isinstance(busy, int) and isinstance(queued, int) and busy >= 0 and queued >= 0:
                out[str(name)] = (busy, queued)
    return out


class PeerCounts:
    def __init__(
        self,
        local: StatsSource,
        *,
        admin_token: str,
        self_hosts: Iterable[str | None] = (),
        clock: Clock | None = None,
        supervisor: Supervisor | None = None,
        timeout_s: float = 0.5,
        interval_s: float = 1.0,
        max_age_s: float | None = None,
        scheme: str = "http",
    ) -> None:
        self._local = local
        self._token = admin_token
        self._self_hosts = {h for h in self_hosts if h}
        self._clock = clock or MonotonicClock()
        # The process's one supervisor in production; tests may leave it out.
        self._supervisor = supervisor or Supervisor(clock=self._clock)
        self._timeout_s = timeout_s
        self.interval_s = interval_s
        self._max_age_s = max_age_s if max_age_s is not None else 3 * interval_s + timeout_s
        self._scheme = scheme
        self._peers: list[str] = []
        self._stats: dict[str, PeerStats] = {}
        # Each peer's totals when first seen: only what it counts after that is added, so a
        # peer joining does not look like a burst of arrivals.
        self._base: dict[str, dict[str, tuple[int, int, float]]] = {}
        self._logged: dict[str, float] = {}  # peer -> clock time its failure was last logged
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- StatsSource -------------------------------------------------------------------------

    def counts(self, service: str) -> ServiceStats:
        local = self._local.counts(service)
        busy, queued = local.busy, local.queued
        arrivals, served, seconds = local.arrivals, local.served, local.service_seconds
        now = self._clock.now()
        for peer, stats in self._stats.items():
            if now - stats.at <= self._max_age_s:
                b, q = stats.services.get(service, (0, 0))
                busy, queued = busy + b, queued + q
                a, n, sec = stats.totals.get(service, (0, 0, 0.0))
                a0, n0, sec0 = self._base.get(peer, {}).get(service, (a, n, sec))
                arrivals, served = arrivals + max(a - a0, 0), served + max(n - n0, 0)
                seconds += max(sec - sec0, 0.0)
        return dataclasses.replace(local, busy=busy, queued=queued, arrivals=arrivals,
                                   served=served, service_seconds=seconds)

    # ---- peers --------------------------------------------------------------------------------

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    def set_peers(self, addresses: Iterable[str]) -> None:
        """The admin ``host:port`` of every router pod (this one is left out by host)."""
        peers = []
        for addr in addresses:
            host, _ = parse_hostport(addr)
            if host not in self._self_hosts:
                peers.append(addr)
        self._peers = sorted(set(peers))
        for gone in self._stats.keys() - set(self._peers):
            del self._stats[gone]
            self._base.pop(gone, None)

    async def refresh(self) -> None:
        """Fetch every peer's stats once, concurrently."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._timeout_s, headers={"Authorization": f"Bearer {self._token}"},
                trust_env=False)  # pod to pod: never through an HTTP(S)_PROXY
        peers = list(self._peers)
        results = await asyncio.gather(*(self._fetch(self._client, p) for p in peers))
        current = set(self._peers)  # the peer set may have changed meanwhile
        for peer, stats in zip(peers, results, strict=True):
            if stats is None or peer not in current:
                self._stats.pop(peer, None)
                self._base.pop(peer, None)
            else:
                self._stats[peer] = stats
                base = self._base.setdefault(peer, {})
                for name, totals in stats.totals.items():
                    base.setdefault(name, totals)

    async def _fetch(self, client: httpx.AsyncClient, peer: str) -> PeerStats | None:
        url = f"{self._scheme}://{peer}/v1/stats"
        try:
            resp = await client.get(url)
            resp.raise_for_status()
            data = resp.json()
            services = _parse_stats(data)
            totals = _parse_totals(data)
        except (httpx.HTTPError, ValueError) as e:
            now = self._clock.now()
            last = self._logged.get(peer)
            if last is None or now - last >= LOG_EVERY_S:
                self._logged[peer] = now
                log.warning("router peer %s: no stats (%s: %s); left out of the counts",
                            peer, type(e).__name__, e)
            return None
        return PeerStats(self._clock.now(), services, totals)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await self.refresh()
            await self._clock.sleep(self.interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = self._supervisor.spawn(self.run(), name="peer counts")

    async def stop(self) -> None:
        """Stop fetching (the peers' counts age out); :meth:`start` may be called again."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._stats.clear()
        self._base.clear()

    async def close(self) -> None:
        await self.stop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


ROUTER_ADMIN_SERVICE = "mlfe-router-admin"  # deploy/kubernetes/service.yaml


def peer_watcher(api: KubeApi, peers: PeerCounts, *, service: str = ROUTER_ADMIN_SERVICE,
                 port: str | int = "admin", namespace: str | None = None,
                 clock: Clock | None = None, supervisor: Supervisor | None = None
                 ) -> EndpointWatcher:
    """Feed ``peers`` from the ready endpoints of the router's own Service (by default the
    admin Service of the manifests, port ``admin``; a number sets the port outright)."""
    return EndpointWatcher(api, namespace or api.namespace, service, peers.set_peers,
                           port=port, clock=clock, supervisor=supervisor)
