"""The cluster seam: the few Kubernetes API calls mlfe makes, and nothing else.

Everything mlfe asks of a cluster goes through :class:`KubeApi`, a thin adapter over
``kubernetes_asyncio`` (which brings configuration loading, TLS, bearer auth with token refresh
and URL building). Its operations are exactly:

* list and watch the EndpointSlices of one Service (label ``kubernetes.io/service-name``);
* get and patch ``apps/v1 deployments/{name}/scale`` (never the Deployment itself);
* get, create and replace one ``coordination.k8s.io/v1`` Lease (leader election);
* get, watch and replace the router's Secret (the state every router pod shares:
  ``deploy/kube/state.py``).

:data:`ROLE_RULES` are the RBAC rules those operations need, no more: the Role that
``mlfe render`` emits for the router should be built from them, and the test API server
enforces them. Objects cross this seam as plain JSON dicts (they are small, and the fields mlfe
reads are few), so the generated model classes are not used. Errors become :class:`KubeError`
(with :class:`Gone`, :class:`Conflict` and :class:`NotFound` for the statuses callers act on).

In a pod, the configuration comes from the service account (token re-read as it rotates);
outside, from kubeconfig (``KUBECONFIG`` or ``~/.kube/config``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader
from kubernetes_asyncio.config.kube_config import load_kube_config

from mlfe.redact import redact_url

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
NAMESPACE_ENV = "POD_NAMESPACE"  # the downward API's, in the rendered Deployment
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MERGE_PATCH = "application/merge-patch+json"

# The RBAC rules (Role, in the router's namespace or per model namespace) for every call here.
ROLE_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["list", "watch"]},
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "create", "update"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch", "update"]},
]


# ---- errors ---------------------------------------------------------------------------------


class KubeError(Exception):
    """A call failed: an API status (``status`` >= 400) or no answer at all (``status`` 0)."""

    def __init__(self, status: int, reason: str, message: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s


class Gone(KubeError):
    """410: the resourceVersion to watch from is too old; list again."""


class Conflict(KubeError):
    """409: the object changed since it was read (or already exists)."""


class NotFound(KubeError):
    """404."""


class StreamDropped(KubeError):
    """A watch stream broke off (connection reset, truncated chunk, read timeout)."""


def _error(status: int, body: bytes | Mapping[str, Any], what: str,
           retry_after: str | None = None) -> KubeError:
    reason, message = "", ""
    try:
        st = json.loads(body) if isinstance(body, bytes) else body
        if isinstance(st, Mapping):
            reason = str(st.get("reason") or "")
            message = str(st.get("message") or "")
            status = int(st.get("code") or status)
    except (ValueError, TypeError):
        message = body[:200].decode(errors="replace") if isinstance(body, bytes) else ""
    retry_s: float | None = None
    if retry_after is not None:
        with contextlib.suppress(ValueError):
            retry_s = float(retry_after)
    cls = {410: Gone, 409: Conflict, 404: NotFound}.get(status, KubeError)
    return cls(status, reason or "Failure", f"{what}: {message or 'no message'}", retry_s)


# ---- values ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SliceList:
    items: list[dict[str, Any]]
    resource_version: str


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: dict[str, Any]

    @property
    def resource_version(self) -> str | None:
        rv = (self.object.get("metadata") or {}).get("resourceVersion")
        return str(rv) if rv else None

    @property
    def name(self) -> str:
        return str((self.object.get("metadata") or {}).get("name", ""))


@dataclass(frozen=True, slots=True)
class Scale:
    """A Deployment's scale subresource: ``spec.replicas`` and where it stood."""

    replicas: int
    resource_version: str
    ready_replicas: int | None = None  # status.replicas

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Scale:
        status = obj.get("status") or {}
        return cls(
            replicas=int((obj.get("spec") or {}).get("replicas") or 0),
            resource_version=str(obj["metadata"].get("resourceVersion", "")),
            ready_replicas=status.get("replicas"),
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """The fields of a ``coordination.k8s.io/v1`` Lease that leader election uses."""

    name: str
    holder: str | None = None
    duration_s: int | None = None
    acquire_time: str | None = None  # RFC 3339 MicroTime (wall clock, for people to read)
    renew_time: str | None = None
    transitions: int = 0
    resource_version: str | None = None  # None: not stored yet
    # What the holder advertises (metadata.annotations): where its slot broker listens.
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Lease:
        spec = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        return cls(
            name=str(meta.get("name", "")),
            holder=spec.get("holderIdentity") or None,
            duration_s=spec.get("leaseDurationSeconds"),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=meta.get("resourceVersion"),
            annotations=dict(meta.get("annotations") or {}),
        )

    def to_json(self, namespace: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": namespace}
        if self.resource_version is not None:
            meta["resourceVersion"] = self.resource_version
        if self.annotations:
            meta["annotations"] = dict(self.annotations)
        spec: dict[str, Any] = {"leaseTransitions": self.transitions}
        if self.holder is not None:
            spec["holderIdentity"] = self.holder
        for key, value in (("leaseDurationSeconds", self.duration_s),
                           ("acquireTime", self.acquire_time), ("renewTime", self.renew_time)):
            if value is not None:
                spec[key] = value
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": meta, "spec": spec}


# ---- retry pacing ---------------------------------------------------------------------------


@dataclass
class Backoff:
    """Exponential backoff for retrying cluster calls: ``initial_s`` doubling to ``max_s``.

    ``jitter`` spreads retries of many router pods (a fraction of each delay, drawn from
    ``rng``); tests set it to 0 for exact delays.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next(self, at_least_s: float | None = None) -> float:
        delay = min(self.initial_s * self.factor ** self.failures, self.max_s)
        self.failures += 1
        if self.jitter:
            delay *= 1 + self.jitter * self.rng.random()
        return max(delay, at_least_s or 0.0)

    def reset(self) -> None:
        self.failures = 0


# ---- the adapter ----------------------------------------------------------------------------


class KubeApi:
    """The Kubernetes calls mlfe makes. ``namespace`` is mlfe's own (its pod's, or the
    kubeconfig context's): the default for the Lease and the router's own Service."""

    def __init__(self, api_client: k8s.ApiClient, namespace: str = "default",
                 request_timeout_s: float = 10.0) -> None:
        self.namespace = namespace
        self._client = api_client
        self._timeout = request_timeout_s
        # The generated API classes are untyped; they are used through these three handles.
        self._discovery: Any = k8s.DiscoveryV1Api(api_client)
        self._apps: Any = k8s.AppsV1Api(api_client)
        self._coordination: Any = k8s.CoordinationV1Api(api_client)
        self._core: Any = k8s.CoreV1Api(api_client)

    @classmethod
    async def connect(
        cls,
        *,
        service_account_dir: Path = SERVICE_ACCOUNT_DIR,
        environ: Mapping[str, str] | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        request_timeout_s: float = 10.0,
    ) -> KubeApi:
        """In a pod (``KUBERNETES_SERVICE_HOST`` set and a service-account token present):
        in-cluster config. Otherwise kubeconfig (``kubeconfig``, ``KUBECONFIG`` or
        ``~/.kube/config``, the ``context`` or its current one). Neither: :class:`KubeError`
        with reason ``NoConfig``."""
        env = dict(os.environ if environ is None else environ)
        configuration = k8s.Configuration()
        token = service_account_dir / "token"
        if kubeconfig is None and env.get("KUBERNETES_SERVICE_HOST") and token.is_file():
            InClusterConfigLoader(
                token_filename=str(token),
                cert_filename=str(service_account_dir / "ca.crt"),
                environ=env,
            ).load_and_set(configuration)
            ns_file = service_account_dir / "namespace"
            namespace = (ns_file.read_text().strip() if ns_file.is_file() else "") or (
                env.get(NAMESPACE_ENV, ""))
            log.info("kubernetes: in-cluster config, API server %s, namespace %s",
                     redact_url(configuration.host or ""), namespace)
        else:
            try:
                loader = await load_kube_config(
                    config_file=kubeconfig, context=context,
                    client_configuration=configuration, persist_config=False)
            except (ConfigException, OSError, ValueError) as e:
                raise KubeError(0, "NoConfig", "not in a pod (no service account) and no "
                                f"usable kubeconfig: {e}") from e
            current = loader.current_context or {}
            namespace = (current.get("context") or {}).get("namespace") or env.get(
                NAMESPACE_ENV, "")
            log.info("kubernetes: kubeconfig context %s, API server %s, namespace %s",
                     current.get("name"), redact_url(configuration.host or ""), namespace)
        if not namespace:
            # Not "default": mlfe's Lease, Secret and Role live in its own namespace, and
            # guessing wrong means every call is refused (and this pod can never lead).
            raise KubeError(0, "NoNamespace", "mlfe's namespace is unknown: set it in the "
                            f"kubeconfig context (`namespace:`) or in {NAMESPACE_ENV}")
        api_client = k8s.ApiClient(configuration)
        return cls(api_client, namespace, request_timeout_s)

    async def close(self) -> None:
        await self._client.close()

    # ---- plumbing -------------------------------------------------------------------------

    async def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One request; the JSON body of a 2xx answer, else a :class:`KubeError`."""
        try:
            resp = await method(*args, _preload_content=False,
                                _request_timeout=self._timeout, **kwargs)
            async with resp:
                body = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise KubeError(0, "Unreachable", f"{what}: {type(e).__name__}: {e}") from e
        if not 200 <= status < 300:
            raise _error(status, body, what, retry_after)
        try:
            data = json.loads(body)
        except ValueError as e:
            raise KubeError(status, "BadResponse", f"{what}: not JSON") from e
        if not isinstance(data, dict):
            raise KubeError(status, "BadResponse", f"{what}: not a JSON object")
        return data

    # ---- EndpointSlices -----------------------------------------------------------------------

    async def list_endpoint_slices(self, namespace: str, service: str) -> SliceList:
        data = await self._call(
            f"list endpointslices of {namespace}/{service}",
            self._discovery.list_namespaced_endpoint_slice, namespace,
            label_selector=f"{SERVICE_NAME_LABEL}={service}")
        return SliceList(
            items=list(data.get("items") or []),
            resource_version=str((data.get("metadata") or {}).get("resourceVersion", "")),
        )

    async def watch_endpoint_slices(
        self, namespace: str, service: str, resource_version: str, timeout_s: float,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Events after ``resource_version`` until the server ends the stream (after about
        ``timeout_s``). Raises :class:`Gone` when that version is too old (an ERROR event or a
        410 answer), :class:`StreamDropped` when the stream breaks off, :class:`KubeError` for
        anything else. Use it under ``contextlib.aclosing`` so that leaving early closes it."""
        stream = self._watch(
            f"watch endpointslices of {namespace}/{service}",
            self._discovery.list_namespaced_endpoint_slice, namespace, resource_version,
            timeout_s, label_selector=f"{SERVICE_NAME_LABEL}={service}")
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                yield event

    async def _watch(
        self, what: str, method: Any, namespace: str, resource_version: str, timeout_s: float,
        **selector: str,
    ) -> AsyncGenerator[WatchEvent, None]:
        try:
            resp = await method(
                namespace, watch=True, resource_version=resource_version,
                allow_watch_bookmarks=True, timeout_seconds=max(1, int(timeout_s)),
                _preload_content=False,
                # No total bound; a read that stalls well past the server's own end is a drop.
                _request_timeout=(self._timeout, timeout_s + 30), **selector)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise KubeError(0, "Unreachable", f"{what}: {type(e).__name__}: {e}") from e
        try:
            if resp.status != 200:
                body = await resp.read()
                raise _error(resp.status, body, what, resp.headers.get("Retry-After"))
            async for line in resp.content:
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    kind, obj = event["type"], event["object"]
                except (ValueError, KeyError, TypeError) as e:
                    raise StreamDropped(0, "BadEvent", f"{what}: malformed event") from e
                if kind == "ERROR":
                    raise _error(int(obj.get("code") or 500), obj, what)
                yield WatchEvent(str(kind), obj)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise StreamDropped(0, "StreamDropped", f"{what}: {type(e).__name__}: {e}") from e
        finally:
            resp.close()

    # ---- the state Secret -----------------------------------------------------------------------

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any]:
        return await self._call(f"get secret {namespace}/{name}",
                                self._core.read_namespaced_secret, name, namespace)

    async def replace_secret(self, namespace: str, secret: Mapping[str, Any]) -> dict[str, Any]:
        """PUT the Secret; its ``metadata.resourceVersion`` makes it conditional
        (:class:`Conflict` when another writer changed it first)."""
        name = str(secret["metadata"]["name"])
        return await self._call(f"replace secret {namespace}/{name}",
                                self._core.replace_namespaced_secret, name, namespace,
                                dict(secret))

    async def watch_secret(
        self, namespace: str, name: str, resource_version: str, timeout_s: float,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Changes of one Secret after ``resource_version`` (a watch narrowed by
        ``metadata.name``, which RBAC's ``resourceNames`` can allow); as
        :meth:`watch_endpoint_slices`."""
        stream = self._watch(
            f"watch secret {namespace}/{name}", self._core.list_namespaced_secret, namespace,
            resource_version, timeout_s, field_selector=f"metadata.name={name}")
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                yield event

    # ---- scale subresource --------------------------------------------------------------------

    async def get_scale(self, namespace: str, deployment: str) -> Scale:
        data = await self._call(
            f"get deployments/{deployment}/scale in {namespace}",
            self._apps.read_namespaced_deployment_scale, deployment, namespace)
        return Scale.from_json(data)

    async def patch_scale(self, namespace: str, deployment: str, replicas: int,
                          resource_version: str | None = None) -> Scale:
        """Set ``spec.replicas`` (a merge patch of ``/scale``). With ``resource_version`` the
        patch applies only if the scale has not changed since (else :class:`Conflict`)."""
        body: dict[str, Any] = {"spec": {"replicas": replicas}}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        data = await self._call(
            f"patch deployments/{deployment}/scale in {namespace}",
            self._apps.patch_namespaced_deployment_scale, deployment, namespace, body,
            _content_type=MERGE_PATCH)
        return Scale.from_json(data)

    # ---- Lease --------------------------------------------------------------------------------

    async def get_lease(self, namespace: str, name: str) -> Lease | None:
        try:
            data = await self._call(f"get lease {namespace}/{name}",
                                    self._coordination.read_namespaced_lease, name, namespace)
        except NotFound:
            return None
        return Lease.from_json(data)

    async def create_lease(self, namespace: str, lease: Lease) -> Lease:
        body = lease.to_json(namespace)
        body["metadata"].pop("resourceVersion", None)
        data = await self._call(f"create lease {namespace}/{lease.name}",
                                self._coordination.create_namespaced_lease, namespace, body)
        return Lease.from_json(data)

    async def replace_lease(self, namespace: str, lease: Lease) -> Lease:
        """PUT the Lease; its ``resource_version`` makes it conditional (:class:`Conflict`)."""
        data = await self._call(
            f"replace lease {namespace}/{lease.name}",
            self._coordination.replace_namespaced_lease, lease.name, namespace,
            lease.to_json(namespace))
        return Lease.from_json(data)
