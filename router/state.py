"""Where admin changes are kept: the state store seam.

The router's working copy of its state is always a few files in its state dir (keys, endpoint
versions, the token signing key); it reads them there. An admin write goes through a
:class:`StateStore`, which stores the new files and only then lets the router use them:

- :class:`DirStateStore` (one router, or one host): the files in the state dir are the truth;
  a write is an atomic rename of each file.
- the Kubernetes store (``deploy/kube/state.py``): the files are the data of one Secret, written
  with its ``resourceVersion`` (compare-and-swap) and mirrored into every router pod's state dir.

A write that lost a race raises :class:`StateConflict` and stores nothing; one that cannot reach
the store raises :class:`StateUnavailable`. Either way the caller is told, and nothing changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from router.keystore import KEYS_FILE, PREVIOUS_KEYS_FILE, SIGNING_KEY_FILE, atomic_write

ENDPOINTS_FILE = "endpoints.json"
# Every file of the shared state (the admin token is not one: it comes from the environment).
STATE_FILES = (KEYS_FILE, ENDPOINTS_FILE, SIGNING_KEY_FILE, PREVIOUS_KEYS_FILE)


class StateConflict(Exception):
    """Another writer changed the state since this router last read it; nothing was stored."""


class StateUnavailable(Exception):
    """The store cannot take a write now (e.g. the API server is unreachable)."""


class StateStore(Protocol):
    async def commit(self, changes: Mapping[str, bytes]) -> None:
        """Store ``changes`` (file name -> content) on top of the state this router last read,
        all or nothing. Returns once stored, with the state dir's files updated."""


class DirStateStore:
    """Today's behaviour: the state dir is the store."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    async def commit(self, changes: Mapping[str, bytes]) -> None:
        for name, data in changes.items():
            atomic_write(self.state_dir / name, data)
