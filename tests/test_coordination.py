"""The slot broker as pure state: shares follow demand, the cap holds while slots move, and a
departed member's slots come back."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from router.coordination import SetSlots, SlotBroker, shares


def test_shares_largest_remainder_and_rotation() -> None:
    assert shares(4, {"a": 1, "b": 1}) == {"a": 2, "b": 2}
    assert shares(3, {"a": 2, "b": 1}) == {"a": 2, "b": 1}
    assert shares(0, {"a": 5}) == {"a": 0}
    assert sum(shares(7, {"a": 1, "b": 1, "c": 1}).values()) == 7
    odd = [shares(1, {"a": 0, "b": 0}, turn=t) for t in range(2)]
    assert odd == [{"a": 1, "b": 0}, {"a": 0, "b": 1}]  # spare slots take turns


class Member:
    """A member as the I/O layer would run it: usable slots per replica, requests in flight,
    and a release sent once in-flight fits under a lowered count."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.usable: dict[str, int] = defaultdict(int)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.queued = 0
        self.pending_release: dict[str, int] = {}

    def apply(self, msg: SetSlots) -> None:
        self.usable[msg.replica] = msg.slots
        if self.in_flight[msg.replica] <= msg.slots:
            self.pending_release[msg.replica] = msg.slots
        else:
            self.pending_release.pop(msg.replica, None)


def deliver(broker: SlotBroker, members: dict[str, Member], msgs: list[SetSlots]) -> None:
    while msgs:
        msg = msgs.pop(0)
        m = members.get(msg.member)
        if m is None:
            continue
        m.apply(msg)
        for addr, slots in list(m.pending_release.items()):
            if m.in_flight[addr] <= slots:
                del m.pending_release[addr]
                msgs += broker.released(m.name, "svc", addr, slots)


def test_two_members_share_and_slots_follow_demand() -> None:
    broker = SlotBroker()
    members = {n: Member(n) for n in ("a", "b")}
    reps = ["r1", "r2"]
    deliver(broker, members, broker.report("a", "svc", 0, dict.fromkeys(reps, 2)))
    deliver(broker, members, broker.report("b", "svc", 0, dict.fromkeys(reps, 2)))
    assert sum(members["a"].usable.values()) + sum(members["b"].usable.values()) == 4
    assert sum(members["a"].usable.values()) == 2  # idle: spare slots spread evenly
    # All demand at a: b's slots move to a (b is idle, so it releases at once).
    deliver(broker, members, broker.report("a", "svc", 10, dict.fromkeys(reps, 2)))
    deliver(broker, members, broker.report("b", "svc", 0, dict.fromkeys(reps, 2)))
    assert sum(members["a"].usable.values()) == 4
    assert sum(members["b"].usable.values()) == 0


def test_a_busy_slot_moves_only_after_release() -> None:
    broker = SlotBroker()
    members = {n: Member(n) for n in ("a", "b")}
    deliver(broker, members, broker.report("a", "svc", 1, {"r1": 1}))
    assert members["a"].usable["r1"] == 1
    members["a"].in_flight["r1"] = 1
    deliver(broker, members, broker.report("b", "svc", 0, {"r1": 1}))
    deliver(broker, members, broker.report("a", "svc", 1, {"r1": 1}))
    deliver(broker, members, broker.report("b", "svc", 5, {"r1": 1}))
    # b wants it; a is told to stop using it but is still busy: b gets nothing yet.
    assert members["a"].usable["r1"] == 0 and members["b"].usable["r1"] == 0
    assert broker.held("svc")["r1"] == {"a": 1}
    members["a"].in_flight["r1"] = 0
    deliver(broker, members, broker.released("a", "svc", "r1", 0))
    assert members["b"].usable["r1"] == 1


def test_leaving_member_returns_its_slots() -> None:
    broker = SlotBroker()
    members = {n: Member(n) for n in ("a", "b")}
    deliver(broker, members, broker.report("a", "svc", 4, {"r1": 2}))
    deliver(broker, members, broker.report("b", "svc", 4, {"r1": 2}))
    assert members["a"].usable["r1"] + members["b"].usable["r1"] == 2
    del members["a"]
    deliver(broker, members, broker.leave("a"))
    assert members["b"].usable["r1"] == 2


def test_rejoin_with_holdings_is_trimmed_to_the_cap() -> None:
    broker = SlotBroker()
    members = {n: Member(n) for n in ("a", "b")}
    deliver(broker, members, broker.report("b", "svc", 4, {"r1": 2}))
    assert members["b"].usable["r1"] == 2
    # a comes back from a broker restart believing it holds 2 (with 2 in flight).
    members["a"].usable["r1"] = 2
    members["a"].in_flight["r1"] = 2
    deliver(broker, members, broker.report("a", "svc", 2, {"r1": 2}, holding={"r1": 2}))
    assert members["a"].usable["r1"] == 0  # told to stop: nothing was free for it
    assert broker.held("svc")["r1"]["a"] == 2  # still counted until it releases


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed{s}")
def test_random_traffic_never_exceeds_any_cap(seed: int) -> None:
    rnd = random.Random(seed)
    broker = SlotBroker()
    caps = {"r1": 2, "r2": 1, "r3": 3}
    members = {n: Member(n) for n in ("a", "b", "c")}
    for m in members.values():
        deliver(broker, members, broker.report(m.name, "svc", 0, caps))
    for _ in range(4000):
        m = members[rnd.choice(sorted(members))]
        op = rnd.random()
        if op < 0.4:
            m.queued += 1
        if op < 0.6 and m.queued:
            free = [a for a in caps if m.in_flight[a] < min(m.usable[a], caps[a])]
            if free:
                m.queued -= 1
                m.in_flight[rnd.choice(free)] += 1
        elif op < 0.85:
            busy = [a for a in caps if m.in_flight[a]]
            if busy:
                a = rnd.choice(busy)
                m.in_flight[a] -= 1
                slots = m.pending_release.get(a)
                if slots is not None and m.in_flight[a] <= slots:
                    del m.pending_release[a]
                    deliver(broker, members, broker.released(m.name, "svc", a, slots))
        else:
            demand = sum(m.in_flight.values()) + m.queued
            deliver(broker, members, broker.report(m.name, "svc", demand, caps))
        for addr, cap in caps.items():
            assert sum(mm.in_flight[addr] for mm in members.values()) <= cap, addr
            held = broker.held("svc").get(addr, {})
            assert sum(held.values()) <= cap
            for mm in members.values():
                assert mm.in_flight[addr] <= max(mm.usable[addr], held.get(mm.name, 0))


