"""A small Kubernetes API server for tests, speaking the real API's JSON over HTTPS.

It serves exactly the subset mlfe uses (list + watch EndpointSlices, get/patch/put
``deployments/{name}/scale``, get/patch/put a Deployment, get/create/put a Lease) the way
kube-apiserver does: bearer-token auth (401), an RBAC allow-list (403) read from the repo's own Role manifest
(deploy/kubernetes/role.yaml), so that manifest and code are tested together, a global
resourceVersion counter, a bounded event log for watch resume (a watch from a version older
than the log gets an ERROR event with a 410 Expired Status, as the real server sends it),
label selectors, merge / strategic (as merge) / JSON patches, optimistic concurrency (409),
422 for invalid values, and Status bodies for every error. EndpointSlices refuse loopback
and link-local addresses, as the real server does; tests use 192.0.2.0/24.

Every object it emits (responses and watch events) is validated against the official
OpenAPI-derived JSON schemas shipped in ``kubernetes-validate`` (strict: no unknown fields);
failures are kept in :attr:`FakeKubeApi.invalid`, which tests assert is empty.

Also as the real server: Secrets (get, update with optimistic concurrency, list and watch
narrowed by ``fieldSelector=metadata.name``, which RBAC checks against ``resourceNames``), list
and watch of Leases, BOOKMARK events (:meth:`bookmark`) to watches that allow them, an object
that leaves a watch's label selector sent to it as DELETED, ``limit``/``continue`` on lists,
and, with ``roles``, Roles per namespace (a request where mlfe has no Role is 403).

The test drives the cluster side directly in Python: :meth:`put_slice`, :meth:`delete_slice`,
:meth:`put_deployment`, :meth:`scale_by_hand`, :meth:`put_lease`, :meth:`put_secret`,
:meth:`relabel`; and injects faults:
:meth:`compact` (older versions answer 410), :meth:`drop_watches` (cut streams, or end them
cleanly), :meth:`fail` (answer the next matching requests with 409/429/500/...). Every
request is recorded in :attr:`requests`; :meth:`wait_request` waits for one (with a deadline).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import ipaddress
import json
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import trustme
import yaml
from aiohttp import web
from referencing import Registry, Resource

from deploy.kube.api import SERVICE_NAME_LABEL, KubeApi
from mlfe.clock import FakeClock, settle

K8S_VERSION = "1.33.0"  # schemas to validate against
ROLE_MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "role.yaml"
WAIT_S = 10.0

Obj = dict[str, Any]


# ---- schema validation (kubernetes-validate's bundled schemas) -------------------------------

_SCHEMA_FILES = {
    ("EndpointSlice", "discovery.k8s.io/v1"): "endpointslice-discovery-v1",
    ("EndpointSliceList", "discovery.k8s.io/v1"): "endpointslicelist-discovery-v1",
    ("Deployment", "apps/v1"): "deployment-apps-v1",
    ("Scale", "autoscaling/v1"): "scale-autoscaling-v1",
    ("Lease", "coordination.k8s.io/v1"): "lease-coordination-v1",
    ("Secret", "v1"): "secret-v1",
    ("SecretList", "v1"): "secretlist-v1",
    ("LeaseList", "coordination.k8s.io/v1"): "leaselist-coordination-v1",
    ("Status", "v1"): "status-meta-v1",
    ("WatchEvent", "v1"): "watchevent-meta-v1",
}


def _schema_dir() -> Any:
    return files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"


@cache
def _registry() -> Registry[Any]:
    defs = json.loads((_schema_dir() / "_definitions.json").read_text())
    registry: Registry[Any] = Resource.from_contents(defs) @ Registry()
    return registry


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((_schema_dir() / f"{name}.json").read_text())
    registry = Resource.from_contents(schema) @ _registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_errors(obj: Mapping[str, Any], kind: str | None = None,
                  api_version: str | None = None) -> list[str]:
    """Why ``obj`` is not a valid Kubernetes object (strict); empty when it is."""
    key = (kind or obj.get("kind", ""), api_version or obj.get("apiVersion", ""))
    name = _SCHEMA_FILES.get(key)
    if name is None:
        return [f"no schema for {key}"]
    return [f"{key[0]} {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _validator(name).iter_errors(obj)]


# ---- RBAC: the repo's own Role ----------------------------------------------------------------


def manifest_rules(path: Path = ROLE_MANIFEST) -> list[Obj]:
    """The rules of the Role in the router's manifest (what a cluster would grant mlfe)."""
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "Role":
            rules: list[Obj] = doc["rules"]
            return rules
    raise ValueError(f"{path}: no Role")


