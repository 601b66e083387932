"""The Kubernetes target: the replicas of a ``kubernetes: {namespace, deployment}`` service are
the pods of that Deployment, found through the EndpointSlices of the Service of the same name
and scaled through the Deployment's scale subresource.

Same shape as :class:`deploy.local_target.LocalTarget`: ``configure(services, configs)``,
``current(service)``, ``async scale(service, desired)``, ``async close()``; plus
``wait_synced()`` (the first endpoint list and scale read of every service are in) for the
runtime to await before it starts the autoscaler, whose first tick needs the real count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from deploy.kube.api import KubeApi
from deploy.kube.discovery import EndpointWatcher
from deploy.kube.scaler import POLL_S, DeploymentRef, KubeScaler
from mlfe.clock import Clock, MonotonicClock
from mlfe.config import ServiceConfig
from mlfe.supervise import Supervisor
from router.services import Service

log = logging.getLogger(__name__)

REPLICA_PORT = "http"  # the Service port name; the slice's first port if none has this name


def _always() -> bool:
    return True


class KubernetesTarget:
    def __init__(
        self,
        services: dict[str, Service],
        api: KubeApi,
        *,
        clock: Clock | None = None,
        supervisor: Supervisor | None = None,
        may_scale: Callable[[], bool] = _always,
        poll_s: float = POLL_S,
        on_external_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self._services = services  # the router's live services, by name
        self.api = api
        self._clock = clock or MonotonicClock()
        self._supervisor = supervisor or Supervisor(clock=self._clock)
        self.scaler = KubeScaler(api, may_scale=may_scale, clock=self._clock, poll_s=poll_s,
                                 on_external_change=on_external_change,
                                 supervisor=self._supervisor)
        self._watchers: dict[str, EndpointWatcher] = {}
        self._kube_refs: dict[str, DeploymentRef] = {}  # the config's kubernetes services
        self._extra: dict[str, DeploymentRef] = {}  # add_deployment()
        self._stopping: set[asyncio.Task[None]] = set()

    # ---- configuration ---------------------------------------------------------------------

    def configure(self, services: dict[str, Service], configs: dict[str, ServiceConfig]) -> None:
        """Follow the ``kubernetes`` services of a (re)loaded config. A service that leaves the
        config is no longer watched or scaled (its Deployment is left as it is)."""
        self._services = services
        kube = {n: c.kubernetes for n, c in configs.items() if c.kubernetes is not None}
        for name, watcher in list(self._watchers.items()):
            ref = kube.get(name)
            if ref is None or (ref.namespace, ref.deployment) != (watcher.namespace,
                                                                  watcher.service):
                del self._watchers[name]
                task = watcher.cancel()
                if task is not None:
                    self._stopping.add(task)
                    task.add_done_callback(self._stopping.discard)
        for name, ref in kube.items():
            existing = self._watchers.get(name)
            if existing is None:
                watcher = EndpointWatcher(self.api, ref.namespace, ref.deployment,
                                          self._sink(name), port=REPLICA_PORT, clock=self._clock,
                                          supervisor=self._supervisor)
                self._watchers[name] = watcher
                watcher.start()
            elif existing.addresses is not None:
                self._apply(name, existing.addresses)  # the Service object may be new
        self._kube_refs = {n: DeploymentRef(r.namespace, r.deployment) for n, r in kube.items()}
        self._set_targets()

    def add_deployment(self, name: str, namespace: str, deployment: str) -> None:
        """Also scale ``namespace/deployment`` under ``name`` (``current(name)``,
        ``scale(name, n)``), whatever the config says: the router's own Deployment, for the
        router self-scaler. Kept across :meth:`configure`; no endpoints are followed for it."""
        self._extra[name] = DeploymentRef(namespace, deployment)
        self._set_targets()

    def _set_targets(self) -> None:
        for name in self._extra.keys() & self._kube_refs.keys():
            log.error("service %r has the name of an added deployment; the service wins", name)
        self.scaler.set_targets({**self._extra, **self._kube_refs})
        self.scaler.start()

    def _sink(self, name: str) -> Callable[[list[str]], None]:
        return lambda addresses: self._apply(name, addresses)

    def _apply(self, name: str, addresses: list[str]) -> None:
        svc = self._services.get(name)
        if svc is not None:
            svc.set_replicas(addresses)

    async def wait_synced(self) -> None:
        """Until every service's endpoints have been listed and its scale read once."""
        for watcher in list(self._watchers.values()):
            await watcher.wait_synced()
        await self.scaler.wait_observed()

    def addresses(self, service: str) -> list[str] | None:
        """The ready ``host:port`` of ``service`` as last seen (None before the first list)."""
        watcher = self._watchers.get(service)
        return None if watcher is None else watcher.addresses

    # ---- Actuator ---------------------------------------------------------------------------

    def current(self, service: str) -> int:
        return self.scaler.current(service)

    async def scale(self, service: str, desired: int) -> None:
        await self.scaler.scale(service, desired)

    async def close(self) -> None:
        """Stop watching and polling (the API client is the caller's to close)."""
        tasks = [t for w in self._watchers.values() if (t := w.cancel()) is not None]
        tasks += self._stopping
        self._watchers.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.scaler.close()
