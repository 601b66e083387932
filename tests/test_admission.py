"""Admission logic on a fake clock: slots, FIFO queue, expiry, cancellation, replica churn."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from router.admission import Rejection, Replica, ServicePool, Waiter


class Recorder:
    """Grant/expire callbacks that record what happened to each queued request."""

    def __init__(self) -> None:
        self.granted: list[tuple[str, str]] = []
        self.expired: list[str] = []

    def grant(self, tag: str) -> Callable[[Replica], None]:
        return lambda r: self.granted.append((tag, r.addr))

    def expire(self, tag: str) -> Callable[[], None]:
        return lambda: self.expired.append(tag)


def pool(cap: int = 1, wait_s: float = 0.5, queue: int = 100, replicas: int = 1) -> ServicePool:
    p = ServicePool(
        max_concurrent=cap, max_wait_s=wait_s, max_queue=queue, rand=random.Random(7).random
    )
    for i in range(replicas):
        p.add(f"r{i}", 0.0)
    return p


def admit(p: ServicePool, rec: Recorder, tag: str, now: float) -> Replica | Waiter | Rejection:
    return p.admit(now, rec.grant(tag), rec.expire(tag))


def test_slots_then_queue_then_fifo_handoff() -> None:
    p, rec = pool(cap=2, replicas=1), Recorder()
    a = admit(p, rec, "a", 0.0)
    b = admit(p, rec, "b", 0.0)
    assert isinstance(a, Replica) and isinstance(b, Replica)
    assert a.in_flight == 2 and p.busy == 2
    waiters = [admit(p, rec, t, 0.1) for t in ("c", "d", "e")]
    assert all(isinstance(w, Waiter) for w in waiters)
    assert p.queued == 3
    # Each freed slot goes straight to the oldest waiter, in arrival order.
    for expected in ("c", "d", "e"):
        handoff = p.release(a)
        assert handoff is not None
        waiter, replica = handoff
        waiter.grant(replica)
        assert rec.granted[-1] == (expected, "r0")
    assert p.queued == 0
    assert a.in_flight == 2  # the slot changed hands, never exceeded


def test_new_arrivals_queue_behind_waiters() -> None:
    p, rec = pool(cap=1, replicas=1), Recorder()
    r = admit(p, rec, "a", 0.0)
    assert isinstance(r, Replica)
    assert isinstance(admit(p, rec, "b", 0.0), Waiter)
    handoff = p.release(r)
    assert handoff is not None and handoff[0].deadline == pytest.approx(0.5)
    # The slot went to "b": a newcomer must not jump the queue.
    assert isinstance(admit(p, rec, "c", 0.2), Waiter)


def test_expiry_at_deadline_not_before() -> None:
    p, rec = pool(cap=1, wait_s=0.5), Recorder()
    admit(p, rec, "busy", 0.0)
    admit(p, rec, "w1", 1.0)
    admit(p, rec, "w2", 1.2)
    assert p.next_deadline() == pytest.approx(1.5)
    assert p.expire(1.499) == []
    expired = p.expire(1.5)
    assert len(expired) == 1
    expired[0].expire()
    assert rec.expired == ["w1"] and p.queued == 1
    assert p.next_deadline() == pytest.approx(1.7)
    for w in p.expire(10.0):
        w.expire()
    assert rec.expired == ["w1", "w2"] and p.queued == 0 and p.next_deadline() is None


def test_cancelled_waiter_leaves_queue_and_gets_nothing() -> None:
    p, rec = pool(cap=1), Recorder()
    r = admit(p, rec, "busy", 0.0)
    assert isinstance(r, Replica)
    w1 = admit(p, rec, "w1", 0.0)
    admit(p, rec, "w2", 0.0)
    assert isinstance(w1, Waiter)
    p.cancel(w1)
    p.cancel(w1)  # idempotent
    assert p.queued == 1
    handoff = p.release(r)
    assert handoff is not None
    handoff[0].grant(handoff[1])
    assert rec.granted == [("w2", "r0")]
    assert p.expire(100.0) == []  # nothing left to expire


def test_queue_full() -> None:
    p, rec = pool(cap=1, queue=2), Recorder()
    admit(p, rec, "busy", 0.0)
    admit(p, rec, "w1", 0.0)
    admit(p, rec, "w2", 0.0)
    assert admit(p, rec, "w3", 0.0) is Rejection.QUEUE_FULL


def test_no_replica_at_all_waits_for_one_to_join() -> None:
    p, rec = pool(replicas=0, wait_s=0.5), Recorder()
    assert isinstance(admit(p, rec, "x", 0.0), Waiter)
    assert isinstance(admit(p, rec, "y", 0.0), Waiter)
    _, handoffs = p.add("r0", 0.1)
    for waiter, replica in handoffs:
        waiter.grant(replica)
    assert rec.granted == [("x", "r0")]  # one slot: the oldest gets it, the other waits on
    assert [w.expire() for w in p.expire(0.5)] == [None] and rec.expired == ["y"]


def test_a_service_at_zero_waits_up_to_the_cold_start_bound_for_a_replica() -> None:
    """cold_start_s (a service that may be scaled to zero): with no replica in rotation a
    request waits for the first one up to the cold-start bound from its arrival; none came:
    it expires then (not max_request_wait_time later)."""
    p, rec = pool(replicas=0, wait_s=0.5), Recorder()
    p.cold_start_s = 30.0
    first = admit(p, rec, "first", 0.0)
    later = admit(p, rec, "later", 2.0)
    assert isinstance(first, Waiter) and isinstance(later, Waiter)
    assert (first.deadline, later.deadline) == (30.0, 32.0)
    assert p.next_deadline() == 30.0
    assert p.expire(29.99) == []
    assert [w.expire() for w in p.expire(30.0)] == [None] and rec.expired == ["first"]
    assert p.next_deadline() == 32.0


def test_max_wait_is_counted_from_when_the_first_replica_is_ready() -> None:
    """A replica comes into rotation at 10 s: the requests that waited for it each get
    max_request_wait_time from then (one slot: the oldest is served, the other waits on);
    a request that arrived just before its cold-start bound is not refused at that bound."""
    p, rec = pool(replicas=0, wait_s=0.5), Recorder()
    p.cold_start_s = 10.05
    for tag, at in (("a", 0.0), ("b", 1.0), ("c", 9.9)):
        assert isinstance(admit(p, rec, tag, at), Waiter)
    _, handoffs = p.add("r0", 10.0)
    for waiter, replica in handoffs:
        waiter.grant(replica)
    assert rec.granted == [("a", "r0")]
    assert [w.deadline for w in p.waiters()] == [10.5, 10.5]
    assert p.next_deadline() == 10.5
    assert p.expire(10.49) == []  # c is past its cold-start bound (9.9 + 10.05), still waits
    for w in p.expire(10.5):
        w.expire()
    assert rec.expired == ["b", "c"]
    # Once a replica serves, a request's wait is max_request_wait_time from its arrival.
    warm = admit(p, rec, "warm", 11.0)
    assert isinstance(warm, Waiter) and warm.deadline == 11.5


def test_the_first_replica_back_restarts_only_the_waits_that_began_at_zero() -> None:
    """The only replica goes out of rotation with a request waiting (deadline: arrival + max
    wait); requests arriving then wait for a replica up to the cold-start bound, never
    expiring before the one ahead of them; when it is back, only they get a new deadline."""
    p, rec = pool(replicas=1, wait_s=1.0), Recorder()
    p.cold_start_s = 0.2  # shorter than the max wait: the clamp to the one ahead matters
    (r0,) = p.replicas
    assert isinstance(admit(p, rec, "busy", 0.0), Replica)
    before = admit(p, rec, "before", 0.0)
    p.mark_down(r0)
    at_zero = admit(p, rec, "at_zero", 0.1)
    assert isinstance(before, Waiter) and isinstance(at_zero, Waiter)
    assert (before.deadline, at_zero.deadline) == (1.0, 1.0)  # not 0.3: behind "before"
    assert p.mark_up(r0, 0.5) == []  # no free slot: "busy" still holds it
    assert (before.deadline, at_zero.deadline) == (1.0, 1.5)
    deadlines = [w.deadline for w in p.waiters()]
    assert deadlines == sorted(deadlines)


def test_a_first_replica_in_a_pool_not_scaled_to_zero_changes_no_deadline() -> None:
    """Without cold_start_s (min replicas above zero), a request with no replica in rotation
    waits max_request_wait_time from its arrival, whenever a replica comes."""
    p, rec = pool(replicas=0, wait_s=0.5), Recorder()
    assert isinstance(admit(p, rec, "x", 0.0), Waiter)
    assert isinstance(admit(p, rec, "y", 0.0), Waiter)
    p.add("r0", 0.4)
    assert [w.deadline for w in p.waiters()] == [0.5]


def test_down_replica_gets_nothing_and_coming_back_serves_waiters() -> None:
    p, rec = pool(cap=1, replicas=2), Recorder()
    r0, r1 = p.replicas
    p.mark_down(r0)
    first = admit(p, rec, "a", 0.0)
    assert first is r1
    assert isinstance(admit(p, rec, "b", 0.0), Waiter)
    handoffs = p.mark_up(r0, 0.0)
    assert [(w.grant(r) or (w, r))[1] for w, r in handoffs] == [r0]
    assert rec.granted == [("b", "r0")]


def test_all_down_waits_until_one_comes_back() -> None:
    p, rec = pool(replicas=2), Recorder()
    for r in list(p.replicas):
        p.mark_down(r)
    assert isinstance(admit(p, rec, "a", 0.0), Waiter)
    assert p.expire(0.4) == []
    for waiter, replica in p.mark_up(p.replicas[1], 0.4):
        waiter.grant(replica)
    assert rec.granted == [("a", "r1")]


def test_removed_replica_finishes_in_flight_without_new_work() -> None:
    p, rec = pool(cap=1, replicas=2), Recorder()
    a = admit(p, rec, "a", 0.0)
    assert isinstance(a, Replica)
    p.remove(a)
    assert a not in p.replicas and a.removed
    other = admit(p, rec, "b", 0.0)
    assert other is not a
    assert p.release(a) is None  # its slot is not handed on
    assert p.busy == 1


def test_raising_the_cap_grants_waiters_at_once() -> None:
    p, rec = pool(cap=1, replicas=1), Recorder()
    admit(p, rec, "busy", 0.0)
    admit(p, rec, "w", 0.0)
    handoffs = p.set_limits(max_concurrent=2, max_wait_s=0.5, max_queue=10)
    assert len(handoffs) == 1 and p.queued == 0


def test_adding_a_replica_grants_waiters() -> None:
    p, rec = pool(cap=1, replicas=1), Recorder()
    admit(p, rec, "busy", 0.0)
    admit(p, rec, "w", 0.0)
    _, handoffs = p.add("r9", 0.0)
    assert [r.addr for _, r in handoffs] == ["r9"]


def test_pick_prefers_the_least_loaded() -> None:
    """Least loaded of two choices over ten replicas: their loads stay within a few of each
    other at every step (taking the first free replica, or any at random, does not)."""
    p, rec = pool(cap=100, replicas=10), Recorder()
    for i in range(500):
        assert isinstance(admit(p, rec, str(i), 0.0), Replica)
        loads = [r.in_flight for r in p.replicas]
        assert max(loads) - min(loads) <= 8, (i, loads)  # uniform random: 16 here


@pytest.mark.parametrize("seed", range(5), ids=lambda s: f"seed{s}")
def test_random_churn_never_exceeds_cap(seed: int) -> None:
    """Random admits, releases, cancels, expiries and replica churn: the cap always holds and
    the counters always agree with the replicas."""
    rnd = random.Random(seed)
    cap = rnd.randint(1, 3)
    p = ServicePool(max_concurrent=cap, max_wait_s=1.0, max_queue=50, rand=rnd.random,
                    cold_start_s=rnd.choice([0.0, 0.3, 5.0]))
    for i in range(3):
        p.add(f"r{i}", 0.0)
    held: list[Replica] = []
    waiting: list[Waiter] = []
    now = 0.0

    def grant(r: Replica) -> None:
        held.append(r)

    for step in range(3000):
        now += rnd.random() * 0.05
        op = rnd.random()
        if op < 0.4:
            res = p.admit(now, grant, lambda: None)
            if isinstance(res, Replica):
                held.append(res)
            elif isinstance(res, Waiter):
                waiting.append(res)
        elif op < 0.75 and held:
            r = held.pop(rnd.randrange(len(held)))
            handoff = p.release(r)
            if handoff is not None:
                handoff[0].grant(handoff[1])
        elif op < 0.8 and waiting:
            p.cancel(waiting.pop(rnd.randrange(len(waiting))))
        elif op < 0.85:
            for w in p.expire(now):
                w.expire()
        elif op < 0.9 and p.replicas:
            r = rnd.choice(p.replicas)
            if r.in_rotation:
                p.mark_down(r)
            else:
                for w, rr in p.mark_up(r, now):
                    w.grant(rr)
        elif op < 0.93 and len(p.replicas) > 1:
            p.remove(rnd.choice(p.replicas))
        elif op < 0.96:
            _, handoffs = p.add(f"n{step}", now)
            for w, rr in handoffs:
                w.grant(rr)
        waiting = [w for w in waiting if not w.done]
        everyone = {id(r): r for r in held}
        for r in everyone.values():
            assert r.in_flight <= cap
        assert p.busy == len(held)
        assert p.queued == len(list(p.waiters()))
        free = sum(cap - r.in_flight for r in p.replicas if r.in_rotation)
        assert free >= 0
        if p.queued:
            assert free == 0, "a waiter waits while a slot is free"
        # The head's deadline is the earliest (the expiry timer is armed for it alone).
        deadlines = [w.deadline for w in p.waiters()]
        assert deadlines == sorted(deadlines)
