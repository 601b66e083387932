"""mlfe in a cluster: `kubernetes:` services find their replicas in EndpointSlices and are
scaled through `deployments/{name}/scale`, by whichever router pod holds the Lease.

Every router pod routes; only the leader scales. Admin writes (keys, endpoint versions, the
signing key) go to one Secret that every pod follows (`deploy/kube/state.py`), read before the
router is built (`connect_state`). Each leadership term gets a fresh autoscaler
(no stale scale-down window carries over) reading load summed over every router pod: as the
pods report it to the slot broker on the leader (`BrokerCounts`, the default), or with a fixed
broker, each pod's `/v1/stats` (`PeerCounts`, pods found through the router's admin Service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from autoscaler.loop import AutoscalerLoop
from autoscaler.router_loop import DeploymentPods
from deploy.scaling import scaling_spec
from mlfe.clock import MonotonicClock
from mlfe.config import ConfigError, MlfeConfig
from mlfe.stats import StatsSource
from mlfe.supervise import Supervisor
from router.slots import DEFAULT_GRACE_S

if TYPE_CHECKING:
    from deploy.kube import (
        EndpointWatcher,
        KubeApi,
        KubernetesTarget,
        LeaderElector,
        PeerCounts,
    )
    from deploy.kube.broker import LeaseBroker
    from deploy.kube.state import KubeStateStore
    from router.server import Router

log = logging.getLogger(__name__)

SYNC_TIMEOUT_S = 10.0
# The router's own Deployment in the Kubernetes target (not a valid service name).
ROUTER_TARGET = "router:self"


def uses_kubernetes(cfg: MlfeConfig) -> bool:
    return any(s.kubernetes is not None for s in cfg.services.values())


async def connect_state(cfg: MlfeConfig, supervisor: Supervisor) -> KubeStateStore | None:
    """In a cluster: the API connection and the shared state, read into the state dir (before
    the router is built, so that it starts with the shared keys). None: not in a cluster."""
    if not uses_kubernetes(cfg):
        return None
    # Imported here: kubernetes_asyncio is an optional extra and slow to import.
    from deploy.kube import KubeApi, KubeError
    from deploy.kube.state import KubeStateStore

    try:
        api = await KubeApi.connect()
    except KubeError as e:
        raise ConfigError(
            f"services: kubernetes services need the Kubernetes API: {e}") from None
    store = KubeStateStore(api, cfg.router.state_dir, supervisor=supervisor)
    try:
        await store.load()
    except KubeError as e:
        await api.close()
        raise ConfigError(f"the router's shared state ({store.what}) cannot be read: {e}"
                          ) from None
    return store


class Cluster:
    def __init__(self, cfg: MlfeConfig, router: Router, local_counts: StatsSource,
                 admin_token: str, supervisor: Supervisor, api: KubeApi | None = None,
                 broker_listen: str | None = None) -> None:
        self.cfg = cfg
        self._supervisor = supervisor
        self._router = router
        self._local_counts = local_counts
        self._admin_token = admin_token
        self.api: KubeApi | None = api
        self.target: KubernetesTarget | None = None
        self.elector: LeaderElector | None = None
        self.peers: PeerCounts | None = None
        self._peer_watch: EndpointWatcher | None = None
        self._lead: asyncio.Task[None] | None = None
        self.autoscaler: AutoscalerLoop | None = None
        # With ``broker_listen``: the slot broker runs on the Lease holder (deploy/kube/broker.py)
        # and this router's slot member follows it.
        self._broker_listen = broker_listen
        self.lease_broker: LeaseBroker | None = None

    async def start(self) -> None:
        # Imported here: kubernetes_asyncio is an optional extra and slow to import.
        from deploy.kube import (
            KubeApi,
            KubeError,
            KubernetesTarget,
            LeaderElector,
            PeerCounts,
            default_identity,
            follow_leadership,
            peer_watcher,
            pod_ip,
        )

        if self.api is None:
            try:
                self.api = await KubeApi.connect()
            except KubeError as e:
                raise ConfigError(
                    f"services: kubernetes services need the Kubernetes API: {e}") from None
        self.elector = LeaderElector(self.api, identity=default_identity(),
                                     supervisor=self._supervisor)
        elector = self.elector
        member = self._router.member
        if self._broker_listen is not None and member is not None:
            from deploy.kube.broker import LeaseBroker

            coord = self.cfg.router.coordination
            self.lease_broker = LeaseBroker(
                elector, member, listen=self._broker_listen,
                grace_s=coord.grace_seconds if coord else DEFAULT_GRACE_S,
                supervisor=self._supervisor, listed=self._listed_router_pods)
            self.lease_broker.start()
        self.target = KubernetesTarget(self._router.services, self.api,
                                       supervisor=self._supervisor,
                                       may_scale=lambda: elector.is_leader,
                                       on_external_change=self._adopt)
        self.target.configure(self._router.services, self.cfg.services)
        scaling = self.cfg.router.self_scaling
        if scaling.max_pods > 1:
            self.target.add_deployment(ROUTER_TARGET, self.api.namespace, scaling.deployment)
        self.peers = PeerCounts(self._local_counts, admin_token=self._admin_token,
                                self_hosts=[pod_ip()], supervisor=self._supervisor)
        self._peer_watch = peer_watcher(self.api, self.peers, supervisor=self._supervisor)
        self._peer_watch.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SYNC_TIMEOUT_S):
                await self.target.wait_synced()  # the first tick needs the real counts
        self.elector.start()
        self._lead = self._supervisor.spawn(
            follow_leadership(self.elector, self._start_scaling, self._stop_scaling),
            name="leadership")

    async def _listed_router_pods(self) -> set[str] | None:
        """The pods the router's admin Service lists now (a fresh read, not a watch that may
        lag), for the slot broker's cold start; None if the API server cannot say."""
        from deploy.kube import ROUTER_ADMIN_SERVICE, KubeError
        from deploy.kube.discovery import listed_pods

        assert self.api is not None
        try:
            listed = await self.api.list_endpoint_slices(self.api.namespace,
                                                         ROUTER_ADMIN_SERVICE)
        except KubeError as e:
            log.info("slot broker: the router pods cannot be listed now (%s)", e)
            return None
        return listed_pods(listed.items)

    def _adopt(self, service: str, replicas: int) -> None:
        if self.autoscaler is not None:
            self.autoscaler.adopt(service, replicas)

    def router_pods(self) -> DeploymentPods:
        """The router self-scaler's pod actuator: only the leader changes the count."""
    
        assert self.target is not None and self.elector is not None
        elector = self.elector
        return DeploymentPods(self.target, ROUTER_TARGET, may_scale=lambda: elector.is_leader)

    async def _start_scaling(self) -> None:
        assert self.peers is not None and self.target is not None
        log.info("leading: scaling the kubernetes services")
        if self.lease_broker is not None:
            await self.lease_broker.lead()
        self.peers.start()
        counts: StatsSource = self.peers
        if self.lease_broker is not None:
            from deploy.kube.broker import BrokerCounts

            lease_broker = self.lease_broker
            counts = BrokerCounts(self._local_counts, lambda: lease_broker.server)
        self.autoscaler = AutoscalerLoop(counts=counts, actuator=self.target,
                                         clock=MonotonicClock(), supervisor=self._supervisor)
        self.autoscaler.set_services({n: scaling_spec(c) for n, c in self.cfg.services.items()
                                      if c.kubernetes is not None})
        self.autoscaler.start()

    async def _stop_scaling(self) -> None:
        log.info("not leading: scaling stops")
        if self.lease_broker is not None:
            await self.lease_broker.follow()
        if self.autoscaler is not None:
            await self.autoscaler.stop()
            self.autoscaler = None
        if self.peers is not None:
            await self.peers.stop()

    async def close(self) -> None:
        if self.lease_broker is not None:
            await self.lease_broker.close()
        if self._lead is not None:
            self._lead.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lead
        if self.elector is not None:
            await self.elector.close()
        if self._peer_watch is not None:
            await self._peer_watch.close()
        if self.peers is not None:
            await self.peers.close()
        if self.target is not None:
            await self.target.close()
        if self.api is not None:
            await self.api.close()
