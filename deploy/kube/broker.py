"""The slot broker on the Lease holder: exact per-replica caps across router pods, by default.

The pod that holds the Lease runs the slot broker (router/slots.py) and advertises it in the
Lease's annotations (``mlfe.io/slot-broker``: its identity and address); every pod, the holder
included, joins the broker the Lease names, so nothing is configured. The holder also lists
the broker's members (``mlfe.io/slot-members``), so that the next holder's broker knows whose
slots may still be out there (every member that may hold slots: connected, departing, or
still waited for); it lends only to members the Lease lists as written (a member that joins
gets slots after the next renewal, within about 2.5 s):

- a new broker starts cold (router/coordination.py): it lends nothing until each member of the
  previous broker has reported what it holds (a live pod finds the new broker within ~4.5 s;
  a container restarted in place has the same member id, the pod's name, and reports holding
  nothing), or is gone, or until ``hold_s + grace_s`` has passed. A member is gone when its pod
  has been absent from the router Service's EndpointSlices for ``grace_s`` (Kubernetes removes
  a pod from them only once the Pod object is deleted, so its containers have stopped; the
  grace covers requests a replica may still be running for it). The slices are read fresh from
  the API server, and trusted only when they list this pod itself (so they are the router
  pods' and member ids are pod names);
- a member without a broker keeps admitting with the slots it holds (their sum fits every
  cap), and gives them up after ``hold_s`` (SlotMember), so that the cold start's end is safe;
- a pod that stops holding the Lease closes its broker at once (its members move on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from deploy.kube.leader import LeaderElector
from deploy.kube.peers import pod_ip
from mlfe.clock import Clock, MonotonicClock
from mlfe.stats import ServiceStats, StatsSource
from mlfe.supervise import Supervisor
from router.slots import BrokerServer, SlotMember

log = logging.getLogger(__name__)

BROKER_ANNOTATION = "mlfe.io/slot-broker"
MEMBERS_ANNOTATION = "mlfe.io/slot-members"
BROKER_PORT = 8083
# Longer than a failover (the Lease's 15 s duration): members keep their slots through one.
HOLD_S = 30.0
FOLLOW_S = 0.5  # how often a pod looks at the Lease as last read for the broker's address


def advertised_address(listen: str, port: int) -> str:
    """Where other pods reach a broker listening on ``listen``: its host, or this pod's IP
    when it listens on every address."""
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = pod_ip() or "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def broker_named(elector: LeaderElector) -> str:
    """The broker address the Lease names, if its holder wrote it (else "")."""
    value = elector.annotations.get(BROKER_ANNOTATION, "")
    holder, _, address = value.partition("@")
    return address if holder and holder == elector.holder else ""


def absences(waiting: Iterable[str], listed: set[str] | None, me: str,
             since: Mapping[str, float], now: float) -> dict[str, float]:
    """Since when each member still waited for is known absent from the router pods listed
    (``listed``: None when the list failed, which changes nothing known). Slices that do not
    list this pod (``me``) are not the router pods': nothing is known absent."""
    if listed is None:
        return {m: t for m, t in since.items() if m in waiting}
    if me not in listed:
        return {}
    return {m: since.get(m, now) for m in waiting if m not in listed}


class BrokerCounts:
    """The leader's load counts, summed over every router pod as each pod's slot member reports
    them to the broker: busy and queued (every 20 ms while they change, every second anyway)
    and the cumulative counters the demand policy takes its rates from (every 0.25 s), so the
    autoscaler scales on the whole service. Before the broker has any member, this pod's own
    counts."""

    def __init__(self, local: StatsSource, server: Callable[[], BrokerServer | None]) -> None:
        self._local = local
        self._server = server

    def counts(self, service: str) -> ServiceStats:
        local = self._local.counts(service)
        server = self._server()
        if server is None or not server.members():
            return local
        totals = server.totals(service)
        busy, queued = totals["busy"], totals["queued"]
        arrivals, served, seconds = server.metrics(service).flow(busy, queued)
        return dataclasses.replace(local, busy=busy, queued=queued, arrivals=arrivals,
                                   served=served, service_seconds=seconds)


