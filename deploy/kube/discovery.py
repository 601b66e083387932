"""Replica discovery: a service's replica pool follows the ready endpoints of its Kubernetes
Service, as listed by that Service's EndpointSlices.

One :class:`EndpointWatcher` per Service lists the slices once, then watches them from the
list's resourceVersion, keeping the slices in memory and handing the set of ready addresses to
``on_change`` whenever it changes. A watch that ends is resumed from the last resourceVersion
seen; a version the server no longer has (410 Gone) makes it list again; an error or a stream
that breaks off early is retried after an exponential backoff. While the API server is away the
pool keeps the addresses it last had: no news is not bad news.

Readiness is the endpoint's ``conditions.ready`` (absent means ready, per the API reference);
the port is the slice port named ``http`` (or a given name), else the slice's first port.
:func:`ready_addresses` is the pure part; :func:`listed_pods` names the pods the slices list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from deploy.kube.api import Backoff, Gone, KubeApi, KubeError, StreamDropped, WatchEvent
from mlfe.clock import Clock, MonotonicClock
from mlfe.supervise import Supervisor

log = logging.getLogger(__name__)

# Ask the server to end each watch after about this long (it may end it sooner); a stream
# that ends cleanly after half of it is routine and resumes at once.
WATCH_TIMEOUT_S = 290.0


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def slice_port(ports: Iterable[Mapping[str, Any]] | None, port: str | int) -> int | None:
    """The port of a slice to use: ``port`` itself if a number; else the port of that name,
    else the first port. None when the slice lists no usable port."""
    if isinstance(port, int):
        return port
    numbered = [p for p in ports or () if isinstance(p.get("port"), int)]
    for p in numbered:
        if p.get("name") == port:
            return int(p["port"])
    return int(numbered[0]["port"]) if numbered else None


def ready_addresses(slices: Iterable[Mapping[str, Any]], port: str | int = "http") -> list[str]:
    """Sorted ``host:port`` of every ready endpoint in ``slices`` (each address once)."""
    out: set[str] = set()
    for s in slices:
        if s.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue  # FQDN slices are not pod endpoints
        number = slice_port(s.get("ports"), port)
        if number is None:
            continue
        for endpoint in s.get("endpoints") or ():
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue  # absent or null means ready
            addresses = endpoint.get("addresses") or ()
            if addresses:
                # The API reference: the addresses of one endpoint are fungible; use the first.
                out.add(hostport(str(addresses[0]), number))
    return sorted(out)


def listed_pods(slices: Iterable[Mapping[str, Any]]) -> set[str]:
    """The names of the Pods that ``slices`` list, in any condition (ready or not, terminating
    or not): Kubernetes removes a pod's endpoint only once the Pod object is gone, so a pod
    absent from its Service's slices no longer runs."""
    out: set[str] = set()
    for s in slices:
        for endpoint in s.get("endpoints") or ():
            ref = endpoint.get("targetRef") or {}
            if ref.get("kind") == "Pod" and ref.get("name"):
                out.add(str(ref["name"]))
    return out


class EndpointWatcher:
    """Follows the ready endpoints of Service ``namespace/service``.

    ``on_change(addresses)`` is called with the full sorted list after the first list and after
    every change (never twice in a row with the same list).
    """

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        service: str,
        on_change: Callable[[list[str]], None],
        *,
        port: str | int = "http",
        clock: Clock | None = None,
        supervisor: Supervisor | None = None,
        backoff: Backoff | None = None,
        watch_timeout_s: float = WATCH_TIMEOUT_S,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.service = service
        self.port = port
        self._on_change = on_change
        self._clock = clock or MonotonicClock()
        # The process's one supervisor in production; tests may leave it out.
        self._supervisor = supervisor or Supervisor(clock=self._clock)
        self._backoff = backoff or Backoff()
        self._watch_timeout_s = watch_timeout_s
        self._slices: dict[str, dict[str, Any]] = {}
        self._rv: str | None = None  # None: list (again) before watching
        self._expired = 0  # 410s in a row
        self.addresses: list[str] | None = None  # None until the first list
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.service}"

    @property
    def resource_version(self) -> str | None:
        return self._rv

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = self._supervisor.spawn(
                self.run(), name=f"endpoints {self.name}")

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop watching (without waiting); returns the task to await, if any."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def close(self) -> None:
        task = self.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_synced(self) -> None:
        """Until the first list has been applied."""
        await self._synced.wait()

    # ---- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                if self._rv is None:
                    await self._relist()
                ran_its_course = await self._watch()
                self._expired = 0  # the version was accepted
                if ran_its_course:
                    self._backoff.reset()  # the backoff only resets once a watch works
                    continue  # a routine end: resume at once
                log.info("endpoints %s: watch stream ended early; resuming from %s",
                         self.name, self._rv)
                delay = self._backoff.next()
            except Gone:
                # The version is too old for the server: list again. At once the first time,
                # after the backoff if the fresh list's version is refused too.
                log.info("endpoints %s: resourceVersion %s expired; listing again",
                         self.name, self._rv)
                self._rv = None
                self._expired += 1
                if self._expired == 1:
                    continue
                delay = self._backoff.next()
            except StreamDropped as e:
                self._expired = 0  # the version was accepted before the stream broke
                log.info("endpoints %s: watch stream dropped (%s); resuming from %s",
                         self.name, e, self._rv)
                delay = self._backoff.next()
            except KubeError as e:
                delay = self._backoff.next(e.retry_after_s)
                log.warning("endpoints %s: %s; retrying in %.1f s", self.name, e, delay)
            await self._clock.sleep(delay)

    async def _relist(self) -> None:
        listed = await self.api.list_endpoint_slices(self.namespace, self.service)
        self._slices = {str(s["metadata"]["name"]): s for s in listed.items}
        self._rv = listed.resource_version
        self._publish()
        self._synced.set()

    async def _watch(self) -> bool:
        """One watch stream, applied as it comes. True if it ran its course (it lasted half
        its timeout or brought events), False if it ended suspiciously early."""
        assert self._rv is not None
        started = self._clock.now()
        events = 0
        stream = self.api.watch_endpoint_slices(
            self.namespace, self.service, self._rv, self._watch_timeout_s)
        async with contextlib.aclosing(stream) as events_in:
            async for event in events_in:
                events += 1
                self._apply(event)
                rv = event.resource_version
                if rv:
                    self._rv = rv
        return events > 0 or self._clock.now() - started >= self._watch_timeout_s / 2

    def _apply(self, event: WatchEvent) -> None:
        if event.type in ("ADDED", "MODIFIED"):
            self._slices[event.name] = event.object
        elif event.type == "DELETED":
            self._slices.pop(event.name, None)
        else:
            return  # BOOKMARK: only its resourceVersion matters
        self._publish()

    def _publish(self) -> None:
        addresses = ready_addresses(self._slices.values(), self.port)
        if addresses == self.addresses:
            return
        before = set(self.addresses or ())
        added = [a for a in addresses if a not in before]
        removed = sorted(before - set(addresses))
        self.addresses = addresses
        log.info("endpoints %s: %d ready%s%s", self.name, len(addresses),
                 f" (+{', '.join(added)})" if added else "",
                 f" (-{', '.join(removed)})" if removed else "")
        try:
            self._on_change(list(addresses))
        except Exception:
            log.exception("endpoints %s: applying the replica set failed", self.name)
