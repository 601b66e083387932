"""Admin changes confirmed by every worker: the slot broker's reload and its acknowledgements,
over a real unix socket, with real members and one raw-socket member that never answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from mlfe.supervise import Supervisor
from router.slots import BrokerServer, ReloadUnconfirmed, SlotMember

pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[tuple[BrokerServer, str]]:
    server = BrokerServer()
    address = f"unix:{tmp_path / 'slots.sock'}"
    await server.start(address)
    yield server, address
    await server.close()


class Members:
    """SlotMembers that count the reloads they applied."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.supervisor = Supervisor()
        self.reloads: dict[str, int] = {}

    async def join(self, member_id: str, on_reload: Callable[[], None] | None = None
                   ) -> SlotMember:
        self.reloads[member_id] = 0

        def count() -> None:
            if on_reload is not None:
                on_reload()
            self.reloads[member_id] += 1

        m = SlotMember(dict, self.address, member_id, self.supervisor, on_reload=count)
        self.supervisor.spawn(m.run(), name=f"member {member_id}")
        async with asyncio.timeout(5):
            await m.synced.wait()  # the broker's reload right after hello was applied
        return m

    async def stop(self) -> None:
        await self.supervisor.stop()


async def test_reload_returns_once_every_member_applied_it(broker: tuple[BrokerServer, str]
                                                           ) -> None:
    server, address = broker
    members = Members(address)
    try:
        await members.join("a")
        await members.join("b")
        assert members.reloads == {"a": 1, "b": 1}  # the one after hello
        await server.reload(timeout_s=5)
        # Returned: both have applied it already, nothing more to wait for.
        assert members.reloads == {"a": 2, "b": 2}
        await asyncio.gather(server.reload(timeout_s=5), server.reload(timeout_s=5))
        assert members.reloads == {"a": 4, "b": 4}
    finally:
        await members.stop()


async def test_a_silent_member_makes_the_reload_fail_after_the_bound(
        broker: tuple[BrokerServer, str]) -> None:
    server, address = broker
    members = Members(address)
    _, writer = await asyncio.open_unix_connection(address[5:])
    try:
        await members.join("a")
        # A member that joins and then never answers a reload (a hung worker).
        writer.write(orjson.dumps({"op": "hello", "member": "hung"}) + b"\n")
        await writer.drain()
        await until(lambda: "hung" in server.members(), "hung joined")
        t0 = time.monotonic()
        with pytest.raises(ReloadUnconfirmed) as err:
            await server.reload(timeout_s=0.3)
        assert time.monotonic() - t0 >= 0.3
        assert (err.value.missing, err.value.live) == (1, 2)
        assert "1 of 2 worker processes did not confirm" in str(err.value)
        assert members.reloads["a"] == 2  # the live one did apply it

        # Once the silent one is gone, a reload waits only for the live ones.
        writer.close()
        await until(lambda: "hung" not in server.members(), "hung left")
        await server.reload(timeout_s=5)
        assert members.reloads["a"] == 3
    finally:
        writer.close()
        await members.stop()


async def test_a_member_leaving_mid_reload_is_not_waited_for(
        broker: tuple[BrokerServer, str]) -> None:
    server, address = broker
    members = Members(address)
    reader, writer = await asyncio.open_unix_connection(address[5:])
    try:
        await members.join("a")
        writer.write(orjson.dumps({"op": "hello", "member": "dying"}) + b"\n")
        await writer.drain()
        await until(lambda: "dying" in server.members(), "dying joined")
        reload = asyncio.create_task(server.reload(timeout_s=30))
        async with asyncio.timeout(5):
            while b'"reload"' not in (line := await reader.readline()) or b'"seq":1' not in line:
                pass
        writer.close()  # it dies instead of answering
        async with asyncio.timeout(5):
            await reload  # returns well before its 30 s bound, without an error
    finally:
        writer.close()
        await members.stop()


async def test_a_member_that_cannot_apply_the_change_fails_the_reload_at_once(
        broker: tuple[BrokerServer, str]) -> None:
    server, address = broker
    members = Members(address)
    broken = False

    def maybe_fail() -> None:
        if broken:
            raise OSError("state dir unreadable")

    try:
        await members.join("a")
        await members.join("b", on_reload=maybe_fail)
        broken = True
        t0 = time.monotonic()
        with pytest.raises(ReloadUnconfirmed) as err:
            await server.reload(timeout_s=30)
        assert time.monotonic() - t0 < 5  # answered, not timed out
        assert (err.value.missing, err.value.live) == (1, 2)
    finally:
        await members.stop()


async def test_a_member_joining_after_a_change_takes_it_before_it_counts_as_synced(
        broker: tuple[BrokerServer, str]) -> None:
    server, address = broker
    members = Members(address)
    try:
        await server.reload(timeout_s=5)  # no member yet: nothing to wait for
        m = await members.join("late")
        assert m.synced.is_set() and members.reloads["late"] == 1
    finally:
        await members.stop()
