"""The Kubernetes backend: replica discovery from EndpointSlices, scaling through the
``deployments/{name}/scale`` subresource, Lease leader election, and load counts summed over
every router pod. Needs the ``kubernetes`` extra (kubernetes_asyncio); import it only when a
service is configured with ``kubernetes:``.
"""

from deploy.kube.api import ROLE_RULES, Backoff, KubeApi, KubeError
from deploy.kube.discovery import EndpointWatcher, ready_addresses
from deploy.kube.leader import LeaderElector, default_identity, follow_leadership
from deploy.kube.peers import ROUTER_ADMIN_SERVICE, PeerCounts, peer_watcher, pod_ip
from deploy.kube.scaler import DeploymentRef, KubeScaler, NotLeader, NotObserved
from deploy.kube.target import KubernetesTarget

__all__ = [
    "ROLE_RULES",
    "ROUTER_ADMIN_SERVICE",
    "Backoff",
    "DeploymentRef",
    "EndpointWatcher",
    "KubeApi",
    "KubeError",
    "KubeScaler",
    "KubernetesTarget",
    "LeaderElector",
    "NotLeader",
    "NotObserved",
    "PeerCounts",
    "default_identity",
    "follow_leadership",
    "peer_watcher",
    "pod_ip",
    "ready_addresses",
]
