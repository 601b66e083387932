"""Live state of each service: its admission pool, its replicas' connections, its credentials.

A `Service` outlives config reloads (its in-flight counts and queue must survive them); a reload
updates its limits and replica set in place and the routing table is rebuilt around it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from mlfe.config import EndpointConfig, ServiceConfig, parse_hostport
from mlfe.supervise import Supervisor
from router.admission import Handoff, Replica, ServicePool
from router.auth import Credentials
from router.metrics import ServiceMetrics
from router.probe import probe_http
from router.traffic import build_split
from router.upstream import ReplicaConnections

log = logging.getLogger(__name__)

# Backoff while probing a failed replica back into rotation.
PROBE_MIN_S = 0.25
PROBE_MAX_S = 5.0


def grant_all(handoffs: Iterable[Handoff]) -> None:
    for waiter, replica in handoffs:
        waiter.grant(replica)


class WorkerRequests(Protocol):
    """Where a worker supervisor's requests really are: in its worker processes, which report
    through the slot broker (router.slots.BrokerServer)."""

    def push_replicas(self, service: str, addrs: Iterable[str]) -> None: ...

    async def wait_drained(self, service: str, addr: str) -> None: ...


@dataclass(frozen=True, slots=True)
class ServiceLinks:
    """What a service is connected to, given when it is built.

    ``supervisor`` runs its probe tasks; ``on_release`` hears of every finished request (the
    slot member gives slots back to the broker); ``workers`` is set in a worker supervisor, whose
    replica sets its workers follow and whose drains wait for its workers' requests."""

    supervisor: Supervisor
    on_release: Callable[[Service, Replica], None] | None = None
    workers: WorkerRequests | None = None
    coordinated: bool = False  # replica slots are lent by a slot broker


def cold_start_s(cfg: ServiceConfig) -> float:
    """How long a request may wait for a replica to start: only a service that may scale to
    zero waits for one (autoscale_cold_start_seconds); otherwise no replica is a 503."""
    if cfg.autoscaling and cfg.autoscale_min_replicas == 0:
        return cfg.autoscale_cold_start_seconds
    return 0.0


