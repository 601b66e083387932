"""Session-wide safety net: no process a test started survives the test run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import SPAWNED


@pytest.fixture(autouse=True, scope="session")
def _no_process_left_behind() -> Iterator[None]:
    yield
    for p in SPAWNED:
        p.stop()
