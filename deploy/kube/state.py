"""The state every router pod shares, kept in one Secret (``mlfe-keys``).

The router's state files (keys, endpoint versions, the token signing key: router/state.py) are
the Secret's data, one key per file. Every pod:

- reads the Secret before it is built, and mirrors its files into its own state dir, so a pod
  serves nothing before it has the shared state;
- stores its admin writes with a PUT carrying the ``resourceVersion`` it last read: a write made
  from a stale read is refused by the API server (409), reported to the admin as a conflict,
  and the pod reads the Secret again; nothing is overwritten silently;
- watches the Secret and applies every change (mirror, then the router's reload) as it comes;
- when the API server cannot be reached, keeps serving with the last state it read (and
  refuses admin writes: :class:`StateUnavailable`), and resumes watching when it is back.

Files the router made at start that the Secret lacks (keys of a service added to the config,
a first signing key in an empty Secret) are stored the same way; a pod that loses that race
takes the winner's instead, so every pod ends with the same keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deploy.kube.api import Backoff, Conflict, Gone, KubeApi, KubeError, StreamDropped
from mlfe.clock import Clock, MonotonicClock
from mlfe.supervise import Supervisor
from router.keystore import atomic_write
from router.state import STATE_FILES, StateConflict, StateUnavailable

log = logging.getLogger(__name__)

STATE_SECRET = "mlfe-keys"
WATCH_TIMEOUT_S = 290.0  # the server's own default is 5-10 min; a routine reconnect before
PUBLISH_ATTEMPTS = 5


def secret_files(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """The state files a Secret holds (its other keys, such as the admin token, are not)."""
    data = secret.get("data") or {}
    return {name: base64.b64decode(data[name]) for name in STATE_FILES if data.get(name)}


class KubeStateStore:
    """A :class:`router.state.StateStore` on one Secret, mirrored into ``state_dir``."""

    def __init__(self, api: KubeApi, state_dir: Path, *, supervisor: Supervisor,
                 name: str = STATE_SECRET, clock: Clock | None = None,
                 backoff: Backoff | None = None,
                 watch_timeout_s: float = WATCH_TIMEOUT_S) -> None:
        self.api = api
        self.namespace = api.namespace
        self.name = name
        self.state_dir = state_dir
        self._supervisor = supervisor
        self._clock = clock or MonotonicClock()
        self._backoff = backoff or Backoff()
        self._watch_timeout_s = watch_timeout_s
        self._secret: dict[str, Any] | None = None  # the version last read or written
        self._watch_rv: str | None = None  # None: read again before watching
        self._on_change: Callable[[], None] = lambda: None
        self._failing = False  # in an episode of failed calls (logged once)
        self._task: asyncio.Task[None] | None = None

    @property
    def what(self) -> str:
        return f"secret {self.namespace}/{self.name}"

    @property
    def resource_version(self) -> str | None:
        return None if self._secret is None else str(self._secret["metadata"]["resourceVersion"])

    # ---- start ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the Secret and mirror it into the state dir. Before the router is built: a
        missing Secret or a refused read is a :class:`KubeError` (the pod must not start)."""
        secret = await self.api.get_secret(self.namespace, self.name)
        self._mirror(secret)
        self._watch_rv = self.resource_version
        log.info("state: %s read (%d files)", self.what, len(secret_files(secret)))

    async def start(self, on_change: Callable[[], None]) -> None:
        """Store what the router made at start that the Secret lacks, then follow the Secret.
        ``on_change`` is called after every change another writer made is in the state dir."""
        self._on_change = on_change
        for _ in range(PUBLISH_ATTEMPTS):
            local = self._local_changes()
            if not local:
                break
            try:
                await self.commit(local)
                log.info("state: stored %s in %s", ", ".join(sorted(local)), self.what)
                break
            except StateConflict:
                continue  # commit took the newer Secret; the router remade what it lacks
        self._task = self._supervisor.spawn(self.run(), name=f"state {self.what}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _local_changes(self) -> dict[str, bytes]:
        stored = secret_files(self._secret or {})
        changes = {}
        for name in STATE_FILES:
            path = self.state_dir / name
            if path.is_file():
                data = path.read_bytes()
                if stored.get(name) != data:
                    changes[name] = data
        return changes

    # ---- writes ----------------------------------------------------------------------------------

    async def commit(self, changes: Mapping[str, bytes]) -> None:
        if self._secret is None:
            raise StateUnavailable(f"{self.what} has not been read")
        wanted = copy.deepcopy(self._secret)
        data = dict(wanted.get("data") or {})
        data.update({k: base64.b64encode(v).decode() for k, v in changes.items()})
        wanted["data"] = data
        try:
            stored = await self.api.replace_secret(self.namespace, wanted)
        except Conflict:
            log.info("state: %s changed by another writer first; reading it again", self.what)
            with contextlib.suppress(KubeError):
                self._take(await self.api.get_secret(self.namespace, self.name))
            raise StateConflict(
                "the shared state was changed by another admin write first; "
                "read it again and retry") from None
        except KubeError as e:
            raise StateUnavailable(
                f"the shared state cannot be written now ({self.what}: {e.status or ''} "
                f"{e.reason}); this router keeps serving with the state it has") from None
        self._mirror(stored)

    # ---- following the Secret -------------------------------------------------------------------

    def _mirror(self, secret: dict[str, Any]) -> bool:
        """Make the state dir hold ``secret``'s files; True if anything changed."""
        files = secret_files(secret)
        changed = False
        for name in STATE_FILES:
            path = self.state_dir / name
            current = path.read_bytes() if path.is_file() else None
            if files.get(name) == current:
                continue
            changed = True
            if name in files:
                atomic_write(path, files[name])
            else:
                path.unlink()
        self._secret = secret
        return changed

    def _take(self, secret: dict[str, Any]) -> None:
        """A version of the Secret from the API server: applied if its files differ."""
        if self._mirror(secret):
            log.info("state: %s changed (resourceVersion %s); applying it",
                     self.what, self.resource_version)
            try:
                self._on_change()
            except Exception:
                log.exception("state: applying the change of %s failed", self.what)

    async def _reread(self) -> None:
        secret = await self.api.get_secret(self.namespace, self.name)
        self._take(secret)
        self._watch_rv = self.resource_version

    async def run(self) -> None:
        while True:
            try:
                if self._watch_rv is None:
                    await self._reread()
                ran_its_course = await self._watch()
                self._recovered()
                if ran_its_course:
                    self._backoff.reset()
                    continue
                delay = self._backoff.next()
            except Gone:
                log.info("state: %s: resourceVersion expired; reading it again", self.what)
                self._watch_rv = None
                delay = 0.0
            except StreamDropped as e:
                log.debug("state: %s: watch dropped (%s); resuming", self.what, e)
                delay = self._backoff.next()
            except KubeError as e:
                delay = self._backoff.next(e.retry_after_s)
                self._failed(e, delay)
            await self._clock.sleep(delay)

    async def _watch(self) -> bool:
        assert self._watch_rv is not None
        started = self._clock.now()
        events = 0
        stream = self.api.watch_secret(self.namespace, self.name, self._watch_rv,
                                       self._watch_timeout_s)
        async with contextlib.aclosing(stream) as events_in:
            async for event in events_in:
                events += 1
                if event.type in ("ADDED", "MODIFIED"):
                    self._take(event.object)
                elif event.type == "DELETED":
                    log.error("state: %s was deleted; serving with the last state (admin "
                              "writes fail until it is created again)", self.what)
                    self._secret = None
                if event.resource_version:
                    self._watch_rv = event.resource_version
        return events > 0 or self._clock.now() - started >= self._watch_timeout_s / 2

    def _failed(self, e: KubeError, delay: float) -> None:
        """One warning per episode of failures (a rotated token, an unreachable server), not
        one per retry."""
        if not self._failing:
            self._failing = True
            log.warning("state: %s: %s %s; serving with the last state, retrying (next in "
                        "%.1f s)", self.what, e.status or "", e.reason, delay)
        else:
            log.debug("state: %s: still failing: %s", self.what, e)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("state: %s: reachable again", self.what)
