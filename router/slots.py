"""The slot broker on the wire: a server that owns the `SlotBroker`, and the member side that
each router instance (worker process or pod) runs beside its scoring path.

JSON lines over a stream (a unix socket between worker processes, TCP between pods):

    member -> broker  {"op": "hello", "member": id}
                      {"op": "report", "service": s, "demand": n, "busy": n, "queued": n,
                       "replicas": {addr: cap}, "holding": {addr: slots} (after (re)connect)}
                      {"op": "released", "service": s, "replica": addr, "slots": n}
                      {"op": "reloaded", "seq": n, "ok": bool}   (answer to a reload)
    broker -> member  {"op": "lending"}   (this broker may lend to the member from now on)
                      {"op": "set", "service": s, "replica": addr, "slots": n}
                      {"op": "replicas", "service": s, "addrs": [...]}   (supervisor's replicas)
                      {"op": "reload", "seq": n}     (keys or endpoints changed in the state dir)

Per request nothing is sent: a member reports its demand at most every `REPORT_INTERVAL_S`
when it changed (and every `HEARTBEAT_S` anyway), so the cost is per interval, not per request.

Admin changes (worker processes): the supervisor stores a change in the state dir, then
`BrokerServer.reload()` sends "reload" with the next sequence number to every member; each one
rereads the state dir and answers "reloaded" with that number. The admin call returns once every
live member has answered (a member that leaves meanwhile is not waited for; a worker that starts
later reads the state dir anyway), or fails with `ReloadUnconfirmed` after `RELOAD_TIMEOUT_S`.
Right after "hello" the broker sends its current "reload" too, so a member that read the state
dir before a change it was not yet connected for catches up; a worker serves only after that
first reload (`SlotMember.synced`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from mlfe.supervise import Supervisor
from router.admission import Replica
from router.coordination import SetSlots, SlotBroker
from router.metrics import ServiceMetrics
from router.services import Service, grant_all

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 0.02
HEARTBEAT_S = 1.0
# Counters (for /metrics and the router self-scaler) go this often.
METRICS_INTERVAL_S = 0.25
RECONNECT_MAX_S = 2.0
# A departed member's slots are held this long: the replica may still be running its requests.
DEFAULT_GRACE_S = 2.0
# How long an admin change waits for every worker to confirm it has applied it.
RELOAD_TIMEOUT_S = 5.0


# One message is one line; a service with thousands of replicas makes long ones.
LINE_LIMIT = 16 * 1024 * 1024


async def open_stream(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if address.startswith("unix:"):
        return await asyncio.open_unix_connection(address[5:], limit=LINE_LIMIT)
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host.strip("[]"), int(port), limit=LINE_LIMIT)


def _fresh_socket_path(path: str) -> str:
    Path(path).unlink(missing_ok=True)  # a socket file left by a previous run
    return path


def _line(msg: dict[str, Any]) -> bytes:
    return orjson.dumps(msg, option=orjson.OPT_APPEND_NEWLINE)


class ReloadUnconfirmed(Exception):
    """Some live members did not confirm a reload in time (or could not apply it)."""

    def __init__(self, missing: int, live: int, timeout_s: float) -> None:
        self.missing = missing
        self.live = live
        super().__init__(f"{missing} of {live} worker processes did not confirm the change "
                         f"within {timeout_s:g} s")


class BrokerServer:
    """Owns the slots of every replica; members connect, report and receive grants."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, expected: Iterable[str] = (), *,
                 recorded_only: bool = False) -> None:
        # recorded_only: lend only to the members given to `lend_to` (SlotBroker).
        self.broker = SlotBroker(expected, recorded_only=recorded_only)
        self._lending: set[str] = set()  # connected members told "lending"
        self.grace_s = grace_s
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self._leaving: dict[str, asyncio.TimerHandle] = {}
        self._server: asyncio.AbstractServer | None = None
        self.stats: dict[str, dict[str, dict[str, int]]] = {}  # member -> service -> counts
        self._replicas: dict[str, list[str]] = {}  # pushed replica sets (worker mode)
        self._reported = asyncio.Event()  # replaced after each report: wakes drain waiters
        self._metrics: dict[str, dict[str, dict[str, Any]]] = {}  # member -> service -> snap
        self._retired: dict[str, ServiceMetrics] = {}  # counters of members that left
        self._reload_seq = 0
        self._confirmed: dict[str, int] = {}  # member -> last reload it applied
        self._refused: dict[str, int] = {}  # member -> last reload it failed to apply
        self._answered = asyncio.Event()  # replaced after each answer or departure

    async def start(self, address: str) -> None:
        if address.startswith("unix:"):
            path = _fresh_socket_path(address[5:])
            self._server = await asyncio.start_unix_server(self._serve, path, limit=LINE_LIMIT)
        else:
            host, _, port = address.rpartition(":")
            self._server = await asyncio.start_server(
                self._serve, host.strip("[]"), int(port), limit=LINE_LIMIT)

    async def close(self) -> None:
        for handle in self._leaving.values():
            handle.cancel()
        if self._server is not None:
            self._server.close()
        for w in list(self._writers.values()):
            w.close()

    @property
    def port(self) -> int:
        sockets = getattr(self._server, "sockets", None)  # asyncio's or uvloop's Server
        assert sockets
        return int(sockets[0].getsockname()[1])

    def members(self) -> list[str]:
        """The members connected now."""
        return sorted(self._writers)

    def holders(self) -> list[str]:
        """Every member that may hold slots of this broker or of the one before: connected,
        departed within the grace time, or still waited for (a next broker waits for these:
        SlotBroker's cold start)."""
        return sorted({*self._writers, *self._leaving, *self.broker.waiting_for})

    def lend_to(self, members: Iterable[str]) -> None:
        """Lend only to ``members`` from now on (they are recorded for the next broker)."""
        out = self.broker.lend_to(members)
        self._tell_lending()
        self._send(out)

    def _tell_lending(self) -> None:
        for member, w in self._writers.items():
            if member not in self._lending and self.broker.may_lend(member):
                self._lending.add(member)
                w.write(_line({"op": "lending"}))

    def warm(self) -> None:
        """End a cold start (see router/coordination.py)."""
        if self.broker.cold:
            log.info("slot broker: lending (the previous broker's members reported or their "
                     "hold time passed)")
        self._send(self.broker.warm())

    def gone(self, member: str) -> None:
        """A member of the previous broker no longer runs: a cold start stops waiting for it."""
        if member not in self.broker.waiting_for:
            return
        out = self.broker.gone(member)
        log.info("slot broker: %s (a member of the previous broker) no longer runs%s", member,
                 "" if self.broker.cold else "; lending")
        self._send(out)

    def push_replicas(self, service: str, addrs: Iterable[str]) -> None:
        """The supervisor's replica set of a service, for its worker processes."""
        self._replicas[service] = list(addrs)
        msg = _line({"op": "replicas", "service": service, "addrs": self._replicas[service]})
        for w in self._writers.values():
            w.write(msg)

    def push_reload(self) -> int:
        """Tell every member to reread the state dir, waiting for no one (a change that came
        from another router pod: no admin call waits here); its sequence number."""
        self._reload_seq += 1
        msg = _line({"op": "reload", "seq": self._reload_seq})
        for w in self._writers.values():
            w.write(msg)
        return self._reload_seq

    async def reload(self, timeout_s: float = RELOAD_TIMEOUT_S) -> None:
        """Tell every member to reread the state dir; return once every live one confirmed.
        ReloadUnconfirmed if some did not within `timeout_s` (or failed to apply it)."""
        seq = self.push_reload()
        try:
            async with asyncio.timeout(timeout_s):
                while self._waiting_for(seq):
                    await self._answered.wait()
        except TimeoutError:
            pass
        missing = [m for m in self._writers if self._confirmed.get(m, 0) < seq]
        if missing:
            raise ReloadUnconfirmed(len(missing), len(self._writers), timeout_s)

    def _waiting_for(self, seq: int) -> list[str]:
        return [m for m in self._writers
                if self._confirmed.get(m, 0) < seq and self._refused.get(m, 0) < seq]

    def _wake_reload_waiters(self) -> None:
        self._answered.set()
        self._answered = asyncio.Event()

    def totals(self, service: str) -> dict[str, int]:
        """busy and queued summed over live members (what the autoscaler reads)."""
        out = {"busy": 0, "queued": 0}
        for member, services in self.stats.items():
            if member in self._writers:
                counts = services.get(service, {})
                out["busy"] += counts.get("busy", 0)
                out["queued"] += counts.get("queued", 0)
        return out

    async def wait_drained(self, service: str, addr: str) -> None:
        """Until no live member reports requests on replica `addr`."""
        while self.in_flight(service, addr):
            await self._reported.wait()

    def in_flight(self, service: str, addr: str) -> int:
        """Requests on replica `addr` across live members (a drain waits for 0)."""
        key = f"inflight:{addr}"
        return sum(s.get(service, {}).get(key, 0) for m, s in self.stats.items()
                   if m in self._writers)

    def _send(self, msgs: list[SetSlots]) -> None:
        for m in msgs:
            w = self._writers.get(m.member)
            if w is not None:
                w.write(_line({"op": "set", "service": m.service, "replica": m.replica,
                               "slots": m.slots}))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        member = None
        try:
            hello = orjson.loads(await reader.readline())
            member = str(hello["member"])
            old = self._writers.get(member)
            if old is not None:
                old.close()
            self._writers[member] = writer
            pending = self._leaving.pop(member, None)
            if pending is not None:
                pending.cancel()
            # A new connection (maybe a restarted process) has confirmed nothing yet.
            self._confirmed.pop(member, None)
            self._refused.pop(member, None)
            self._lending.discard(member)
            for service, addrs in self._replicas.items():
                writer.write(_line({"op": "replicas", "service": service, "addrs": addrs}))
            writer.write(_line({"op": "reload", "seq": self._reload_seq}))
            self._tell_lending()
            async for raw in reader:
                self._handle(member, orjson.loads(raw))
        except (OSError, ValueError, KeyError, asyncio.IncompleteReadError) as e:
            log.warning("slot broker: member %s: %s", member, e)
        finally:
            if member is not None and self._writers.get(member) is writer:
                del self._writers[member]
                self._lending.discard(member)
                loop = asyncio.get_running_loop()
                self._leaving[member] = loop.call_later(self.grace_s, self._leave, member)
                self._wake_reload_waiters()  # a reload no longer waits for this one
            writer.close()

    def _handle(self, member: str, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "report":
            service = msg["service"]
            self.stats.setdefault(member, {})[service] = {
                "busy": int(msg.get("busy", 0)), "queued": int(msg.get("queued", 0)),
                **{f"inflight:{a}": int(n) for a, n in msg.get("inFlight", {}).items()}}
            self._reported.set()
            self._reported = asyncio.Event()
            if member in self.broker.waiting_for and len(self.broker.waiting_for) == 1:
                log.info("slot broker: lending (every member of the previous broker reported "
                         "or no longer runs)")
            self._send(self.broker.report(
                member, service, int(msg["demand"]),
                {str(k): int(v) for k, v in msg["replicas"].items()},
                {str(k): int(v) for k, v in msg.get("holding", {}).items()} or None,
            ))
        elif op == "metrics":
            self._metrics.setdefault(member, {})[msg["service"]] = msg["metrics"]
        elif op == "released":
            self._send(self.broker.released(member, msg["service"], msg["replica"],
                                            int(msg["slots"])))
        elif op == "reloaded":
            seq = int(msg["seq"])
            answers = self._confirmed if msg.get("ok", True) else self._refused
            answers[member] = max(answers.get(member, 0), seq)
            self._wake_reload_waiters()

    def metrics(self, service: str) -> ServiceMetrics:
        """A service's counters summed over its members, past and present."""
        total = ServiceMetrics()
        retired = self._retired.get(service)
        if retired is not None:
            total.add(retired.snapshot())
        for services in self._metrics.values():
            snap = services.get(service)
            if snap is not None:
                total.add(snap)
        return total

    def _leave(self, member: str) -> None:
        self._leaving.pop(member, None)
        self.stats.pop(member, None)
        for service, snap in self._metrics.pop(member, {}).items():
            self._retired.setdefault(service, ServiceMetrics()).add(snap)
        log.info("slot broker: member %s left; its slots return to the pool", member)
        self._send(self.broker.leave(member))


class SlotMember:
    """Runs in a router instance: applies grants to its pools and reports its demand."""

    def __init__(self, services: Callable[[], Mapping[str, Service]], address: str,
                 member_id: str, supervisor: Supervisor,
                 on_replicas: Callable[[str, list[str]], None] | None = None,
                 on_reload: Callable[[], None] | None = None,
                 hold_s: float | None = None) -> None:
        self._services = services
        self._supervisor = supervisor
        self._address = address  # "": none known yet (set_address)
        self._address_set = asyncio.Event()
        # Without a broker for this long, give every slot up (None: keep them): a new broker
        # counts on that to know what is free (SlotBroker's cold start).
        self._hold_s = hold_s
        self._drop: asyncio.TimerHandle | None = None
        self.member_id = member_id
        self._on_replicas = on_replicas
        self._on_reload = on_reload
        self._writer: asyncio.StreamWriter | None = None
        self._last: dict[str, object] = {}
        self._lowered: dict[tuple[str, str], int] = {}  # (service, addr) -> slots to fit under
        self.connected = asyncio.Event()
        # A broker has said it lends to this router, once (before that it holds no slots).
        self.joined = False
        # Set once the broker's first "reload" (sent after hello) is applied: the state dir and
        # replica sets are the supervisor's current ones.
        self.synced = asyncio.Event()

    # ---- hooks from the scoring path -------------------------------------------------------

    def replica_released(self, svc: Service, replica: Replica) -> None:
        """Called after a request on `replica` finished (Service.release)."""
        key = (svc.name, replica.addr)
        slots = self._lowered.get(key)
        if slots is not None and replica.in_flight <= slots:
            del self._lowered[key]
            self._write({"op": "released", "service": svc.name, "replica": replica.addr,
                         "slots": slots})

    # ---- the connection ----------------------------------------------------------------------

    def set_address(self, address: str) -> None:
        """The broker moved (a new leader's): leave the old one, join this one."""
        if address == self._address:
            return
        log.info("slot broker: now at %s", address or "(none)")
        self._address = address
        self._address_set.set()
        writer, self._writer = self._writer, None  # nothing more is written to the old one
        if writer is not None:
            writer.close()  # run() notices and connects to the new address

    def _lost_broker(self) -> None:
        if self._hold_s is not None and self._drop is None:
            self._drop = asyncio.get_running_loop().call_later(self._hold_s, self._give_up)

    def _give_up(self) -> None:
        self._drop = None
        log.warning("slot broker: none for %.0f s; giving this router's slots up until one "
                    "lends again", self._hold_s or 0)
        for svc in self._services().values():
            for replica in list(svc.pool.replicas):
                if replica.cap:
                    svc.pool.set_cap(replica, 0)

    async def run(self) -> None:
        delay = 0.05
        self._lost_broker()  # not connected yet: the hold time runs
        while True:
            if not self._address:
                self._address_set.clear()
                await self._address_set.wait()
                continue
            try:
                reader, writer = await open_stream(self._address)
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = 0.05
            if self._drop is not None:
                self._drop.cancel()
                self._drop = None
            self._writer = writer
            self._last.clear()
            writer.write(_line({"op": "hello", "member": self.member_id}))
            self._report(with_holding=True)
            self.connected.set()
            reporter = self._supervisor.spawn(self._report_loop(), name="slot reports")
            try:
                async for raw in reader:
                    self._apply(orjson.loads(raw))
            except (OSError, ValueError) as e:
                log.warning("slot broker connection: %s", e)
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                self.connected.clear()
                self._writer = None
                writer.close()
                self._lost_broker()
            # Keep the slots held: the sum stays under every cap while the broker is away.
            log.warning("slot broker at %s gone; reconnecting", self._address)

    def _write(self, msg: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_line(msg))

    async def _report_loop(self) -> None:
        beat = metrics = 0.0
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            beat += REPORT_INTERVAL_S
            metrics += REPORT_INTERVAL_S
            force = beat >= HEARTBEAT_S
            if force:
                beat = 0.0
            if metrics >= METRICS_INTERVAL_S:
                metrics = 0.0
                self.send_metrics()
            self._report(force=force)

    def send_metrics(self) -> None:
        """The counters of every service (each heartbeat, and once more when draining ends)."""
        for name, svc in self._services().items():
            self._write({"op": "metrics", "service": name, "metrics": svc.metrics.snapshot()})

    def _report(self, with_holding: bool = False, force: bool = False) -> None:
        for name, svc in self._services().items():
            pool = svc.pool
            demand = pool.busy + pool.queued
            # Every replica in the pool, in rotation or not: a replica briefly out of rotation
            # keeps its slots here (this router still has requests on it).
            replicas = tuple(sorted((r.addr, pool.max_concurrent) for r in pool.replicas))
            in_flight = {r.addr: r.in_flight for r in (*pool.replicas, *svc.draining)
                         if r.in_flight}
            state = (demand, replicas, tuple(sorted(in_flight.items())))
            if not force and not with_holding and self._last.get(name) == state:
                continue
            self._last[name] = state
            msg: dict[str, Any] = {"op": "report", "service": name, "demand": demand,
                                   "busy": pool.busy, "queued": pool.queued,
                                   "replicas": dict(replicas), "inFlight": in_flight}
            if with_holding:
                # In flight counts too: slots given up may still have requests running.
                msg["holding"] = {r.addr: max(r.cap, r.in_flight) for r in pool.replicas
                                  if r.cap or r.in_flight}
            self._write(msg)

    def _apply(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "set":
            if int(msg["slots"]) > 0:
                # A grant is lending too: a broker of an earlier version never says "lending"
                # (a pod it leads must still become ready, or a rolling update would stall).
                self.joined = True
            svc = self._services().get(msg["service"])
            if svc is None:
                return
            addr, slots = msg["replica"], int(msg["slots"])
            replica = next((r for r in svc.pool.replicas if r.addr == addr), None)
            if replica is None:
                # Not ours (any more): nothing in flight here, so it is released at once.
                self._write({"op": "released", "service": svc.name, "replica": addr,
                             "slots": 0})
                return
            # Below what it may use, or below what still runs there (slots it gave up without
            # a broker): the broker counts them until this router says they are free.
            lowering = slots < max(replica.cap, replica.in_flight)
            grant_all(svc.pool.set_cap(replica, slots))
            if not lowering:
                self._lowered.pop((svc.name, addr), None)
            else:
                self._lowered[(svc.name, addr)] = slots
                self.replica_released(svc, replica)  # at once if it already fits
        elif op == "lending":
            self.joined = True
        elif op == "replicas" and self._on_replicas is not None:
            self._on_replicas(msg["service"], [str(a) for a in msg["addrs"]])
        elif op == "reload":
            ok = True
            if self._on_reload is not None:
                try:
                    self._on_reload()
                except (OSError, ValueError) as e:
                    # The supervisor hears of it; this worker keeps its previous state. Only the
                    # error's kind: a config error's message may quote a key.
                    log.error("reloading the state dir failed (%s)", type(e).__name__)
                    ok = False
            self._write({"op": "reloaded", "seq": int(msg["seq"]), "ok": ok})
            self.synced.set()
