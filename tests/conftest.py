"""Session-wide safety net: no process a test started survives the test run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support import SPAWNED


@pytest.fixture(autouse=True, scope="session")
def _no_process_left_behind() -> Iterator[None]:
    yield
    for p in SPAWNED:
        p.stop()


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """A test that leaves a task running fails (`pytestmark` in the modules that use it)."""
    yield
    leftover = asyncio.all_tasks() - {asyncio.current_task()}
    assert not leftover, f"tasks left running: {leftover}"