def _held(broker: SlotBroker, service: str, replica: str) -> int:
    return sum(broker.held(service).get(replica, {}).values())


def test_a_broker_that_replaces_another_grants_nothing_until_the_old_members_reported() -> None:
    """A new leader's broker: members a and b may hold the old broker's slots. Until both have
    said what they hold, a newcomer gets nothing (the sum could exceed the cap)."""
    broker = SlotBroker(expected={"a", "b"})
    assert broker.cold
    assert broker.report("c", "s", 5, {"r": 4}) == []  # would be 4 slots on a warm broker
    assert broker.report("a", "s", 1, {"r": 4}, holding={"r": 1}) == []
    assert _held(broker, "s", "r") == 1
    out = broker.report("b", "s", 1, {"r": 4}, holding={"r": 1})  # the last one: warm now
    assert not broker.cold
    granted = {m.member: m.slots for m in out}
    assert granted.get("c", 0) > 0
    assert _held(broker, "s", "r") <= 4


def test_warm_ends_the_wait_for_members_that_never_came_back() -> None:
    broker = SlotBroker(expected={"gone"})
    assert broker.report("c", "s", 2, {"r": 3}) == []
    out = broker.warm()
    assert [(m.member, m.slots) for m in out] == [("c", 3)]
    assert not broker.cold


def test_a_cold_broker_still_takes_back_what_does_not_fit() -> None:
    """Holdings adopted from members that (wrongly) hold more than the cap are cut back."""
    broker = SlotBroker(expected={"a", "b"})
    broker.report("a", "s", 3, {"r": 3}, holding={"r": 3})
    out = broker.report("b", "s", 0, {"r": 3}, holding={"r": 2})
    assert ("b", 0) in [(m.member, m.slots) for m in out]  # b must come down to what fits


def test_a_member_known_gone_ends_the_wait_for_it() -> None:
    """A member of the previous broker whose process is known stopped holds nothing: once the
    last such one is gone (the others reported), the broker lends."""
    broker = SlotBroker(expected={"a", "dead"})
    assert broker.waiting_for == {"a", "dead"}
    assert broker.report("c", "s", 2, {"r": 4}) == []
    assert broker.report("a", "s", 1, {"r": 4}, holding={"r": 1}) == []
    assert broker.gone("c") == []  # not waited for: nothing changes
    assert broker.cold
    out = broker.gone("dead")
    assert not broker.cold and broker.waiting_for == frozenset()
    assert sorted((m.member, m.slots) for m in out) == [("a", 2), ("c", 2)]
    assert _held(broker, "s", "r") == 4
    assert broker.gone("dead") == []  # once is enough


def test_gone_before_the_others_reported_keeps_the_broker_cold() -> None:
    broker = SlotBroker(expected={"a", "dead"})
    broker.report("c", "s", 2, {"r": 4})
    assert broker.gone("dead") == []
    assert broker.cold  # a may still hold the old broker's slots
    out = broker.report("a", "s", 1, {"r": 4}, holding={"r": 3})
    assert not broker.cold
    assert _held(broker, "s", "r") <= 4
    assert ("c", 1) in [(m.member, m.slots) for m in out]  # what a does not hold


def test_a_member_restarted_in_place_ends_the_wait_by_reporting_nothing_held() -> None:
    """A container restarted in place keeps its member id (the pod's name) and holds nothing:
    its first report ends the wait for it."""
    broker = SlotBroker(expected={"a", "b"})
    broker.report("b", "s", 1, {"r": 4}, holding={"r": 2})
    assert broker.cold
    out = broker.report("a", "s", 3, {"r": 4}, holding={})
    assert not broker.cold
    assert ("a", 2) in [(m.member, m.slots) for m in out]
    assert _held(broker, "s", "r") == 4


def test_a_broker_that_lends_to_recorded_members_only() -> None:
    """A member not yet recorded for the next broker (the Lease) gets nothing new; once
    recorded, its share. What it held already stays counted."""
    broker = SlotBroker(recorded_only=True)
    assert broker.report("a", "s", 2, {"r": 4}) == []
    assert broker.report("b", "s", 2, {"r": 4}, holding={"r": 1}) == []
    assert _held(broker, "s", "r") == 1  # b's, adopted
    out = broker.lend_to(["a"])
    assert [(m.member, m.slots) for m in out] == [("a", 3)]  # all that is free; b keeps its 1
    out = broker.lend_to(["a", "b"])
    assert ("a", 2) in [(m.member, m.slots) for m in out]  # taken back toward b's share
    assert _held(broker, "s", "r") <= 4
    assert SlotBroker().may_lend("anyone")  # without a record: everyone
