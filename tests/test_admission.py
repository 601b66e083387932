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
        p.add(f"r{i}")
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
    _, handoffs = p.add("r0")
    for waiter, replica in handoffs:
        waiter.grant(replica)
    assert rec.granted == [("x", "r0")]  # one slot: the oldest gets it, the other waits on
    assert [w.expire() for w in p.expire(0.5)] == [None] and rec.expired == ["y"]


def test_a_service_at_zero_waits_a_cold_start_longer() -> None:
    """cold_start_s (a service that may be scaled to zero): with no replica in rotation a
    request may wait for the first one to start, then max_request_wait_time; once a replica
    serves, the wait is max_request_wait_time again."""
    p, rec = pool(replicas=0, wait_s=0.5), Recorder()
    p.cold_start_s = 30.0
    cold = admit(p, rec, "cold", 0.0)
    assert isinstance(cold, Waiter) and cold.deadline == 30.5
    assert p.expire(30.4) == []
    _, handoffs = p.add("r0")
    for waiter, replica in handoffs:
        waiter.grant(replica)
    assert rec.granted == [("cold", "r0")]
    warm = admit(p, rec, "warm", 31.0)
    assert isinstance(warm, Waiter) and warm.deadline == 31.5


def test_down_replica_gets_nothing_and_coming_back_serves_waiters() -> None:
    p, rec = pool(cap=1, replicas=2), Recorder()
    r0, r1 = p.replicas
    p.mark_down(r0)
    first = admit(p, rec, "a", 0.0)
    assert first is r1
    assert isinstance(admit(p, rec, "b", 0.0), Waiter)
    handoffs = p.mark_up(r0)
    assert [(w.grant(r) or (w, r))[1] for w, r in handoffs] == [r0]
    assert rec.granted == [("b", "r0")]


def test_all_down_waits_until_one_comes_back() -> None:
    p, rec = pool(replicas=2), Recorder()
    for r in list(p.replicas):
        p.mark_down(r)
    assert isinstance(admit(p, rec, "a", 0.0), Waiter)
    assert p.expire(0.4) == []
    for waiter, replica in p.mark_up(p.replicas[1]):
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
    _, handoffs = p.add("r9")
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
    p = ServicePool(max_concurrent=cap, max_wait_s=1.0, max_queue=50, rand=rnd.random)
    for i in range(3):
        p.add(f"r{i}")
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
                for w, rr in p.mark_up(r):
                    w.grant(rr)
        elif op < 0.93 and len(p.replicas) > 1:
            p.remove(rnd.choice(p.replicas))
        elif op < 0.96:
            _, handoffs = p.add(f"n{step}")
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
