"""The slot broker on the Lease holder, cold after a failover: it stops waiting for a member
of the previous broker whose pod no longer exists (absent from the router pods' EndpointSlices
for the grace time), and only trusts slices that list this pod itself. On a fake clock; and a
member against a broker of an earlier version, over a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import cast

import orjson
import pytest

from deploy.kube.broker import MEMBERS_ANNOTATION, LeaseBroker, absences
from deploy.kube.leader import LeaderElector
from mlfe.clock import FakeClock
from mlfe.supervise import Supervisor
from router.slots import SlotMember

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


def test_a_member_is_absent_from_when_a_list_that_names_this_pod_leaves_it_out() -> None:
    waiting = {"a", "dead"}
    since = absences(waiting, {"me", "a"}, "me", {}, now=10.0)
    assert since == {"dead": 10.0}
    # Still absent later: absent since the first time it was seen so.
    assert absences(waiting, {"me", "a"}, "me", since, now=12.5) == {"dead": 10.0}
    # A failed list knows nothing new: what was known stays known.
    assert absences(waiting, None, "me", since, now=13.0) == {"dead": 10.0}
    # Listed again (a new pod of the same name): no longer absent.
    assert absences(waiting, {"me", "a", "dead"}, "me", since, now=14.0) == {}
    # No longer waited for (it reported): forgotten.
    assert absences({"a"}, None, "me", since, now=14.0) == {}


def test_slices_that_do_not_list_this_pod_are_not_trusted() -> None:
    """No Service of that name, another Service, or member ids that are not pod names: the
    slices do not list this pod, so no one is known absent (the broker waits as before)."""
    assert absences({"dead"}, set(), "me", {}, now=1.0) == {}
    assert absences({"dead"}, {"someone-else"}, "me", {"dead": 0.0}, now=5.0) == {}


class _Elector:
    """What LeaseBroker reads and writes of a LeaderElector that has just taken the Lease."""

    def __init__(self, annotations: Mapping[str, str]) -> None:
        self.identity = "me_0123"
        self.holder = self.identity
        self.annotations = dict(annotations)
        self.advertised: dict[str, str] = {}


async def _cold_broker(pods: set[str]) -> tuple[LeaseBroker, FakeClock, Supervisor]:
    clock = FakeClock()
    supervisor = Supervisor(clock=clock)
    member = SlotMember(dict, "", "me", supervisor)

    async def listed() -> set[str]:
        return set(pods)

    elector = _Elector({MEMBERS_ANNOTATION: "a,dead"})
    broker = LeaseBroker(cast(LeaderElector, elector), member, listen="127.0.0.1:0",
                         grace_s=2.0, hold_s=30.0, supervisor=supervisor, clock=clock,
                         listed=listed)
    await broker.lead()
    assert broker.server is not None and broker.server.broker.waiting_for == {"a", "dead"}
    broker.server.broker.report("a", "s", 0, {"r": 2}, holding={})  # a came back
    return broker, clock, supervisor


async def test_a_member_whose_pod_is_gone_is_not_waited_for_past_the_grace_time() -> None:
    broker, clock, supervisor = await _cold_broker({"me", "a"})
    try:
        assert broker.server is not None
        await clock.advance_and_settle(1.5)
        assert broker.server.broker.cold  # absent for less than the grace time
        await clock.advance_and_settle(0.5)
        assert not broker.server.broker.cold
        assert supervisor.failures == []  # the cold start's task ends as it may
    finally:
        await broker.close()
        await supervisor.stop()


@pytest.mark.parametrize("pods", [{"me", "a", "dead"}, {"a"}],
                         ids=["still-listed", "slices-without-this-pod"])
async def test_otherwise_the_wait_lasts_the_hold_time(pods: set[str]) -> None:
    broker, clock, supervisor = await _cold_broker(pods)
    try:
        assert broker.server is not None
        await clock.advance_and_settle(31.5)
        assert broker.server.broker.cold
        await clock.advance_and_settle(0.5)
        assert not broker.server.broker.cold  # by now a live member gave its slots up
        assert supervisor.failures == []
    finally:
        await broker.close()
        await supervisor.stop()


async def test_the_broker_records_every_holder_and_lends_only_to_those_recorded() -> None:
    broker, clock, supervisor = await _cold_broker({"me", "a", "dead"})
    elector = cast(_Elector, broker._elector)
    try:
        assert broker.server is not None
        await clock.advance_and_settle(0)
        # Still waited for, though not connected: the next holder must wait for it too. (a
        # reported without a connection here: not a holder.)
        assert elector.advertised[MEMBERS_ANNOTATION] == "dead"
        # The Lease as last written (the takeover) lists the previous members: lent to.
        assert broker.server.broker.may_lend("a")
        assert not broker.server.broker.may_lend("new")
        elector.annotations[MEMBERS_ANNOTATION] = "a,dead,new"  # a renewal wrote it
        await clock.advance_and_settle(0.5)
        assert broker.server.broker.may_lend("new")
    finally:
        await broker.close()
        await supervisor.stop()


async def test_a_grant_from_a_broker_of_an_earlier_version_makes_the_member_ready() -> None:
    """A broker from before the "lending" message (a rolling update: the Lease holder still runs
    the old version) only ever sends grants; a pod it lends slots to must become ready, or the
    update would wait for it forever. The old broker is a small socket server speaking its
    protocol: on hello, a grant, then a reload whose answer shows the grant was applied."""
    applied = asyncio.Event()

    async def old_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert orjson.loads(await reader.readline()) == {"op": "hello", "member": "me"}
        writer.write(b'{"op":"set","service":"s","replica":"127.0.0.1:9","slots":1}\n')
        writer.write(b'{"op":"reload","seq":1}\n')  # answered after the set (in order)
        async for line in reader:
            if orjson.loads(line) == {"op": "reloaded", "seq": 1, "ok": True}:
                applied.set()
        writer.close()

    server = await asyncio.start_server(old_broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    supervisor = Supervisor()
    member = SlotMember(dict, f"127.0.0.1:{port}", "me", supervisor)
    supervisor.spawn(member.run(), name="slot member")
    try:
        assert not member.joined
        async with asyncio.timeout(5):
            await applied.wait()
        assert member.joined
    finally:
        await supervisor.stop()
        server.close()
        await server.wait_closed()