class LeaseBroker:
    """Runs the broker while this pod leads, and points this pod's slot member at the broker
    the Lease names. ``listed`` reads the names of the router pods in the router Service's
    EndpointSlices now (None if it cannot), for the cold start."""

    def __init__(self, elector: LeaderElector, member: SlotMember, *, listen: str,
                 grace_s: float, supervisor: Supervisor, hold_s: float = HOLD_S,
                 clock: Clock | None = None,
                 listed: Callable[[], Awaitable[set[str] | None]] | None = None) -> None:
        self._elector = elector
        self._member = member
        self._listen = listen
        self._grace_s = grace_s
        self._hold_s = hold_s
        self._supervisor = supervisor
        self._clock = clock or MonotonicClock()
        self._listed = listed
        self.server: BrokerServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks.append(self._supervisor.spawn(self._follow(), name="slot broker address"))

    async def _follow(self) -> None:
        while True:
            address = broker_named(self._elector)
            if address:
                self._member.set_address(address)
            await self._clock.sleep(FOLLOW_S)

    async def lead(self) -> None:
        """This pod now holds the Lease: run the broker, cold if another ran one before."""
        previous = self._elector.annotations.get(MEMBERS_ANNOTATION, "")
        expected = {m for m in previous.split(",") if m}
        server = BrokerServer(self._grace_s, expected=expected, recorded_only=True)
        await server.start(self._listen)
        self.server = server
        address = advertised_address(self._listen, server.port)
        self._elector.advertised = {BROKER_ANNOTATION: f"{self._elector.identity}@{address}",
                                    MEMBERS_ANNOTATION: ""}
        log.info("slot broker at %s%s", address,
                 f" (cold: waiting for {len(expected)} members of the previous broker)"
                 if expected else "")
        self._member.set_address(address)
        self._tasks.append(self._supervisor.spawn(self._advertise_members(server),
                                                  name="slot broker members"))
        if expected:
            self._tasks.append(self._supervisor.spawn(self._end_cold_start(server),
                                                      name="slot broker cold start",
                                                      finishable=True))

    async def _advertise_members(self, server: BrokerServer) -> None:
        recorded: str | None = None
        while True:
            # Written at the next renewal; lent to once written (the Lease as last written).
            self._elector.advertised[MEMBERS_ANNOTATION] = ",".join(server.holders())
            if self._elector.holder == self._elector.identity:
                written = self._elector.annotations.get(MEMBERS_ANNOTATION, "")
                if written != recorded:
                    recorded = written
                    server.lend_to(m for m in written.split(",") if m)
            await self._clock.sleep(FOLLOW_S)

    async def _end_cold_start(self, server: BrokerServer) -> None:
        started = self._clock.now()
        absent: dict[str, float] = {}
        while server.broker.cold:
            if self._clock.now() - started >= self._hold_s + self._grace_s:
                server.warm()  # whoever has not come back has given its slots up by now
                return
            if self._listed is not None:
                listed = await self._listed()
                now = self._clock.now()  # by now, those not listed had stopped
                absent = absences(server.broker.waiting_for, listed, self._member.member_id,
                                  absent, now)
                for member, since in absent.items():
                    if now - since >= self._grace_s:
                        server.gone(member)
            await self._clock.sleep(FOLLOW_S)

    async def follow(self) -> None:
        """This pod no longer holds the Lease: its broker closes (members move on)."""
        for task in self._tasks[1:]:
            task.cancel()
        del self._tasks[1:]
        self._elector.advertised = {}
        if self.server is not None:
            await self.server.close()
            self.server = None

    async def close(self) -> None:
        await self.follow()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