class Service:
    def __init__(self, name: str, cfg: ServiceConfig, auth: Credentials, links: ServiceLinks
                 ) -> None:
        self.name = name
        self.cfg = cfg
        self.auth = auth
        self.pool = ServicePool(
            max_concurrent=cfg.replica_max_concurrent_requests,
            max_wait_s=cfg.max_request_wait_time / 1000,
            max_queue=cfg.max_queue_length,
            coordinated=links.coordinated,
            cold_start_s=cold_start_s(cfg),
        )
        self._links = links
        self.draining: set[Replica] = set()  # removed, with requests still in flight
        self.timeout_s = cfg.scoring_timeout_ms / 1000
        self._probes: dict[Replica, asyncio.Task[None]] = {}
        self._drained: dict[Replica, asyncio.Future[None]] = {}  # removed, awaiting in-flight
        self.expiry: asyncio.TimerHandle | None = None  # the queue head's wait deadline
        self.completed = 0  # requests finished (any outcome), for rates
        self.metrics = ServiceMetrics()

    # ---- configuration ---------------------------------------------------------------------

    def reconfigure(self, cfg: ServiceConfig, auth: Credentials) -> None:
        self.cfg = cfg
        self.pool.cold_start_s = cold_start_s(cfg)
        self.auth = auth
        self.timeout_s = cfg.scoring_timeout_ms / 1000
        grant_all(
            self.pool.set_limits(
                cfg.replica_max_concurrent_requests,
                cfg.max_request_wait_time / 1000,
                cfg.max_queue_length,
            )
        )

    def set_replicas(self, addrs: Iterable[str]) -> None:
        """Make the pool's replicas exactly `addrs`: new ones join, missing ones are drained."""
        wanted = list(dict.fromkeys(addrs))
        current = {r.addr: r for r in self.pool.replicas}
        for addr, replica in current.items():
            if addr not in wanted:
                self.remove_replica(replica)
        for addr in wanted:
            if addr not in current:
                self.add_replica(addr)

    def add_replica(self, addr: str) -> Replica:
        host, port = parse_hostport(addr)
        replica, handoffs = self.pool.add(addr, self._now(), ReplicaConnections(host, port))
        grant_all(handoffs)
        self._deadlines_changed()
        self._replicas_changed()
        return replica

    def mark_up(self, replica: Replica) -> None:
        """`replica` is back in rotation: waiters get its slots at once."""
        grant_all(self.pool.mark_up(replica, self._now()))
        self._deadlines_changed()

    def _now(self) -> float:
        # Admission's clock (the loop's). Only read with someone waiting, which takes a
        # running loop; a replica set up before any request needs no time.
        return asyncio.get_running_loop().time() if self.pool.queued else 0.0

    # ---- the queue's wait deadlines --------------------------------------------------------

    def schedule_expiry(self) -> None:
        """Arm the timer for the queue head's deadline (it re-arms itself for the next one)."""
        if self.expiry is None:
            deadline = self.pool.next_deadline()
            if deadline is not None:
                self.expiry = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self.expiry = None
        for waiter in self.pool.expire(asyncio.get_running_loop().time()):
            waiter.expire()
        self.schedule_expiry()

    def _deadlines_changed(self) -> None:
        """A first replica in rotation restarts the cold waiters' clocks (usually sooner than
        the cold-start bound the timer was armed for): re-arm for the head's new deadline."""
        if self.expiry is None:
            return
        deadline = self.pool.next_deadline()
        if deadline is None or deadline < self.expiry.when():
            self.expiry.cancel()
            self.expiry = None
            self.schedule_expiry()

    def remove_replica(self, replica: Replica) -> None:
        """Out of rotation now; in-flight requests finish on their own connections."""
        self.pool.remove(replica)
        conns = replica.conns
        assert isinstance(conns, ReplicaConnections)
        conns.close()
        task = self._probes.pop(replica, None)
        if task is not None:
            task.cancel()
        if replica.in_flight:
            self.draining.add(replica)
        self._replicas_changed()

    def _replicas_changed(self) -> None:
        workers = self._links.workers
        if workers is not None:
            workers.push_replicas(self.name, [r.addr for r in self.pool.replicas])

    async def drain_replica(self, replica: Replica) -> None:
        """Remove `replica` and return once its in-flight requests have finished."""
        self.remove_replica(replica)
        workers = self._links.workers
        if workers is not None:
            await workers.wait_drained(self.name, replica.addr)  # requests are in the workers
        elif replica.in_flight:
            fut = self._drained.setdefault(replica, asyncio.get_running_loop().create_future())
            await asyncio.shield(fut)

    def release(self, replica: Replica) -> None:
        """A request on `replica` is over: its slot goes to the next waiter, if any."""
        handoff = self.pool.release(replica)
        on_release = self._links.on_release
        if on_release is not None:
            on_release(self, replica)
        if handoff is not None:
            handoff[0].grant(handoff[1])
        elif replica.removed and not replica.in_flight:
            self.draining.discard(replica)
            fut = self._drained.pop(replica, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    # ---- failures ---------------------------------------------------------------------------

    def replica_failed(self, replica: Replica) -> None:
        """A replica refused or reset a connection: out of rotation until a probe succeeds.
        Never the last replica in rotation (Envoy's panic threshold): one failure of the only
        replica would otherwise turn every request into a wait for its re-probe; it stays, and
        a replica that is really gone fails fast (502) until its target removes it."""
        if replica.removed or not replica.in_rotation:
            return
        if self.pool.ready <= 1:
            log.debug("service %s: replica %s failed; kept in rotation (the last one)",
                        self.name, replica.addr)
            return
        log.warning("service %s: replica %s failed; out of rotation", self.name, replica.addr)
        self.pool.mark_down(replica)
        if replica not in self._probes:
            self._probes[replica] = self._links.supervisor.spawn(
                self._probe_back(replica), name=f"probe {self.name} {replica.addr}",
                finishable=True,
            )

    async def _probe_back(self, replica: Replica) -> None:
        conns = replica.conns
        assert isinstance(conns, ReplicaConnections)
        delay = PROBE_MIN_S
        try:
            while not replica.removed:
                await asyncio.sleep(delay)
                if await probe_http(conns.host, conns.port, timeout_s=self.cfg.timeout_seconds):
                    log.info("service %s: replica %s is back", self.name, replica.addr)
                    self.mark_up(replica)
                    return
                delay = min(delay * 2, PROBE_MAX_S)
        finally:
            self._probes.pop(replica, None)

    def close(self) -> None:
        for task in list(self._probes.values()):
            task.cancel()
        if self.expiry is not None:
            self.expiry.cancel()
        for replica in list(self.pool.replicas):
            self.remove_replica(replica)


class Endpoint:
    """An endpoint's live routing: its versions' services, traffic split and credentials.
    Immutable once built; a change builds a new one and swaps the routing table."""

    __slots__ = ("auth", "cfg", "name", "services", "split", "version_headers")

    def __init__(
        self,
        name: str,
        cfg: EndpointConfig,
        auth: Credentials,
        services: dict[str, Service],
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.auth = auth
        self.services = {v: services[vc.service] for v, vc in cfg.versions.items()}
        self.split = build_split(cfg)
        self.version_headers = {
            v: b"azureml-model-deployment: " + v.encode() + b"\r\n" for v in cfg.versions
        }
