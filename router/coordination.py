"""Coordinated admission across router instances: a slot broker, as pure state.

`replica_max_concurrent_requests` must hold per replica however many router instances (worker
processes or pods) send to it. The broker owns every replica's slots and lends them out: each
instance admits locally, with no message per request, against the slots it holds, and reports
its demand (busy + queued) every few tens of milliseconds. The broker moves slots toward demand:

* A slot is taken back in two steps: the broker lowers the holder's count (the holder stops
  starting requests on it at once) and counts the slot as still held until the holder says its
  in-flight requests fit under the new count. Only then can another instance get it. So the sum
  of what instances may use on a replica never exceeds its cap, even while slots move.
* Demand-proportional shares: the slots needed to serve current demand go to instances in
  proportion to their demand; spare slots are spread evenly, so a lightly loaded instance rarely
  waits for a grant.
* An instance that disappears keeps its slots, as far as the broker knows, until the I/O layer
  calls `leave` (after a grace period covering requests the replica may still be running).
* A broker that replaces another (a new leader's) starts *cold*: the members of the one before
  (`expected`) may still hold its slots, unknown here. Until each has reported what it holds
  (adopted, never more than fits), is known to be `gone` (its process has stopped: the I/O
  layer knows, e.g. its pod no longer exists), or the I/O layer calls `warm` (after the time
  within which a member that lost its broker gives its slots up), nothing is granted: members
  keep admitting with the slots they hold, and the sum stays under every cap.
* A broker whose successor learns its members from a record (the Lease) lends only to members
  recorded there (`lend_to`), so that every member it lent to is one the next broker waits for.
  Until recorded, a member may report and keep what it holds; it gets nothing new.

Everything here is a function of the calls made; no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SetSlots:
    """Tell `member` it may now use `slots` slots of `replica` of `service`."""

    member: str
    service: str
    replica: str
    slots: int


@dataclass
class _Replica:
    cap: int
    held: dict[str, int] = field(default_factory=dict)  # member -> slots counted as its own
    lowering: dict[str, int] = field(default_factory=dict)  # member -> count it was told

    def free(self) -> int:
        return self.cap - sum(self.held.values())


@dataclass
class _Service:
    replicas: dict[str, _Replica] = field(default_factory=dict)
    known_by: dict[str, set[str]] = field(default_factory=dict)  # replica -> members
    demand: dict[str, int] = field(default_factory=dict)  # member -> busy + queued


def shares(total: int, weights: Mapping[str, int], turn: int = 0) -> dict[str, int]:
    """Split `total` in proportion to `weights` (largest remainder); ties broken by `turn`."""
    names = sorted(weights)
    out = dict.fromkeys(names, 0)
    wsum = sum(weights.values())
    if total <= 0 or not names:
        return out
    if wsum <= 0:
        for i in range(total):
            out[names[(i + turn) % len(names)]] += 1
        return out
    rema: list[tuple[float, int, str]] = []
    given = 0
    for i, n in enumerate(names):
        exact = total * weights[n] / wsum
        out[n] = int(exact)
        given += out[n]
        rema.append((exact - out[n], -((i - turn) % len(names)), n))
    for _, _, n in sorted(rema, reverse=True)[: total - given]:
        out[n] += 1
    return out


class SlotBroker:
    def __init__(self, expected: Iterable[str] = (), *, recorded_only: bool = False) -> None:
        self._services: dict[str, _Service] = {}
        self._waiting_for: set[str] = set(expected)  # cold until these have reported
        # None: lend to every member; else only to these (`lend_to`).
        self._lend_to: set[str] | None = set() if recorded_only else None

    def may_lend(self, member: str) -> bool:
        return self._lend_to is None or member in self._lend_to

    def lend_to(self, members: Iterable[str]) -> list[SetSlots]:
        """The members recorded where the next broker will read them: only these get slots
        from now on (with ``recorded_only``). Returns the changes to send."""
        self._lend_to = set(members)
        return self._rebalance_all()

    @property
    def cold(self) -> bool:
        return bool(self._waiting_for)

    @property
    def waiting_for(self) -> frozenset[str]:
        """The previous broker's members that have not reported yet (empty: warm)."""
        return frozenset(self._waiting_for)

    def gone(self, member: str) -> list[SetSlots]:
        """`member` of the previous broker no longer runs (and its requests with it): it holds
        nothing, so the wait for it ends. Returns the changes to send."""
        if member not in self._waiting_for:
            return []
        self._waiting_for.discard(member)
        return [] if self._waiting_for else self._rebalance_all()

    def warm(self) -> list[SetSlots]:
        """The wait is over: a member that has not reported by now holds nothing."""
        self._waiting_for.clear()
        return self._rebalance_all()

    def _rebalance_all(self) -> list[SetSlots]:
        out: list[SetSlots] = []
        for name, svc in self._services.items():
            out += self._rebalance(name, svc)
        return out

    # ---- what members tell the broker ------------------------------------------------------

    def report(
        self,
        member: str,
        service: str,
        demand: int,
        replicas: Mapping[str, int],
        holding: Mapping[str, int] | None = None,
    ) -> list[SetSlots]:
        """A member's view of a service: the replicas it can reach with their caps, its
        demand, and (on (re)joining) the slots it holds now. Returns the changes to send."""
        svc = self._services.setdefault(service, _Service())
        svc.demand[member] = demand
        mine = set(replicas)
        out: list[SetSlots] = []
        for addr in list(svc.known_by):
            members = svc.known_by[addr]
            if addr not in mine and member in members:
                members.discard(member)
                out += self._drop_member_replica(svc, service, member, addr)
        for addr, cap in replicas.items():
            svc.known_by.setdefault(addr, set()).add(member)
            rep = svc.replicas.setdefault(addr, _Replica(cap))
            rep.cap = cap
        if holding:
            out += self._adopt(svc, service, member, holding)
        self._forget_unknown(svc)
        if member in self._waiting_for:
            self._waiting_for.discard(member)
            if not self._waiting_for:
                return out + self._rebalance_all()
        return out + self._rebalance(service, svc)

    def released(self, member: str, service: str, replica: str, slots: int) -> list[SetSlots]:
        """`member` now has at most `slots` requests in flight on `replica`."""
        svc = self._services.get(service)
        if svc is None or replica not in svc.replicas:
            return []
        rep = svc.replicas[replica]
        told = rep.lowering.get(member)
        if told is not None and slots <= told:
            del rep.lowering[member]
            self._set_held(rep, member, slots)
        return self._rebalance(service, svc)

    def leave(self, member: str) -> list[SetSlots]:
        """`member` is gone (and its requests with it): its slots return to the pool."""
        out: list[SetSlots] = []
        for name, svc in self._services.items():
            svc.demand.pop(member, None)
            for rep in svc.replicas.values():
                rep.held.pop(member, None)
                rep.lowering.pop(member, None)
            for members in svc.known_by.values():
                members.discard(member)
            self._forget_unknown(svc)
            out += self._rebalance(name, svc)
        return out

    # ---- reading ----------------------------------------------------------------------------

    def held(self, service: str) -> dict[str, dict[str, int]]:
        """replica -> member -> slots counted as held (for tests and /v1/stats)."""
        svc = self._services.get(service)
        if svc is None:
            return {}
        return {addr: dict(rep.held) for addr, rep in svc.replicas.items()}

    # ---- internals --------------------------------------------------------------------------

    @staticmethod
    def _set_held(rep: _Replica, member: str, slots: int) -> None:
        if slots:
            rep.held[member] = slots
        else:
            rep.held.pop(member, None)

    def _adopt(self, svc: _Service, service: str, member: str,
               holding: Mapping[str, int]) -> list[SetSlots]:
        """A member (re)joins holding slots (the broker restarted, or it reconnected): keep
        what fits under each cap, take the rest back."""
        out: list[SetSlots] = []
        for addr, slots in holding.items():
            rep = svc.replicas.get(addr)
            if rep is None or slots <= 0:
                continue
            keep = min(slots, rep.held.get(member, 0) + rep.free())
            self._set_held(rep, member, slots)  # counted until it releases the excess
            if keep < slots:
                rep.lowering[member] = keep
                out.append(SetSlots(member, service, addr, keep))
        return out

    def _drop_member_replica(self, svc: _Service, service: str, member: str,
                             addr: str) -> list[SetSlots]:
        rep = svc.replicas.get(addr)
        if rep is None or member not in rep.held:
            return []
        # The member no longer sends to it: its requests there are done or failed.
        rep.held.pop(member, None)
        rep.lowering.pop(member, None)
        return []

    @staticmethod
    def _forget_unknown(svc: _Service) -> None:
        for addr in [a for a, m in svc.known_by.items() if not m]:
            del svc.known_by[addr]
            svc.replicas.pop(addr, None)

    def _rebalance(self, service: str, svc: _Service) -> list[SetSlots]:
        # A member not lent to (not recorded yet) keeps what it holds, outside the shares.
        members = sorted(m for m in svc.demand if self.may_lend(m))
        if not members or not svc.replicas:
            return []
        total = sum(r.cap for r in svc.replicas.values())
        demand = {m: max(0, svc.demand.get(m, 0)) for m in members}
        # Slots for the demand there is, split by demand; the rest spread evenly. Each member
        # should hold between `lo` and `hi`; inside that band nothing moves (no churn).
        target = shares(min(total, sum(demand.values())), demand)
        spare, odd = divmod(total - sum(target.values()), len(members))
        lo = {m: target[m] + spare for m in members}
        hi = {m: lo[m] + (1 if odd else 0) for m in members}
        counted = {m: self._counted(svc, m) for m in members}
        out: list[SetSlots] = []
        # 1. Take back from members above `hi`, only as much as members below `lo` lack
        # beyond the free slots.
        short = sum(max(0, lo[m] - counted[m]) for m in members)
        take = max(0, short - sum(max(0, r.free()) for r in svc.replicas.values()))
        for m in sorted(members, key=lambda m: hi[m] - counted[m]):
            excess = min(counted[m] - hi[m], take)
            if excess <= 0:
                continue
            take -= excess
            for addr, rep in sorted(svc.replicas.items(),
                                    key=lambda kv: -self._usable(kv[1], m)):
                if excess <= 0:
                    break
                usable = self._usable(rep, m)
                cut = min(usable, excess)
                if cut:
                    rep.lowering[m] = usable - cut
                    excess -= cut
                    out.append(SetSlots(m, service, addr, usable - cut))
        # 2. Free slots: first up to `lo`, then up to `hi`. Cold: none (see the module doc).
        for bound in (() if self.cold else (lo, hi)):
            for m in members:
                need = bound[m] - self._counted(svc, m)
                for addr, rep in sorted(svc.replicas.items(), key=lambda kv: -kv[1].free()):
                    if need <= 0:
                        break
                    if m not in svc.known_by.get(addr, ()) or m in rep.lowering:
                        continue
                    give = min(rep.free(), need)
                    if give > 0:
                        self._set_held(rep, m, rep.held.get(m, 0) + give)
                        need -= give
                        out.append(SetSlots(m, service, addr, rep.held[m]))
        return out

    @staticmethod
    def _usable(rep: _Replica, member: str) -> int:
        """What `member` was last told it may use on `rep`."""
        return rep.lowering.get(member, rep.held.get(member, 0))

    def _counted(self, svc: _Service, member: str) -> int:
        """Slots the member will hold once pending releases land (its share after cuts)."""
        return sum(self._usable(rep, member) for rep in svc.replicas.values())