def allowed(rules: Iterable[Mapping[str, Any]], group: str, resource: str, verb: str,
            name: str | None) -> bool:
    """RBAC's rule: some rule names the group, the resource and the verb (and, if it lists
    resourceNames, the object's name; a list or a create has no name)."""
    for rule in rules:
        if (group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])) and \
           (resource in rule.get("resources", []) or "*" in rule.get("resources", [])) and \
           (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])):
            names = rule.get("resourceNames")
            if not names or (name is not None and name in names):
                return True
    return False


# ---- helpers -------------------------------------------------------------------------------


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str, kind: str | None = None,
                name: str | None = None) -> Obj:
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "message": message, "reason": reason, "code": code}
    if kind is not None:
        body["details"] = {"kind": kind, **({"name": name} if name else {})}
    return body


class ApiStatus(Exception):
    def __init__(self, code: int, reason: str, message: str, kind: str | None = None,
                 name: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.body = status_body(code, reason, message, kind, name)
        self.code = code
        self.retry_after = retry_after


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(target: Obj, ops: list[Obj]) -> Obj:
    """RFC 6902 for the object shapes here (add/replace/remove/test on dict paths)."""
    out = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = out
        for p in parts[:-1]:
            parent = parent[p]
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if op["op"] == "replace" and last not in parent:
                raise ApiStatus(422, "Invalid", f"replace: missing path {op['path']}")
            parent[last] = op["value"]
        elif op["op"] == "remove":
            parent.pop(last)
        elif op["op"] == "test":
            if parent.get(last) != op["value"]:
                raise ApiStatus(422, "Invalid", f"test failed at {op['path']}")
        else:
            raise ApiStatus(422, "Invalid", f"unsupported op {op['op']}")
    return out


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = re.split(r"==?", term, maxsplit=1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def ep(ip: str, ready: bool | None = True, *, serving: bool | None = None,
       terminating: bool | None = None, pod: str | None = None) -> Obj:
    """One EndpointSlice endpoint; ``ready=None`` leaves the condition out (means ready)."""
    conditions: Obj = {}
    for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            conditions[key] = value
    out: Obj = {"addresses": [ip], "conditions": conditions}
    if pod is not None:
        out["targetRef"] = {"kind": "Pod", "name": pod}
    return out


# ---- the server ----------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    status: int = 0
    # What RBAC saw: the verb, the API group and resource, the object's name (or the name a
    # list or watch was narrowed to); empty for requests outside the served resources.
    verb: str = ""
    group: str = ""
    resource: str = ""
    name: str | None = None

    @property
    def watch(self) -> bool:
        return self.query.get("watch", "").lower() in ("true", "1", "t")


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    watch: bool | None
    retry_after: int | None
    reason: str


@dataclass(eq=False)
class Watcher:
    resource: str
    namespace: str
    selector: str
    name: str | None = None  # a fieldSelector on metadata.name
    bookmarks: bool = False  # allowWatchBookmarks
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


_DROP, _END = object(), object()

_ROUTES = [
    # (regex, api group, resource)
    (re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/endpointslices$"),
     "discovery.k8s.io", "endpointslices"),
    (re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)$"),
     "apps", "deployments"),
    (re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)/scale$"),
     "apps", "deployments/scale"),
    (re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/leases$"),
     "coordination.k8s.io", "leases"),
    (re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/leases/(?P<name>[^/]+)$"),
     "coordination.k8s.io", "leases"),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets$"), "", "secrets"),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets/(?P<name>[^/]+)$"), "", "secrets"),
]


def field_name(query: Mapping[str, str]) -> str | None:
    """The name a ``fieldSelector=metadata.name=X`` narrows a list or watch to (RBAC then
    checks it against ``resourceNames``, as kube-apiserver does)."""
    for term in (query.get("fieldSelector") or "").split(","):
        key, _, value = term.partition("=")
        if key.strip() == "metadata.name" and value:
            return value.lstrip("=").strip()
    return None


