"""Admission for one service: per-replica slots, the replica pick, and the FIFO wait queue.

Pure state and decisions, no I/O and no clock reads: callers pass `now` (loop time, seconds) and
act on what comes back. The rules are azureml's: a replica never has more than
`replica_max_concurrent_requests` requests in flight; a request that finds no free slot waits,
first in first out, for at most `max_request_wait_time`; a freed slot goes straight to the
oldest waiter, with no polling (a freed slot that waits for a timer is capacity thrown away).
A request that finds no replica in rotation at all waits the same way: for a replica to join or
come back, up to `max_request_wait_time` (then "No ready replicas"). In a service that may be
scaled to zero (`cold_start_s`, autoscale_cold_start_seconds) it waits instead for the first
replica to start, up to `cold_start_s` from its arrival; its `max_request_wait_time` is counted
from when that replica comes into rotation (so a slow cold start does not eat it).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum


class Rejection(Enum):
    """Why a request was refused at once (its 503 reason and metric label)."""

    QUEUE_FULL = "queue_full"


@dataclass(eq=False, slots=True)
class Replica:
    """One model replica as admission sees it: an address and its in-flight count."""

    addr: str
    cap: int = 1  # slots this router may use on it (all of them, unless coordinated)
    in_flight: int = 0
    in_rotation: bool = True
    removed: bool = False
    # Opaque per-replica state of the I/O layer (its connection pool), kept here so a pick
    # needs no second lookup on the hot path.
    conns: object = None


@dataclass(eq=False, slots=True)
class Waiter:
    """A queued request: `grant(replica)` when a slot is handed to it, `expire()` when its
    wait is over (both called by the I/O layer with what admission returns)."""

    deadline: float
    grant: Callable[[Replica], None]
    expire: Callable[[], None]
    enqueued_at: float
    done: bool = False  # left the queue: granted, expired or cancelled
    # Queued while the service was at zero: its deadline is the cold-start bound until the
    # first replica comes into rotation, then that moment plus max_request_wait_time.
    cold: bool = False


Handoff = tuple[Waiter, Replica]


@dataclass(eq=False)
class ServicePool:
    """Slots and queue of one service. Not thread-safe: used from the event loop only."""

    max_concurrent: int  # replica_max_concurrent_requests: a replica's cap across routers
    max_wait_s: float
    max_queue: int
    rand: Callable[[], float] = random.random
    # With several routers the slot broker hands out each replica's slots: a new replica
    # starts with none here until it grants some (router/coordination.py).
    coordinated: bool = False
    # A service that may be scaled to zero: with no ready replica a request waits this long
    # from its arrival for one to start (then its max_wait_s from that start) instead of the
    # max_wait_s a service with replicas gives a replica to come back.
    cold_start_s: float = 0.0
    replicas: list[Replica] = field(default_factory=list)
    _waiters: deque[Waiter] = field(default_factory=deque)
    queued: int = 0  # live (not cancelled) waiters
    busy: int = 0  # requests in flight on any replica of this pool
    _free: int = 0  # free slots on replicas in rotation; 0 makes the overload path O(1)

    # ---- replica set ---------------------------------------------------------------------

    def add(self, addr: str, now: float, conns: object = None) -> tuple[Replica, list[Handoff]]:
        cap = 0 if self.coordinated else self.max_concurrent
        replica = Replica(addr, cap=cap, conns=conns)
        first = not self.ready
        self.replicas.append(replica)
        self._recount()
        if first:
            self._first_ready(now)
        return replica, self._drain_queue()

    def remove(self, replica: Replica) -> None:
        """Stop sending to `replica`; its in-flight requests finish and release normally."""
        if replica.removed:
            return
        replica.removed = True
        replica.in_rotation = False
        self.replicas.remove(replica)
        self._recount()

    def mark_down(self, replica: Replica) -> None:
        """Take a failing replica out of rotation until it is marked up again."""
        if replica.in_rotation:
            replica.in_rotation = False
            self._recount()

    def mark_up(self, replica: Replica, now: float) -> list[Handoff]:
        if replica.removed or replica.in_rotation:
            return []
        first = not self.ready
        replica.in_rotation = True
        self._recount()
        if first:
            self._first_ready(now)
        return self._drain_queue()

    def _first_ready(self, now: float) -> None:
        """A replica came into rotation in a pool that had none: the waiters that came while it
        was at zero now wait max_wait_s from here (their wait for a replica is over). Waiters
        from before it went to zero keep their (earlier) deadlines, so the queue stays in
        deadline order."""
        deadline = now + self.max_wait_s
        for waiter in self._waiters:
            if waiter.cold and not waiter.done:
                waiter.cold = False
                waiter.deadline = deadline

    def set_cap(self, replica: Replica, cap: int) -> list[Handoff]:
        """The slots this router may use on `replica` (a coordinated grant or take-back).
        A lowered cap only stops new requests: those in flight finish."""
        replica.cap = cap
        self._recount()
        return self._drain_queue()

    def set_limits(self, max_concurrent: int, max_wait_s: float, max_queue: int) -> list[Handoff]:
        """Apply new limits (config reload); a raised cap hands slots to waiters at once."""
        self.max_concurrent, self.max_wait_s, self.max_queue = max_concurrent, max_wait_s, max_queue
        if not self.coordinated:
            for r in self.replicas:
                r.cap = max_concurrent
        self._recount()
        return self._drain_queue()

    def _recount(self) -> None:
        self._free = sum(max(0, r.cap - r.in_flight) for r in self.replicas if r.in_rotation)

    @property
    def ready(self) -> int:
        return sum(1 for r in self.replicas if r.in_rotation)

    # ---- admission -----------------------------------------------------------------------

    def admit(
        self, now: float, grant: Callable[[Replica], None], expire: Callable[[], None]
    ) -> Replica | Waiter | Rejection:
        """A free replica (its slot is taken), or a queued Waiter, or a Rejection."""
        if self._free > 0 and not self.queued:
            replica = self._pick()
            if replica is not None:
                self._take(replica)
                return replica
        if self.queued >= self.max_queue:
            return Rejection.QUEUE_FULL
        if self.cold_start_s and not self.ready:
            # At zero: wait up to the cold-start bound for the first replica. Never before a
            # waiter ahead of it (one from before the pool went to zero, when max_wait_s is the
            # longer of the two): the head's deadline stays the earliest.
            deadline = now + self.cold_start_s
            if self._waiters:
                deadline = max(deadline, self._waiters[-1].deadline)
            waiter = Waiter(deadline, grant, expire, now, cold=True)
        else:
            waiter = Waiter(now + self.max_wait_s, grant, expire, now)
        self._waiters.append(waiter)
        self.queued += 1
        return waiter

    def release(self, replica: Replica) -> Handoff | None:
        """Free `replica`'s slot; if someone waits, the slot goes to the oldest waiter."""
        replica.in_flight -= 1
        self.busy -= 1
        if not replica.in_rotation or replica.in_flight >= replica.cap:
            return None  # (a lowered cap: this slot is not ours to reuse)
        self._free += 1
        waiter = self._next_waiter()
        if waiter is None:
            return None
        self._take(replica)
        return waiter, replica

    def cancel(self, waiter: Waiter) -> None:
        """The waiting client went away: it leaves the queue now (lazily removed from the deque)."""
        if not waiter.done:
            waiter.done = True
            self.queued -= 1
            if not self.queued:
                self._waiters.clear()

    def expire(self, now: float) -> list[Waiter]:
        """Pop the waiters whose deadline has passed (they get 503)."""
        expired: list[Waiter] = []
        waiters = self._waiters
        while waiters and (waiters[0].done or waiters[0].deadline <= now):
            waiter = waiters.popleft()
            if not waiter.done:
                waiter.done = True
                self.queued -= 1
                expired.append(waiter)
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline in the queue. Deadlines are in queue order, so the head's is the
        earliest: every waiter of a pool waits the same time from its arrival, or (a pool at
        zero) the same cold-start bound, kept no earlier than the tail's, until the first replica
        is ready, when they all get the same new deadline. The exception: after a reload
        shortens a wait, later ones may be earlier: they expire with the head, a little late."""
        for waiter in self._waiters:
            if not waiter.done:
                return waiter.deadline
        return None

    def waiters(self) -> Iterable[Waiter]:
        return (w for w in self._waiters if not w.done)

    # ---- internals -----------------------------------------------------------------------

    def _take(self, replica: Replica) -> None:
        replica.in_flight += 1
        self.busy += 1
        self._free -= 1

    def _drain_queue(self) -> list[Handoff]:
        handoffs: list[Handoff] = []
        while self.queued and self._free > 0:
            replica = self._pick()
            if replica is None:
                break
            waiter = self._next_waiter()
            assert waiter is not None  # queued > 0
            self._take(replica)
            handoffs.append((waiter, replica))
        return handoffs

    def _next_waiter(self) -> Waiter | None:
        """Take the oldest live waiter off the queue."""
        while self.queued:
            waiter = self._waiters.popleft()
            if not waiter.done:
                waiter.done = True
                self.queued -= 1
                return waiter
        return None

    def _pick(self) -> Replica | None:
        """Least loaded of two random choices among replicas with a free slot; a full scan
        when both choices are full (so a free slot is never missed)."""
        reps = self.replicas
        n = len(reps)
        if n == 1:
            r = reps[0]
            return r if r.in_rotation and r.in_flight < r.cap else None
        rand = self.rand
        a = reps[int(rand() * n)]
        b = reps[int(rand() * n)]
        a_ok = a.in_rotation and a.in_flight < a.cap
        b_ok = b.in_rotation and b.in_flight < b.cap
        if a_ok and b_ok:
            return a if a.in_flight <= b.in_flight else b
        if a_ok:
            return a
        if b_ok:
            return b
        best: Replica | None = None
        for r in reps:
            if not r.in_rotation or r.in_flight >= r.cap:
                continue
            if best is None or r.in_flight < best.in_flight:
                best = r
        return best
