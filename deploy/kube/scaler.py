"""The replica autoscaler's Kubernetes actuator: it sets ``spec.replicas`` through the
``deployments/{name}/scale`` subresource, and never writes the Deployment itself (so the
router's Role needs no write access to Deployments).

It never fights a human. The count it works from is the one it last observed or set; it reads
the scale again every ``poll_s`` and right before each patch, and when ``spec.replicas`` is not
what it last set (someone ran ``kubectl scale``, or a rollout tool did), it logs that, adopts
the observed count as current and does not patch on that call: the autoscaler decides again
from the real count on its next tick. The patch itself is conditional on the resourceVersion it
just read, so a change that lands in between is never overwritten blindly (409: adopt, retry).

Only the leader scales: ``may_scale`` (the leader elector's ``is_leader``) is checked before
every patch; a follower's :meth:`KubeScaler.scale` raises :class:`NotLeader`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from deploy.kube.api import Conflict, KubeApi, KubeError, Scale
from mlfe.clock import Clock, MonotonicClock
from mlfe.supervise import Supervisor

log = logging.getLogger(__name__)

POLL_S = 5.0


class NotLeader(RuntimeError):
    """This router pod does not hold the autoscaler lease, so it does not scale."""


class NotObserved(LookupError):
    """The deployment's scale has not been read yet."""


@dataclass(frozen=True, slots=True)
class DeploymentRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(eq=False)
class _Target:
    ref: DeploymentRef
    replicas: int | None = None  # spec.replicas as last observed or set
    set_by_us: bool = False  # whether ``replicas`` is what mlfe itself set
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    observed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def _always() -> bool:
    return True


class KubeScaler:
    """An ``Actuator`` (autoscaler.loop) over Deployments, by service name."""

    def __init__(
        self,
        api: KubeApi,
        *,
        may_scale: Callable[[], bool] = _always,
        clock: Clock | None = None,
        supervisor: Supervisor | None = None,
        poll_s: float = POLL_S,
        on_external_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self._api = api
        self._may_scale = may_scale
        self._clock = clock or MonotonicClock()
        # The process's one supervisor in production; tests may leave it out.
        self._supervisor = supervisor or Supervisor(clock=self._clock)
        self._poll_s = poll_s
        self._on_external_change = on_external_change
        self._targets: dict[str, _Target] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # polls of forgotten targets
        self._running = False

    # ---- configuration ---------------------------------------------------------------------

    def set_targets(self, targets: Mapping[str, DeploymentRef]) -> None:
        """Scale exactly these services (by name) through these Deployments. A service whose
        Deployment is unchanged keeps its known count; the others are read afresh."""
        for name in list(self._targets):
            if targets.get(name) != self._targets[name].ref:
                self._forget(name)
        for name, ref in targets.items():
            if name not in self._targets:
                self._targets[name] = _Target(ref)
                if self._running:
                    self._spawn(name)

    def start(self) -> None:
        """Keep every target's count fresh (a read every ``poll_s``)."""
        self._running = True
        for name, target in self._targets.items():
            if target.task is None:
                self._spawn(name)

    async def close(self) -> None:
        self._running = False
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        tasks += self._stopping
        for target in self._targets.values():
            target.task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget(self, name: str) -> None:
        target = self._targets.pop(name)
        if target.task is not None:
            target.task.cancel()
            self._stopping.add(target.task)
            target.task.add_done_callback(self._stopping.discard)

    def _spawn(self, name: str) -> None:
        target = self._targets[name]
        target.task = self._supervisor.spawn(
            self._poll(name, target), name=f"scale poll {target.ref}")

    async def wait_observed(self) -> None:
        """Until every target's count has been read once."""
        for target in list(self._targets.values()):
            await target.observed.wait()

    # ---- Actuator ---------------------------------------------------------------------------

    def current(self, service: str) -> int:
        target = self._targets[service]  # KeyError: not a Kubernetes service
        if target.replicas is None:
            raise NotObserved(f"the scale of deployment {target.ref} has not been read yet")
        return target.replicas

    async def scale(self, service: str, desired: int) -> None:
        target = self._targets[service]
        if not self._may_scale():
            raise NotLeader(f"not the leader: not scaling {target.ref}")
        async with target.lock:
            scale = await self._api.get_scale(target.ref.namespace, target.ref.name)
            if self._observe(service, target, scale) or scale.replicas == desired:
                return  # changed by someone else: decide again from the real count
            if not self._may_scale():  # leadership may have gone while reading
                raise NotLeader(f"not the leader: not scaling {target.ref}")
            log.info("deployment %s: scaling %d -> %d replicas", target.ref,
                     scale.replicas, desired)
            try:
                new = await self._api.patch_scale(target.ref.namespace, target.ref.name,
                                                  desired, scale.resource_version)
            except Conflict:
                # Changed between our read and our patch: take the new count, decide again.
                fresh = await self._api.get_scale(target.ref.namespace, target.ref.name)
                self._observe(service, target, fresh)
                return
            target.replicas = new.replicas
            target.set_by_us = True

    async def refresh(self, service: str) -> int:
        """Read the scale now; returns spec.replicas."""
        target = self._targets[service]
        async with target.lock:
            scale = await self._api.get_scale(target.ref.namespace, target.ref.name)
            self._observe(service, target, scale)
        return scale.replicas

    # ---- observation -------------------------------------------------------------------------

    def _observe(self, service: str, target: _Target, scale: Scale) -> bool:
        """Take in a read of spec.replicas; True if it is not what we knew."""
        known = target.replicas
        target.observed.set()
        if known == scale.replicas:
            return False
        target.replicas = scale.replicas
        if known is None:
            log.info("deployment %s: %d replicas", target.ref, scale.replicas)
            target.set_by_us = False
            return True
        # A follower sees each of the leader's decisions this way: that is no news.
        log.log(
            logging.WARNING if self._may_scale() else logging.DEBUG,
            "deployment %s: spec.replicas is %d, not the %d mlfe %s: changed outside mlfe; "
            "taking %d as the current count", target.ref, scale.replicas, known,
            "set" if target.set_by_us else "last saw", scale.replicas)
        target.set_by_us = False
        if self._on_external_change is not None:
            try:
                self._on_external_change(service, scale.replicas)
            except Exception:
                log.exception("on_external_change failed for %s", service)
        return True

    async def _poll(self, service: str, target: _Target) -> None:
        """Read the scale every ``poll_s`` (a failure is logged once, until it works again)."""
        failing = False
        while True:
            delay = self._poll_s
            try:
                async with target.lock:
                    scale = await self._api.get_scale(target.ref.namespace, target.ref.name)
                    self._observe(service, target, scale)
            except KubeError as e:
                if not failing:
                    log.warning("deployment %s: reading its scale failed: %s", target.ref, e)
                failing = True
                delay = max(delay, e.retry_after_s or 0.0)
            else:
                if failing:
                    log.info("deployment %s: reading its scale works again", target.ref)
                failing = False
            await self._clock.sleep(delay)