class FakeKubeApi:
    def __init__(self, tmp_path: Path, *, token: str = "sa-token-1",
                 rules: Iterable[Mapping[str, Any]] | None = None, history: int = 1000,
                 roles: Mapping[str, Iterable[Mapping[str, Any]]] | None = None,
                 allow_loopback: bool = False) -> None:
        self.tmp_path = tmp_path
        # Unlike the real server: slices may name 127.0.0.1, for tests whose replicas and
        # router pods all run on loopback (each replica on its own port).
        self.allow_loopback = allow_loopback
        self.token = token
        self.rules = [dict(r) for r in (manifest_rules() if rules is None else rules)]
        # Namespaced Roles, as RBAC has them: with ``roles``, a request in a namespace that has
        # no Role here is 403 (without, ``rules`` apply in every namespace).
        self.roles = None if roles is None else {
            ns: [dict(r) for r in rs] for ns, rs in roles.items()}
        self.history = history
        self.ca = trustme.CA()
        self.ca_file = tmp_path / "fake-kube-ca.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.objects: dict[tuple[str, str, str], Obj] = {}  # (resource, namespace, name)
        self.rv = 1000
        self.compacted = self.rv  # a watch may resume from this version or later
        self.log: list[tuple[int, str, str, str, Obj]] = []  # (rv, resource, ns, type, obj)
        self.watchers: set[Watcher] = set()
        self.watches_opened = 0
        self.requests: list[Seen] = []
        self.faults: list[Fault] = []
        self.invalid: list[str] = []
        # Called with each request before it is served: lets a test change the cluster "in
        # between" two calls of the code under test.
        self.before: Callable[[Seen], None] | None = None
        self._request_seen = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for w in list(self.watchers):
            w.queue.put_nowait(_END)
        if self._runner is not None:
            await self._runner.cleanup()

    def service_account(self, namespace: str = "mlfe") -> tuple[Path, dict[str, str]]:
        """A service-account directory and the environment a pod would see."""
        sa = self.tmp_path / "serviceaccount"
        sa.mkdir(exist_ok=True)
        (sa / "token").write_text(self.token)
        (sa / "ca.crt").write_bytes(self.ca_file.read_bytes())
        (sa / "namespace").write_text(namespace)
        return sa, {"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                    "KUBERNETES_SERVICE_PORT": str(self.port)}

    def kubeconfig(self, namespace: str = "mlfe") -> Path:
        path = self.tmp_path / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {
                "server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {
                "cluster": "fake", "user": "fake", "namespace": namespace}}],
        }))
        return path

    # ---- test control: cluster state ------------------------------------------------------------

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _store(self, resource: str, ns: str, obj: Obj, event: str) -> Obj:
        meta = obj["metadata"]
        key = (resource, ns, meta["name"])
        old = self.objects.get(key)
        old_labels = (old["metadata"].get("labels") or {}) if old is not None else None
        if event == "DELETED":
            self.objects.pop(key, None)
            meta["resourceVersion"] = self._next_rv()
        else:
            meta["resourceVersion"] = self._next_rv()
            self.objects[key] = obj
        self.log.append((self.rv, resource, ns, event, copy.deepcopy(obj)))
        if len(self.log) > self.history:
            dropped = self.log[: len(self.log) - self.history]
            self.compacted = dropped[-1][0]
            del self.log[: len(dropped)]
        labels = meta.get("labels") or {}
        for w in self.watchers:
            if w.resource != resource or w.namespace != ns or w.name not in (None, meta["name"]):
                continue
            if selector_matches(w.selector, labels):
                w.queue.put_nowait((event, copy.deepcopy(obj)))
            elif old_labels is not None and selector_matches(w.selector, old_labels):
                # It left the selector: to this watch it is gone (as the real server says it).
                w.queue.put_nowait(("DELETED", copy.deepcopy(obj)))
        return obj

    def _new_meta(self, name: str, ns: str, labels: Mapping[str, str] | None = None) -> Obj:
        meta: Obj = {"name": name, "namespace": ns, "uid": str(uuid.uuid4()),
                     "creationTimestamp": now_rfc3339(), "generation": 1}
        if labels:
            meta["labels"] = dict(labels)
        return meta

    def put_slice(self, namespace: str, name: str, service: str, endpoints: Iterable[Obj],
                  ports: Iterable[tuple[str | None, int]] = (("http", 8000),),
                  address_type: str = "IPv4") -> str:
        """Create or replace an EndpointSlice of ``service``; returns its resourceVersion."""
        eps = [copy.deepcopy(e) for e in endpoints]
        for e in eps:
            for a in e["addresses"]:
                ip = ipaddress.ip_address(a)
                if (ip.is_loopback and not self.allow_loopback) or ip.is_link_local:
                    raise ValueError(f"{a}: may not be in the loopback or link-local range")
        key = ("endpointslices", namespace, name)
        old = self.objects.get(key)
        meta = copy.deepcopy(old["metadata"]) if old else self._new_meta(
            name, namespace, {SERVICE_NAME_LABEL: service,
                              "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"})
        if old:
            meta["generation"] += 1
        obj: Obj = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": meta, "addressType": address_type, "endpoints": eps,
                    "ports": [{**({"name": n} if n is not None else {}), "port": p,
                               "protocol": "TCP"} for n, p in ports]}
        self._store("endpointslices", namespace, obj, "MODIFIED" if old else "ADDED")
        return str(meta["resourceVersion"])

    def delete_slice(self, namespace: str, name: str) -> None:
        obj = self.objects[("endpointslices", namespace, name)]
        self._store("endpointslices", namespace, copy.deepcopy(obj), "DELETED")

    def put_deployment(self, namespace: str, name: str, replicas: int = 1) -> Obj:
        labels = {"app": name}
        obj: Obj = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": self._new_meta(name, namespace, labels),
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": "model", "image": "mlfe:test"}]}}},
            "status": {"replicas": replicas, "observedGeneration": 1},
        }
        return self._store("deployments", namespace, obj, "ADDED")

    def deployment(self, namespace: str, name: str) -> Obj:
        return self.objects[("deployments", namespace, name)]

    def scale_by_hand(self, namespace: str, name: str, replicas: int) -> None:
        """What `kubectl scale` does: another writer changes spec.replicas."""
        self._set_replicas(namespace, name, replicas)

    def _set_replicas(self, namespace: str, name: str, replicas: int) -> Obj:
        dep = copy.deepcopy(self.deployment(namespace, name))
        dep["spec"]["replicas"] = replicas
        dep["metadata"]["generation"] += 1
        dep["status"] = {"replicas": replicas, "observedGeneration": dep["metadata"]["generation"]}
        return self._store("deployments", namespace, dep, "MODIFIED")

    def lease(self, namespace: str, name: str) -> Obj | None:
        return self.objects.get(("leases", namespace, name))

    def put_lease(self, namespace: str, name: str, spec: Obj) -> Obj:
        """Another writer sets the Lease's spec (e.g. a third candidate takes it)."""
        old = self.lease(namespace, name)
        meta = copy.deepcopy(old["metadata"]) if old else self._new_meta(name, namespace)
        obj: Obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": meta, "spec": copy.deepcopy(spec)}
        return self._store("leases", namespace, obj, "MODIFIED" if old else "ADDED")

    def put_secret(self, namespace: str, name: str, files: Mapping[str, bytes]) -> Obj:
        """Create or replace a Secret whose data are ``files`` (what `kubectl apply` does)."""
        old = self.objects.get(("secrets", namespace, name))
        meta = copy.deepcopy(old["metadata"]) if old else self._new_meta(name, namespace)
        meta.pop("generation", None)
        obj: Obj = {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
                    "data": {k: base64.b64encode(v).decode() for k, v in files.items()}}
        return self._store("secrets", namespace, obj, "MODIFIED" if old else "ADDED")

    def secret(self, namespace: str, name: str) -> dict[str, bytes]:
        """A Secret's data, decoded."""
        obj = self.objects[("secrets", namespace, name)]
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def relabel(self, resource: str, namespace: str, name: str, labels: Mapping[str, str]) -> None:
        """Replace an object's labels (a watch whose selector it leaves sees it DELETED)."""
        obj = copy.deepcopy(self.objects[(resource, namespace, name)])
        obj["metadata"]["labels"] = dict(labels)
        self._store(resource, namespace, obj, "MODIFIED")

    def bookmark(self) -> int:
        """A BOOKMARK event (the current resourceVersion, no object) to every watch that asked
        for them, as the real server sends them now and then; returns how many got one."""
        kinds = {"endpointslices": ("discovery.k8s.io/v1", "EndpointSlice"),
                 "secrets": ("v1", "Secret"), "leases": ("coordination.k8s.io/v1", "Lease")}
        sent = 0
        for w in self.watchers:
            if w.bookmarks:
                api_version, kind = kinds[w.resource]
                w.queue.put_nowait(("BOOKMARK", {"apiVersion": api_version, "kind": kind,
                                                 "metadata": {"resourceVersion": str(self.rv)}}))
                sent += 1
        return sent

    # ---- test control: faults -----------------------------------------------------------------

    def compact(self) -> None:
        """Forget the event log: a watch from any older version now gets 410 Expired."""
        self.log.clear()
        self.compacted = self.rv

    def drop_watches(self, *, clean: bool = False) -> int:
        """Cut every open watch stream (or, ``clean``, end it as a server timeout does)."""
        for w in self.watchers:
            w.queue.put_nowait(_END if clean else _DROP)
        return len(self.watchers)

    def fail(self, method: str, path: str, status: int, *, times: int = 1,
             watch: bool | None = None, retry_after: int | None = None,
             reason: str | None = None) -> None:
        """Answer the next ``times`` requests whose path matches the regex ``path`` with a
        ``status`` Status (``watch``: only watches / only non-watches)."""
        default = {409: "Conflict", 410: "Expired", 429: "TooManyRequests",
                   500: "InternalError", 503: "ServiceUnavailable"}.get(status, "Failure")
        self.faults.append(Fault(method.upper(), re.compile(path), status, times, watch,
                                 retry_after, reason or default))

    # ---- test observation -----------------------------------------------------------------------

    def seen(self, method: str | None = None, path: str | None = None,
             watch: bool | None = None) -> list[Seen]:
        return [r for r in self.requests
                if (method is None or r.method == method)
                and (path is None or re.search(path, r.path))
                and (watch is None or r.watch == watch)]

    async def wait_request(self, predicate: Callable[[Seen], bool], *, after: int = 0,
                           within: float = WAIT_S) -> Seen:
        """The first recorded request (from index ``after``) matching ``predicate``."""
        async with asyncio.timeout(within):
            while True:
                for r in self.requests[after:]:
                    if predicate(r):
                        return r
                self._request_seen.clear()
                await self._request_seen.wait()

    async def wait_watching(self, n: int = 1, within: float = WAIT_S) -> None:
        """Until ``n`` watch streams have been opened in all, and one is open."""
        async with asyncio.timeout(within):
            while self.watches_opened < n or not self.watchers:
                self._request_seen.clear()
                await self._request_seen.wait()

    # ---- HTTP ---------------------------------------------------------------------------------

    def _emit(self, obj: Obj) -> Obj:
        for err in schema_errors(obj):
            self.invalid.append(err)
        return obj

    def _json(self, obj: Obj, status: int = 200) -> web.Response:
        return web.json_response(self._emit(obj), status=status)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        seen = Seen(request.method, request.path, dict(request.query),
                    request.headers.get("Content-Type", ""), body)
        self.requests.append(seen)
        self._request_seen.set()
        try:
            if self.before is not None:
                self.before(seen)
            resp = await self._serve(request, seen)
        except ApiStatus as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
            resp = web.json_response(self._emit(e.body), status=e.code, headers=headers)
        seen.status = resp.status
        return resp

    async def _serve(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise ApiStatus(401, "Unauthorized", "Unauthorized")
        for fault in self.faults:
            if fault.times > 0 and fault.method == seen.method and fault.path.search(seen.path) \
                    and fault.watch in (None, seen.watch):
                fault.times -= 1
                raise ApiStatus(fault.status, fault.reason, f"injected {fault.status}",
                                retry_after=fault.retry_after)
        route = next(((m, g, r) for p, g, r in _ROUTES if (m := p.match(request.path))), None)
        if route is None:
            raise ApiStatus(404, "NotFound", "the server could not find the requested resource")
        m, group, resource = route
        ns, name = m.group("ns"), m.groupdict().get("name")
        verb = {"GET": "get" if name else ("watch" if seen.watch else "list"), "POST": "create",
                "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(seen.method, "")
        seen.verb, seen.group, seen.resource = verb, group, resource
        seen.name = name or (field_name(seen.query) if verb in ("list", "watch") else None)
        rules = self.rules if self.roles is None else self.roles.get(ns, [])
        if not allowed(rules, group, resource, verb, seen.name):
            raise ApiStatus(403, "Forbidden", (
                f'{resource} "{name or ""}" is forbidden: User "system:serviceaccount:{ns}:mlfe" '
                f'cannot {verb} resource "{resource}" in API group "{group}" in the namespace "{ns}"'),
                kind=resource.split("/")[0], name=name)
        if resource in ("endpointslices", "secrets", "leases") and verb in ("list", "watch"):
            if verb == "watch":
                return await self._watch(request, seen, ns, resource)
            return self._list(seen, ns, resource)
        if resource == "deployments/scale" and name:
            return self._scale(seen, ns, name)
        if resource == "deployments" and name:
            return self._deployment(seen, ns, name)
        if resource == "leases":
            return self._lease(seen, ns, name)
        if resource == "secrets" and name:
            return self._secret(seen, ns, name)
        raise ApiStatus(405, "MethodNotAllowed", f"{seen.method} is not supported here")

    # ---- EndpointSlices ---------------------------------------------------------------------------

    def _matching(self, resource: str, ns: str, selector: str,
                  name: str | None = None) -> list[Obj]:
        return [o for (r, n, oname), o in sorted(self.objects.items())
                if r == resource and n == ns and name in (None, oname)
                and selector_matches(selector, o["metadata"].get("labels") or {})]

    def _list(self, seen: Seen, ns: str, resource: str) -> web.Response:
        """A list, in pages when asked (``limit``; ``continue`` names the last one's end)."""
        matching = self._matching(resource, ns, seen.query.get("labelSelector", ""),
                                  field_name(seen.query))
        start = int(seen.query.get("continue") or 0)
        limit = int(seen.query.get("limit") or 0)
        page = matching[start:start + limit] if limit > 0 else matching[start:]
        items = []
        for obj in page:
            item = copy.deepcopy(obj)
            item.pop("kind"), item.pop("apiVersion")  # list items carry neither
            items.append(item)
        meta: Obj = {"resourceVersion": str(self.rv)}
        if limit > 0 and start + limit < len(matching):
            meta["continue"] = str(start + limit)
            meta["remainingItemCount"] = len(matching) - start - limit
        api_version, kind = {"endpointslices": ("discovery.k8s.io/v1", "EndpointSliceList"),
                             "secrets": ("v1", "SecretList"),
                             "leases": ("coordination.k8s.io/v1", "LeaseList")}[resource]
        return self._json({"apiVersion": api_version, "kind": kind, "metadata": meta,
                           "items": items})

    async def _watch(self, request: web.Request, seen: Seen, ns: str,
                     resource: str) -> web.StreamResponse:
        selector = seen.query.get("labelSelector", "")
        name = field_name(seen.query)
        rv_param = seen.query.get("resourceVersion", "")
        timeout_s = float(seen.query.get("timeoutSeconds") or 1800)
        if rv_param and not rv_param.isdigit():
            raise ApiStatus(400, "BadRequest", f"invalid resourceVersion {rv_param!r}")
        w = Watcher(resource, ns, selector, name,
                    seen.query.get("allowWatchBookmarks", "").lower() in ("true", "1", "t"))
        gone = False
        if rv_param in ("", "0"):
            backlog = [("ADDED", o) for o in self._matching(resource, ns, selector, name)]
        elif int(rv_param) < self.compacted:
            gone, backlog = True, []
        else:
            since = int(rv_param)
            backlog = [(t, o) for v, r, n, t, o in self.log
                       if v > since and r == resource and n == ns
                       and name in (None, o["metadata"]["name"])
                       and selector_matches(selector, o["metadata"].get("labels") or {})]
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            if gone:
                status = status_body(410, "Expired",
                                     f"too old resource version: {rv_param} ({self.compacted})")
                await self._write_event(resp, "ERROR", status)
                await resp.write_eof()
                return resp
            self.watchers.add(w)
            self.watches_opened += 1
            self._request_seen.set()
            for kind, obj in backlog:
                await self._write_event(resp, kind, copy.deepcopy(obj))
            async with asyncio.timeout(timeout_s):
                while True:
                    item = await w.queue.get()
                    if item is _DROP:
                        assert request.transport is not None
                        request.transport.abort()  # the chunked body never ends: a cut stream
                        return resp
                    if item is _END:
                        break
                    await self._write_event(resp, *item)
        except TimeoutError:
            pass  # timeoutSeconds: the server ends the stream
        except (ConnectionError, RuntimeError):
            return resp  # the client went away
        finally:
            self.watchers.discard(w)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp

    async def _write_event(self, resp: web.StreamResponse, kind: str, obj: Obj) -> None:
        if kind == "BOOKMARK":  # only kind, apiVersion and metadata.resourceVersion: no schema
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            return
        event = {"type": kind, "object": self._emit(obj)}
        for err in schema_errors(event, "WatchEvent", "v1"):
            self.invalid.append(err)
        await resp.write(json.dumps(event).encode() + b"\n")

    # ---- Deployments and their scale -------------------------------------------------------------

    def _get_deployment(self, ns: str, name: str) -> Obj:
        dep = self.objects.get(("deployments", ns, name))
        if dep is None:
            raise ApiStatus(404, "NotFound", f'deployments.apps "{name}" not found',
                            kind="deployments", name=name)
        return dep

    def _scale_view(self, dep: Obj) -> Obj:
        meta = dep["metadata"]
        labels = dep["spec"]["selector"]["matchLabels"]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                   "creationTimestamp")},
                "spec": {"replicas": dep["spec"]["replicas"]},
                "status": {"replicas": dep["status"]["replicas"],
                           "selector": ",".join(f"{k}={v}" for k, v in labels.items())}}

    def _patched(self, seen: Seen, current: Obj) -> Obj:
        ctype = seen.content_type.split(";")[0].strip()
        if ctype == "application/json-patch+json":
            if not isinstance(seen.body, list):
                raise ApiStatus(400, "BadRequest", "a JSON patch must be a list")
            return json_patch(current, seen.body)
        if ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(seen.body, dict):
                raise ApiStatus(400, "BadRequest", "a merge patch must be an object")
            out: Obj = merge_patch(current, seen.body)
            return out
        raise ApiStatus(415, "UnsupportedMediaType", f"the body of the request was in an "
                        f"unknown format - accepted media types include: "
                        f"application/json-patch+json, application/merge-patch+json, "
                        f"application/apply-patch+yaml; got {ctype!r}")

    def _check_rv(self, wanted: Obj, current: Obj, what: str, name: str) -> None:
        rv = (wanted.get("metadata") or {}).get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise ApiStatus(409, "Conflict", (
                f'Operation cannot be fulfilled on {what} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again"),
                kind=what, name=name)

    def _scale(self, seen: Seen, ns: str, name: str) -> web.Response:
        dep = self._get_deployment(ns, name)
        view = self._scale_view(dep)
        if seen.method == "GET":
            return self._json(view)
        if seen.method == "PATCH":
            wanted = self._patched(seen, view)
        elif seen.method == "PUT":
            if not isinstance(seen.body, dict) or seen.body.get("kind") != "Scale":
                raise ApiStatus(400, "BadRequest", "expected a Scale")
            wanted = seen.body
        else:
            raise ApiStatus(405, "MethodNotAllowed", f"{seen.method} is not supported here")
        self._check_rv(wanted, view, "deployments.apps", name)
        replicas = (wanted.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiStatus(422, "Invalid", f'Scale.autoscaling "{name}" is invalid: '
                            f"spec.replicas: Invalid value: {replicas!r}: must be greater "
                            "than or equal to 0", kind="Scale", name=name)
        return self._json(self._scale_view(self._set_replicas(ns, name, replicas)))

    def _deployment(self, seen: Seen, ns: str, name: str) -> web.Response:
        dep = self._get_deployment(ns, name)
        if seen.method == "GET":
            return self._json(dep)
        if seen.method == "PATCH":
            wanted = self._patched(seen, dep)
        elif seen.method == "PUT" and isinstance(seen.body, dict):
            wanted = seen.body
        else:
            raise ApiStatus(405, "MethodNotAllowed", f"{seen.method} is not supported here")
        self._check_rv(wanted, dep, "deployments.apps", name)
        new = copy.deepcopy(dep)
        new["spec"] = wanted["spec"]
        new["metadata"]["generation"] += 1
        return self._json(self._store("deployments", ns, new, "MODIFIED"))

    # ---- Leases -----------------------------------------------------------------------------------

    def _lease(self, seen: Seen, ns: str, name: str | None) -> web.Response:
        if seen.method == "POST" and name is None:
            body = seen.body
            if not isinstance(body, dict) or body.get("kind") != "Lease":
                raise ApiStatus(400, "BadRequest", "expected a Lease")
            errors = schema_errors(body)
            if errors:
                raise ApiStatus(422, "Invalid", "; ".join(errors))
            lname = body["metadata"]["name"]
            if self.lease(ns, lname) is not None:
                raise ApiStatus(409, "AlreadyExists", f'leases.coordination.k8s.io "{lname}" '
                                "already exists", kind="leases", name=lname)
            meta = self._new_meta(lname, ns)
            del meta["generation"]
            if body["metadata"].get("annotations"):
                meta["annotations"] = dict(body["metadata"]["annotations"])
            obj: Obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": meta, "spec": body.get("spec") or {}}
            return self._json(self._store("leases", ns, obj, "ADDED"), status=201)
        if name is None:
            raise ApiStatus(405, "MethodNotAllowed", f"{seen.method} is not supported here")
        current = self.lease(ns, name)
        if current is None:
            raise ApiStatus(404, "NotFound", f'leases.coordination.k8s.io "{name}" not found',
                            kind="leases", name=name)
        if seen.method == "GET":
            return self._json(current)
        if seen.method == "PUT" and isinstance(seen.body, dict):
            errors = schema_errors(seen.body)
            if errors:
                raise ApiStatus(422, "Invalid", "; ".join(errors))
            self._check_rv(seen.body, current, "leases.coordination.k8s.io", name)
            new = copy.deepcopy(current)
            new["spec"] = seen.body.get("spec") or {}
            annotations = (seen.body.get("metadata") or {}).get("annotations")
            new["metadata"].pop("annotations", None)
            if annotations:
                new["metadata"]["annotations"] = dict(annotations)
            return self._json(self._store("leases", ns, new, "MODIFIED"))
        raise ApiStatus(405, "MethodNotAllowed", f"{seen.method} is not supported here")



    # ---- Secrets ----------------------------------------------------------------------------------

    def _secret(self, seen: Seen, ns: str, name: str) -> web.Response:
        current = self.objects.get(("secrets", ns, name))
        if current is None:
            raise ApiStatus(404, "NotFound", f'secrets "{name}" not found', kind="secrets",
                            name=name)
        if seen.method == "GET":
            return self._json(current)
        if seen.method == "PUT" and isinstance(seen.body, dict):
            errors = schema_errors(seen.body)
            if errors:
                raise ApiStatus(422, "Invalid", "; ".join(errors))
            self._check_rv(seen.body, current, "secrets", name)
            new = copy.deepcopy(current)
            new["data"] = seen.body.get("data") or {}
            return self._json(self._store("secrets", ns, new, "MODIFIED"))
        raise ApiStatus(405, "MethodNotAllowed", f"{seen.method} is not supported here")


# ---- test helpers ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_cluster(tmp_path: Path, **kwargs: Any) -> AsyncIterator[FakeKubeApi]:
    """A running fake API server; on the way out, every object it emitted must have been valid."""
    fake = FakeKubeApi(tmp_path, **kwargs)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()
    assert not fake.invalid, fake.invalid


async def connect_in_cluster(fake: FakeKubeApi, namespace: str = "mlfe") -> KubeApi:
    """The adapter as a pod would build it: service-account files and KUBERNETES_SERVICE_*."""
    sa, env = fake.service_account(namespace)
    return await KubeApi.connect(service_account_dir=sa, environ=env)


class WatchedClock(FakeClock):
    """A FakeClock that records every real wait, so a test can see a loop park in a backoff."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__(start)
        self.sleeps: list[float] = []
        self._slept = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.sleeps.append(seconds)
            self._slept.set()
        await super().sleep(seconds)

    async def wait_sleeps(self, n: int, within: float = WAIT_S) -> float:
        """Until ``n`` waits have begun; returns the length of the last one."""
        async with asyncio.timeout(within):
            while len(self.sleeps) < n:
                self._slept.clear()
                await self._slept.wait()
        await settle()
        return self.sleeps[-1]


async def until(condition: Callable[[], bool], event: asyncio.Event | None = None,
                within: float = WAIT_S) -> None:
    """Poll ``condition`` (woken by ``event`` if given, else every loop turn) with a deadline."""
    async with asyncio.timeout(within):
        while not condition():
            if event is not None:
                event.clear()
                await event.wait()
            else:
                await asyncio.sleep(0)
