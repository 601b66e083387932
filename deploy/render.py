"""`mlfe render --target kubernetes`: the manifests of the router and of every model service.

The router's objects come from the static manifests in deploy/kubernetes/ (listed by its
kustomization.yaml), filled in from the config: the ConfigMap gets a cluster version of the config
in which every `entry_script` service becomes a `kubernetes: {namespace, deployment}` service;
the Deployment gets the image, a grace period that outlasts `router.drain_timeout_s` and a
checksum of the config; the Role is narrowed to the Deployments the router may scale. Each
`entry_script` service becomes a Deployment running `mlfe score-server` (azureml's
deployment settings: resources, liveness probe, replicas) and a ClusterIP Service whose
EndpointSlices tell the router which replicas are ready.

Keys never go in the ConfigMap. The Secret `mlfe-keys` (keys of every service and endpoint, the
token signing key, the admin token) is emitted only with `--generate-secret`, freshly generated
(keys set in the config are kept): rendering it again would rotate every key, so later renders
leave it out and the Secret in the cluster stays.

`--sidecar --deployment FILE` instead adds `mlfe sidecar` to an existing Deployment (below).

The image of the model Deployments (`--image`) is the user's: FROM the mlfe image, with the
config's directory copied to /var/azureml-app, so paths relative to the config file (entry
scripts, model dirs) are the same paths under /var/azureml-app.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import posixpath
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.config_file import load_config
from mlfe.config import NAME_RE, ConfigError, MlfeConfig, ServiceConfig, parse_config

Manifest = dict[str, Any]

MANIFEST_DIR = Path(__file__).resolve().parent / "kubernetes"
# Optional Prometheus Operator objects (`--monitor service|pod`).
MONITORS = {"service": "servicemonitor.yaml", "pod": "podmonitor.yaml"}
TARGETS = ("kubernetes",)

DEFAULT_NAMESPACE = "mlfe"
ROUTER = "mlfe-router"  # the router's Deployment, Service, ServiceAccount, Role, PDB
ROUTER_ADMIN = "mlfe-router-admin"
CONFIG_MAP = "mlfe-config"
KEYS_SECRET = "mlfe-keys"
TLS_SECRET = "mlfe-tls"  # kubernetes.io/tls, created by the user when router.tls is set

# The container's contract (deploy/kubernetes/deployment.yaml, Dockerfile).
SCORING_PORT = 8080
ADMIN_PORT = 8081
METRICS_PORT = 8082  # router.metrics_listen: GET /metrics alone, no token
CONFIG_DIR = PurePosixPath("/etc/mlfe")
STATE_DIR = PurePosixPath("/var/lib/mlfe")
TLS_DIR = PurePosixPath("/etc/mlfe-tls")
PRESTOP_SLEEP_S = 5
GRACE_MARGIN_S = 10

# Model replicas: azureml's inference server layout.
APP_ROOT = PurePosixPath("/var/azureml-app")
DEFAULT_MODEL_DIR = APP_ROOT / "model"
MODEL_PORT = 5001
# `mlfe score-server` finishes in-flight requests for up to this long after SIGTERM.
MODEL_SHUTDOWN_S = 60
APP_UID = 10001
GPU_RESOURCE = "nvidia.com/gpu"

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SECRET_FIELDS = ("primary_key", "secondary_key")


class RenderError(ConfigError):
    """The config is valid but cannot be rendered for the target; the message says why."""


@dataclass(frozen=True)
class RenderOptions:
    namespace: str = DEFAULT_NAMESPACE
    image: str | None = None  # the model replicas' image (the user's app, FROM mlfe)
    router_image: str | None = None  # default: mlfe:<version of this package>
    generate_secret: bool = False
    monitor: str | None = None  # "service" or "pod": a Prometheus Operator monitor (MONITORS)


def default_router_image() -> str:
    try:
        version = metadata.version("mlfe")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        version = "latest"
    return f"mlfe:{version}"


# ---- the static manifests ---------------------------------------------------------------------


def load_static_manifests(directory: Path = MANIFEST_DIR) -> list[Manifest]:
    """The router's objects, in the order of the kustomization's resources."""
    try:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text("utf-8"))
        docs: list[Manifest] = []
        for name in kustomization["resources"]:
            text = (directory / name).read_text("utf-8")
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    except OSError as e:
        raise RenderError(
            f"cannot read the router's manifests in {directory}: {e.strerror} "
            "(mlfe render needs a source checkout or an install that ships deploy/kubernetes/)"
        ) from None
    return docs


def monitor_objects(kind: str, namespace: str, directory: Path = MANIFEST_DIR) -> list[Manifest]:
    """The Prometheus Operator's ServiceMonitor (``service``) or PodMonitor (``pod``) of the
    router's metrics port, in ``namespace``."""
    path = directory / "monitoring" / MONITORS[kind]
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d]
    except OSError as e:
        raise RenderError(f"cannot read {path}: {e.strerror}") from None
    for d in docs:
        meta = d["metadata"]
        d["metadata"] = {"name": meta.pop("name"), "namespace": namespace, **meta}
    return docs


def _find(docs: Iterable[Manifest], kind: str, name: str) -> Manifest:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise RenderError(f"the static manifests have no {kind} {name}")


def _container(pod_spec: dict[str, Any], name: str, key: str = "containers") -> dict[str, Any]:
    for c in pod_spec.get(key, []):
        if c["name"] == name:
            found: dict[str, Any] = c
            return found
    raise RenderError(f"the static router Deployment has no {key} entry {name!r}")


# ---- the cluster config -----------------------------------------------------------------------


def _app_path(value: Path, base_dir: Path, key: str) -> PurePosixPath:
    """Where a path of the config (relative to the config file) is inside the image.

    Symlinks are not followed: the image holds the config's directory as it is copied."""
    path = PurePosixPath(posixpath.normpath(value.as_posix()))
    if path.is_absolute():
        if path.is_relative_to(APP_ROOT):
            return path  # already an image path
        if not path.is_relative_to(base_dir.as_posix()):
            raise RenderError(
                f"{key}: {str(value)!r} is outside the config file's directory ({base_dir}), "
                f"so it has no place under {APP_ROOT} in the image; give it relative to the "
                "config file"
            )
        path = path.relative_to(base_dir.as_posix())
    if path.parts and path.parts[0] == "..":
        raise RenderError(
            f"{key}: {str(value)!r} leaves the config file's directory, so it has no place "
            f"under {APP_ROOT} in the image"
        )
    return APP_ROOT / path


RENDERED_MIN_PODS = 2


def cluster_config(
    cfg: MlfeConfig, base_dir: Path, namespace: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The config the router runs with in the cluster, and extra files for its ConfigMap."""
    # What the user set, without None (every None is a default): load_config's path resolution
    # marks paths as set even where they are absent.
    out: dict[str, Any] = cfg.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    extra: dict[str, str] = {}

    router: dict[str, Any] = out.setdefault("router", {})
    router["listen"] = f"0.0.0.0:{SCORING_PORT}"
    router["admin_listen"] = f"0.0.0.0:{ADMIN_PORT}"
    router["metrics_listen"] = f"0.0.0.0:{METRICS_PORT}"
    router["state_dir"] = str(STATE_DIR)
    router.pop("data_dir", None)  # the default: <state_dir>/modeldata, on the pod's volume
    # A cluster's front end runs at least 2 pods (one can be lost or drained), unless the
    # config says otherwise; the self-scaler never goes below that.
    scaling: dict[str, Any] = router.setdefault("self_scaling", {})
    scaling.setdefault("min_pods", RENDERED_MIN_PODS)
    scaling["max_pods"] = max(scaling.get("max_pods", 1), scaling["min_pods"])
    if not router.get("token_issuers"):
        router.pop("token_issuers", None)
    if cfg.router.tls is not None:
        router["tls"] = {"cert_file": str(TLS_DIR / "tls.crt"),
                         "key_file": str(TLS_DIR / "tls.key")}
    for i, issuer in enumerate(cfg.router.token_issuers):
        if issuer.jwks_file is None:
            continue
        path = issuer.jwks_file if issuer.jwks_file.is_absolute() else base_dir / issuer.jwks_file
        try:
            extra[f"jwks-{i}.json"] = path.read_text("utf-8")
        except OSError as e:
            raise RenderError(
                f"router.token_issuers.{i}.jwks_file: cannot read {str(path)!r}: {e.strerror}"
            ) from None
        router["token_issuers"][i]["jwks_file"] = str(CONFIG_DIR / f"jwks-{i}.json")

    for name, svc in cfg.services.items():
        entry: dict[str, Any] = out["services"][name]
        for k in _SECRET_FIELDS:
            entry.pop(k, None)
        if svc.entry_script is not None:
            for k in ("entry_script", "model_dir", "environment_variables"):
                entry.pop(k, None)
            entry.pop("namespace", None)
            entry.pop("replica_server", None)
            entry["kubernetes"] = {"namespace": model_namespace(svc, namespace),
                                   "deployment": name}
    for name in cfg.endpoints:
        for k in _SECRET_FIELDS:
            out["endpoints"][name].pop(k, None)

    # The result must itself be a valid config: checked here rather than in a crash-looping pod.
    parse_config(out, "<rendered cluster config>")
    return out, extra


# ---- the Secret -------------------------------------------------------------------------------


def _generate_key() -> str:
    return secrets.token_urlsafe(32)  # the router's own key format (router/keystore.py)


def generated_secret_data(cfg: MlfeConfig) -> dict[str, str]:
    """Fresh keys for every service and endpoint (those set in the config are kept), a fresh
    ES256 signing key and admin token."""
    keys: dict[str, dict[str, str]] = {}
    owners = [*cfg.services.items(), *cfg.endpoints.items()]
    for name, owner in owners:
        keys[name] = {
            "primaryKey": owner.primary_key or _generate_key(),
            "secondaryKey": owner.secondary_key or _generate_key(),
        }
    signing_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "keys.json": json.dumps(keys, indent=2) + "\n",
        "signing-key.pem": signing_key.decode("ascii"),
        "admin-token": _generate_key(),
    }


# ---- model services ---------------------------------------------------------------------------


def cpu_quantity(cores: float) -> str:
    millis = max(1, math.ceil(round(cores * 1000, 6)))
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def memory_quantity(gb: float) -> str:
    mib = max(1, math.ceil(round(gb * 1024, 6)))
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def model_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "model"}


def replica_command(svc: ServiceConfig, script: PurePosixPath) -> list[str]:
    """The model container's command: mlfe's inference server, or Microsoft's (`replica_server:
    azureml`, which the image must have: `pip install 'mlfe[azureml]'`). azmlinfsrv listens on
    all interfaces of the pod, and reads AZUREML_MODEL_DIR and WORKER_COUNT from the env."""
    if svc.replica_server == "azureml":
        return ["azmlinfsrv", "--entry_script", str(script), "--port", str(MODEL_PORT)]
    return ["mlfe", "score-server", "--entry-script", str(script),
            "--host", "0.0.0.0", "--port", str(MODEL_PORT)]


def model_namespace(svc: ServiceConfig, default: str) -> str:
    """A service's own `namespace` (azureml's deploy parameter), else --namespace."""
    return svc.namespace or default


def model_objects(
    name: str, svc: ServiceConfig, base_dir: Path, namespace: str, image: str
) -> list[Manifest]:
    """The Deployment and ClusterIP Service of one `entry_script` service."""
    assert svc.entry_script is not None
    script = _app_path(svc.entry_script, base_dir, f"services.{name}.entry_script")
    model_dir = (
        DEFAULT_MODEL_DIR if svc.model_dir is None
        else _app_path(svc.model_dir, base_dir, f"services.{name}.model_dir")
    )
    selector = model_labels(name)
    labels = {**selector, "app.kubernetes.io/part-of": "mlfe",
              "app.kubernetes.io/managed-by": "mlfe"}
    metadata_ = {"name": name, "namespace": model_namespace(svc, namespace), "labels": labels}

    env = [
        {"name": "AZUREML_MODEL_DIR", "value": str(model_dir)},
        {"name": "WORKER_COUNT", "value": str(svc.replica_max_concurrent_requests)},
        *({"name": k, "value": v} for k, v in svc.environment_variables.items()
          if k not in ("AZUREML_MODEL_DIR", "WORKER_COUNT")),
    ]
    requests = {"cpu": cpu_quantity(svc.cpu_cores), "memory": memory_quantity(svc.memory_gb)}
    # Memory limit = request unless memory_gb_limit says more (predictable OOM behaviour); no
    # CPU limit unless cpu_cores_limit asks for one (no throttling by default).
    limits: dict[str, Any] = {"memory": memory_quantity(svc.memory_gb_limit or svc.memory_gb)}
    if svc.cpu_cores_limit is not None:
        limits["cpu"] = cpu_quantity(svc.cpu_cores_limit)
    if svc.gpu_cores > 0:
        limits[GPU_RESOURCE] = svc.gpu_cores

    def probe(initial_delay: int, success: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": "/", "port": "http", "scheme": "HTTP"},
            "initialDelaySeconds": initial_delay,
            "periodSeconds": svc.period_seconds,
            "timeoutSeconds": svc.timeout_seconds,
            "successThreshold": success,
            "failureThreshold": svc.failure_threshold,
        }

    container: dict[str, Any] = {
        "name": "model",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": replica_command(svc, script),
        "workingDir": str(APP_ROOT),
        "ports": [{"name": "http", "containerPort": MODEL_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        # azureml's liveness settings; Kubernetes requires successThreshold 1 on a liveness probe,
        # so success_threshold applies to readiness, which also starts at once (the server binds
        # only after init(), so it is not ready before that anyway).
        "livenessProbe": probe(svc.initial_delay_seconds, 1),
        "readinessProbe": probe(0, svc.success_threshold),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_S + MODEL_SHUTDOWN_S + GRACE_MARGIN_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": APP_UID,
            "runAsGroup": APP_UID,
            "fsGroup": APP_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if svc.gpu_cores > 0:
        # GPU node pools are commonly tainted so that only GPU workloads land there.
        pod_spec["tolerations"] = [
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        ]
    deployment: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": copy.deepcopy(metadata_),
        "spec": {
            # The starting size; the router's autoscaler owns it from then on (scale subresource).
            "replicas": svc.num_replicas or svc.autoscale_min_replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    service: Manifest = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": copy.deepcopy(metadata_),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": MODEL_PORT, "targetPort": "http",
                       "protocol": "TCP"}],
        },
    }
    return [deployment, service]


# ---- the router -------------------------------------------------------------------------------


def _scale_role(namespace: str, names: list[str], router_ns: str) -> list[Manifest]:
    """A Role and RoleBinding letting the router follow and scale Deployments of another
    namespace (`kubernetes:` services there)."""
    labels = {"app.kubernetes.io/name": "mlfe", "app.kubernetes.io/component": "router",
              "app.kubernetes.io/part-of": "mlfe"}
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": ROUTER, "namespace": namespace, "labels": labels},
            "rules": [
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["list", "watch"]},
                {"apiGroups": ["apps"], "resources": ["deployments/scale"],
                 "resourceNames": names, "verbs": ["get", "patch"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": ROUTER, "namespace": namespace, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROUTER},
            "subjects": [{"kind": "ServiceAccount", "name": ROUTER, "namespace": router_ns}],
        },
    ]


def router_objects(
    cfg: MlfeConfig, opts: RenderOptions, config_text: str, extra: dict[str, str],
    pods: int = RENDERED_MIN_PODS,
) -> list[Manifest]:
    """The router's objects; its Deployment starts with ``pods`` pods (the rendered
    `self_scaling.min_pods`: the self-scaler never goes below it, so neither does the start)."""
    ns = opts.namespace
    docs = copy.deepcopy(load_static_manifests())
    for d in docs:
        meta = d["metadata"]
        d["metadata"] = {"name": meta.pop("name"), "namespace": ns, **meta}
    for subject in _find(docs, "RoleBinding", ROUTER)["subjects"]:
        if subject["kind"] == "ServiceAccount":
            subject["namespace"] = ns

    # Scale only the Deployments this config names (and the router's own: self-scaling).
    targets: dict[str, set[str]] = {ns: {ROUTER}}
    for name, svc in cfg.services.items():
        if svc.entry_script is not None:
            targets.setdefault(model_namespace(svc, ns), set()).add(name)
        elif svc.kubernetes is not None:
            targets.setdefault(svc.kubernetes.namespace, set()).add(svc.kubernetes.deployment)
    for rule in _find(docs, "Role", ROUTER)["rules"]:
        if rule["resources"] == ["deployments/scale"]:
            rule["resourceNames"] = sorted(targets[ns])
    for other in sorted(targets.keys() - {ns}):
        docs.extend(_scale_role(other, sorted(targets[other]), ns))

    _find(docs, "ConfigMap", CONFIG_MAP)["data"] = {"config.yaml": config_text, **extra}

    secret = _find(docs, "Secret", KEYS_SECRET)
    if opts.generate_secret:
        secret["stringData"] = generated_secret_data(cfg)
    else:
        docs.remove(secret)

    image = opts.router_image or default_router_image()
    deployment = _find(docs, "Deployment", ROUTER)
    deployment["spec"]["replicas"] = pods
    template = deployment["spec"]["template"]
    pod = template["spec"]
    pod["terminationGracePeriodSeconds"] = math.ceil(
        PRESTOP_SLEEP_S + cfg.router.drain_timeout_s + GRACE_MARGIN_S
    )
    config_sum = hashlib.sha256(json.dumps(
        {"config.yaml": config_text, **extra}, sort_keys=True).encode()).hexdigest()
    template["metadata"].setdefault("annotations", {})["checksum/config"] = config_sum
    _container(pod, "seed-state", "initContainers")["image"] = image
    router = _container(pod, "router")
    router["image"] = image

    lb = _find(docs, "Service", ROUTER)
    if cfg.router.tls is not None:
        for probe in ("livenessProbe", "readinessProbe"):
            router[probe]["httpGet"]["scheme"] = "HTTPS"
        router["volumeMounts"].append(
            {"name": "tls", "mountPath": str(TLS_DIR), "readOnly": True})
        pod["volumes"].append({"name": "tls", "secret": {"secretName": TLS_SECRET}})
        lb["spec"]["ports"] = [
            {"name": "https", "port": 443, "targetPort": "scoring", "protocol": "TCP"}
        ]
    return docs


# ---- everything -------------------------------------------------------------------------------


def render_kubernetes(cfg: MlfeConfig, base_dir: Path, opts: RenderOptions) -> list[Manifest]:
    """Every object: the router's first, then each `entry_script` service's Deployment and
    Service."""
    if not _DNS_LABEL.match(opts.namespace):
        raise RenderError(
            f"--namespace: {opts.namespace!r} is not a Kubernetes namespace name (lowercase "
            "letters, digits and '-', at most 63, starting and ending with a letter or digit)"
        )
    models = [n for n, s in cfg.services.items() if s.entry_script is not None]
    for name in models:
        if name in (ROUTER, ROUTER_ADMIN):
            raise RenderError(
                f"services.{name}: the name is taken by the router's own objects; rename it"
            )
    if models and not opts.image:
        raise RenderError(
            f"services.{models[0]}: entry_script services run in an image of yours: give it "
            "with --image (FROM the mlfe image, the config's directory copied to "
            f"{APP_ROOT}; see deploy/kubernetes/README.md)"
        )
    config, extra = cluster_config(cfg, base_dir, opts.namespace)
    config_text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    docs = router_objects(cfg, opts, config_text, extra,
                          pods=int(config["router"]["self_scaling"]["min_pods"]))
    if opts.monitor is not None:
        docs.extend(monitor_objects(opts.monitor, opts.namespace))
    for name in models:
        assert opts.image is not None
        docs.extend(model_objects(name, cfg.services[name], base_dir, opts.namespace, opts.image))
    return docs


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # shared label dicts are written out, never as &anchors


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar(
        "tag:yaml.org,2002:str", data, style="|" if "\n" in data else None
    )


_Dumper.add_representer(str, _represent_str)


def dump_documents(docs: list[Manifest], header: str = "") -> str:
    body = yaml.dump_all(
        docs, Dumper=_Dumper, sort_keys=False, explicit_start=True, default_flow_style=False
    )
    return header + body


def _is_model(doc: Manifest) -> bool:
    labels = doc["metadata"].get("labels", {})
    return bool(labels.get("app.kubernetes.io/component") == "model")


def write_output(docs: list[Manifest], output: str, header: str) -> list[Path]:
    """`-`: everything to stdout. A directory: router.yaml, secret.yaml (owner-only, with
    --generate-secret), monitoring.yaml (with --monitor) and one service-<name>.yaml per model
    service."""
    if output == "-":
        sys.stdout.write(dump_documents(docs, header))
        return []
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise RenderError(f"--output: {output!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Manifest]] = {"router.yaml": []}
    for d in docs:
        if d["kind"] == "Secret":
            files.setdefault("secret.yaml", []).append(d)
        elif d["apiVersion"].startswith("monitoring.coreos.com/"):
            files.setdefault("monitoring.yaml", []).append(d)  # needs the Operator's CRDs
        elif _is_model(d):
            files.setdefault(f"service-{d['metadata']['name']}.yaml", []).append(d)
        else:
            files["router.yaml"].append(d)
    written = []
    for filename, group in files.items():
        path = out / filename
        if filename == "secret.yaml":
            path.touch(mode=0o600)
            path.chmod(0o600)
        path.write_text(dump_documents(group, header), encoding="utf-8")
        written.append(path)
    return written


def _known_target(target: str) -> bool:
    if target in TARGETS:
        return True
    print(f"mlfe: --target: unknown target {target!r} (known: {', '.join(TARGETS)})",
          file=sys.stderr)
    return False


def run_render(
    config: str,
    target: str = "kubernetes",
    namespace: str | None = None,
    image: str | None = None,
    router_image: str | None = None,
    output: str | None = None,
    generate_secret: bool = False,
    monitor: str | None = None,
) -> int:
    """The `mlfe render` command: 0, or 2 with the reason on stderr."""
    if not _known_target(target):
        return 2
    opts = RenderOptions(
        namespace=namespace or DEFAULT_NAMESPACE,
        image=image,
        router_image=router_image,
        generate_secret=generate_secret,
        monitor=monitor,
    )
    try:
        cfg = load_config(config)
        base_dir = Path(config).resolve().parent
        docs = render_kubernetes(cfg, base_dir, opts)
        header = (f"# Rendered by `mlfe render --target {target}` from {config}, "
                  f"namespace {opts.namespace}.\n")
        written = write_output(docs, output or "-", header)
    except ConfigError as e:
        print(f"mlfe: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"mlfe: wrote {path}", file=sys.stderr)
    if not generate_secret:
        with_keys = [
            f"{kind}.{name}"
            for kind, owners in (("services", cfg.services), ("endpoints", cfg.endpoints))
            for name, owner in owners.items()
            if owner.primary_key is not None or owner.secondary_key is not None
        ]
        if with_keys:
            print(f"mlfe: note: the keys set for {', '.join(with_keys)} are not in the "
                  f"ConfigMap; they reach the router only through the Secret {KEYS_SECRET} "
                  "(--generate-secret)", file=sys.stderr)
    return 0


# ---- mlfe as a sidecar of an existing Deployment ---------------------------------------------
#
# `mlfe render --target kubernetes --sidecar --deployment FILE`: the file's Deployment comes back
# with an `mlfe sidecar` container in its pod (deploy/sidecar.py), in front of the model container
# on the pod's loopback, and the pod's Service pointed at mlfe's port. Everything else in the file
# passes through unchanged (comments are not kept). Rendering an already rendered file again
# replaces mlfe's container, keeping the MLFE_* variables added to it by hand.

SIDECAR = "mlfe"  # the container's name
SIDECAR_PORT_NAME = "mlfe-scoring"
SIDECAR_KEYS_DIR = PurePosixPath("/etc/mlfe-keys")
SIDECAR_VOLUMES = {"keys": "mlfe-keys", "state": "mlfe-state", "tmp": "mlfe-tmp"}
SIDECAR_DRAIN_S = 30  # router.drain_timeout_s's default (MLFE_DRAIN_TIMEOUT_S)
# A dev-test sidecar's share of the pod: the router idles at ~50 MiB.
SIDECAR_RESOURCES = {"requests": {"cpu": "100m", "memory": "96Mi"},
                     "limits": {"memory": "256Mi"}}
# The model's liveness probe -> the sidecar's probe of the model (readiness follows it).
_PROBE_ENV = {
    "periodSeconds": "MLFE_PERIOD_SECONDS",
    "initialDelaySeconds": "MLFE_INITIAL_DELAY_SECONDS",
    "timeoutSeconds": "MLFE_TIMEOUT_SECONDS",
    "failureThreshold": "MLFE_FAILURE_THRESHOLD",
}


@dataclass(frozen=True)
class SidecarOptions:
    image: str | None = None  # the mlfe image (default: mlfe:<version of this package>)
    namespace: str | None = None  # default: the Deployment's own
    service_name: str | None = None  # default: the Deployment's name
    model_container: str | None = None  # default: the only other container, or the one on 5001
    generate_secret: bool = False


def sidecar_secret_name(deployment: str) -> str:
    return f"{deployment}-mlfe-keys"


def _port_numbers(container: dict[str, Any]) -> list[int]:
    return [int(p["containerPort"]) for p in container.get("ports") or []
            if p.get("protocol", "TCP") == "TCP"]


def _free_port(preferred: int, taken: set[int]) -> int:
    port = preferred
    while port in taken:
        port += 10
    taken.add(port)
    return port


def _model_container(name: str, containers: list[dict[str, Any]],
                     wanted: str | None) -> dict[str, Any]:
    others = [c for c in containers if c.get("name") != SIDECAR]
    if wanted is not None:
        for c in others:
            if c.get("name") == wanted:
                return c
        raise RenderError(f"--model-container: Deployment {name} has no container {wanted!r} "
                          f"(it has {', '.join(repr(c.get('name')) for c in others)})")
    if len(others) == 1:
        return others[0]
    on_model_port = [c for c in others if MODEL_PORT in _port_numbers(c)]
    if len(on_model_port) == 1:
        return on_model_port[0]
    raise RenderError(
        f"Deployment {name} has containers {', '.join(repr(c.get('name')) for c in others)}: "
        "name the model's with --model-container"
    )


def _upstream_port(model: dict[str, Any]) -> int:
    ports = _port_numbers(model)
    if MODEL_PORT in ports or not ports:
        return MODEL_PORT
    for p in model.get("ports") or []:
        if p.get("name") == "http":
            return int(p["containerPort"])
    return ports[0]


def _literal_env(container: dict[str, Any], name: str) -> str | None:
    for e in container.get("env") or []:
        if e.get("name") == name and "value" in e:
            return str(e["value"])
    return None


def _selects(service: Manifest, labels: dict[str, str], namespace: str | None) -> bool:
    selector = (service.get("spec") or {}).get("selector") or {}
    return (bool(selector) and service["metadata"].get("namespace") == namespace
            and all(labels.get(k) == v for k, v in selector.items()))


def _point_service(service: Manifest, model: dict[str, Any], upstream: int) -> None:
    """The Service's ports that reached the model reach mlfe instead."""
    model_ports = {upstream, *_port_numbers(model),
                   *(p["name"] for p in model.get("ports") or [] if p.get("name"))}
    ports = service["spec"].get("ports") or []
    hits = [p for p in ports if p.get("targetPort", p.get("port")) in model_ports
            or p.get("targetPort") == SIDECAR_PORT_NAME]
    if not hits and len(ports) == 1:
        hits = ports
    if not hits:
        raise RenderError(
            f"Service {service['metadata']['name']}: none of its ports targets the model "
            f"container's ports ({', '.join(map(str, sorted(map(str, model_ports))))}), so "
            "which one should reach mlfe is not clear; point it at the port named "
            f"{SIDECAR_PORT_NAME!r} yourself"
        )
    for p in hits:
        p["targetPort"] = SIDECAR_PORT_NAME


def sidecar_container(
    deployment: str, model: dict[str, Any], service_name: str, image: str,
    scoring_port: int, admin_port: int, upstream: int, previous: dict[str, Any] | None,
) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "MLFE_SERVICE_NAME", "value": service_name},
        {"name": "MLFE_UPSTREAM", "value": f"127.0.0.1:{upstream}"},
        {"name": "MLFE_LISTEN", "value": f"0.0.0.0:{scoring_port}"},
        {"name": "MLFE_ADMIN_LISTEN", "value": f"127.0.0.1:{admin_port}"},
        {"name": "MLFE_STATE_DIR", "value": str(STATE_DIR)},
        {"name": "MLFE_PRIMARY_KEY_FILE", "value": str(SIDECAR_KEYS_DIR / "primary-key")},
        {"name": "MLFE_SECONDARY_KEY_FILE", "value": str(SIDECAR_KEYS_DIR / "secondary-key")},
        {"name": "MLFE_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": sidecar_secret_name(deployment), "key": "admin-token", "optional": True}}},
    ]
    # The admission cap is the model's own concurrency, as render gives model Deployments.
    workers = _literal_env(model, "WORKER_COUNT")
    if workers is not None:
        env.append({"name": "MLFE_REPLICA_MAX_CONCURRENT_REQUESTS", "value": workers})
    liveness = model.get("livenessProbe") or {}
    for field, var in _PROBE_ENV.items():
        if field in liveness:
            env.append({"name": var, "value": str(liveness[field])})
    ours = {e["name"] for e in env}
    kept = [e for e in (previous or {}).get("env") or [] if e.get("name") not in ours]

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": SIDECAR_PORT_NAME, "scheme": "HTTP"},
                "periodSeconds": period, "timeoutSeconds": 2, "successThreshold": 1,
                "failureThreshold": failures}

    return {
        "name": SIDECAR,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["mlfe", "sidecar"],
        "ports": [{"name": SIDECAR_PORT_NAME, "containerPort": scoring_port, "protocol": "TCP"}],
        "env": env + kept,
        "livenessProbe": {**probe("/-/healthy", 10, 3), "initialDelaySeconds": 5},
        # /-/ready is 503 while the model fails its liveness probe (as the sidecar probes it).
        "readinessProbe": probe("/-/ready", 2, 1),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        "resources": copy.deepcopy(SIDECAR_RESOURCES),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": APP_UID,
            "runAsGroup": APP_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": SIDECAR_VOLUMES["keys"], "mountPath": str(SIDECAR_KEYS_DIR),
             "readOnly": True},
            {"name": SIDECAR_VOLUMES["state"], "mountPath": str(STATE_DIR)},
            {"name": SIDECAR_VOLUMES["tmp"], "mountPath": "/tmp"},
        ],
    }


def render_sidecar(docs: list[Manifest], opts: SidecarOptions) -> list[Manifest]:
    """`docs` (the file's objects) with mlfe added to its one Deployment, the Service of that
    Deployment's pods pointed at mlfe (one is added when the file has none), and with
    `generate_secret` the Secret of mlfe's keys."""
    docs = copy.deepcopy(docs)
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        raise RenderError(f"--deployment: the file must hold exactly one Deployment "
                          f"(it holds {len(deployments)})")
    dep = deployments[0]
    meta = dep.setdefault("metadata", {})
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise RenderError("--deployment: the Deployment has no metadata.name")
    if opts.namespace is not None:
        if not _DNS_LABEL.match(opts.namespace):
            raise RenderError(f"--namespace: {opts.namespace!r} is not a Kubernetes "
                              "namespace name")
        meta["namespace"] = opts.namespace
    namespace = meta.get("namespace")
    service_name = opts.service_name or name
    if not NAME_RE.match(service_name):
        raise RenderError(
            f"{'--service-name' if opts.service_name else 'the Deployment name'}: "
            f"{service_name!r} is not a service name (3-32 lowercase letters, digits and '-'); "
            "give one with --service-name")
    try:
        template = dep["spec"]["template"]
        pod = template["spec"]
        containers: list[dict[str, Any]] = pod["containers"]
    except (KeyError, TypeError):
        raise RenderError(f"Deployment {name}: no spec.template.spec.containers") from None
    labels: dict[str, str] = (template.get("metadata") or {}).get("labels") or {}

    model = _model_container(name, containers, opts.model_container)
    previous = next((c for c in containers if c.get("name") == SIDECAR), None)
    upstream = _upstream_port(model)
    taken = {upstream, *(p for c in containers if c is not previous for p in _port_numbers(c))}
    scoring_port = _free_port(SCORING_PORT, taken)
    admin_port = _free_port(ADMIN_PORT, taken)
    container = sidecar_container(
        name, model, service_name, opts.image or default_router_image(),
        scoring_port, admin_port, upstream, previous)
    if previous is not None:
        containers[containers.index(previous)] = container
    else:
        containers.append(container)

    volumes = [v for v in pod.get("volumes") or [] if v.get("name") not in
               SIDECAR_VOLUMES.values()]
    volumes += [
        # 0444: the pod may run the model as another user, so no fsGroup is imposed; only
        # mlfe's container mounts this Secret.
        {"name": SIDECAR_VOLUMES["keys"],
         "secret": {"secretName": sidecar_secret_name(name), "defaultMode": 0o444}},
        {"name": SIDECAR_VOLUMES["state"], "emptyDir": {}},
        {"name": SIDECAR_VOLUMES["tmp"], "emptyDir": {"sizeLimit": "16Mi"}},
    ]
    pod["volumes"] = volumes
    pod["terminationGracePeriodSeconds"] = max(
        int(pod.get("terminationGracePeriodSeconds", 30)),
        PRESTOP_SLEEP_S + SIDECAR_DRAIN_S + GRACE_MARGIN_S)

    services = [d for d in docs if d.get("kind") == "Service" and _selects(d, labels, namespace)]
    for svc in services:
        if opts.namespace is not None:
            svc["metadata"]["namespace"] = opts.namespace
        _point_service(svc, model, upstream)
    out = docs
    if not services:
        selector = (dep["spec"].get("selector") or {}).get("matchLabels") or labels
        svc_meta: dict[str, Any] = {"name": name}
        if namespace is not None:
            svc_meta["namespace"] = namespace
        if meta.get("labels"):
            svc_meta["labels"] = dict(meta["labels"])
        out.insert(out.index(dep) + 1, {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": svc_meta,
            "spec": {"type": "ClusterIP", "selector": dict(selector),
                     "ports": [{"name": "http", "port": 80, "targetPort": SIDECAR_PORT_NAME,
                                "protocol": "TCP"}]},
        })
    if opts.generate_secret:
        secret_meta: dict[str, Any] = {"name": sidecar_secret_name(name)}
        if namespace is not None:
            secret_meta["namespace"] = namespace
        out.insert(out.index(dep), {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": secret_meta,
            "type": "Opaque",
            "stringData": {"primary-key": _generate_key(), "secondary-key": _generate_key(),
                           "admin-token": _generate_key()},
        })
    return out


def run_render_sidecar(
    deployment: str,
    target: str = "kubernetes",
    namespace: str | None = None,
    image: str | None = None,
    service_name: str | None = None,
    model_container: str | None = None,
    output: str | None = None,
    generate_secret: bool = False,
) -> int:
    """`mlfe render --target kubernetes --sidecar --deployment FILE`: 0, or 2 with the reason."""
    if not _known_target(target):
        return 2
    opts = SidecarOptions(image=image, namespace=namespace, service_name=service_name,
                          model_container=model_container, generate_secret=generate_secret)
    try:
        try:
            text = Path(deployment).read_text("utf-8")
            docs = [d for d in yaml.safe_load_all(text) if d]
        except OSError as e:
            raise RenderError(f"--deployment: cannot read {deployment!r}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise RenderError(f"--deployment: {deployment!r} is not valid YAML: {e}") from None
        if not all(isinstance(d, dict) and "kind" in d for d in docs):
            raise RenderError(f"--deployment: {deployment!r} holds something other than "
                              "Kubernetes objects")
        out = render_sidecar(docs, opts)
        header = (f"# Rendered by `mlfe render --target {target} --sidecar` from "
                  f"{deployment}.\n")
        written = _write_sidecar_output(out, output or "-", header, Path(deployment).stem)
    except ConfigError as e:
        print(f"mlfe: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"mlfe: wrote {path}", file=sys.stderr)
    if not generate_secret:
        dep = next(d for d in out if d["kind"] == "Deployment")
        name = dep["metadata"]["name"]
        ns = dep["metadata"].get("namespace")
        print(f"mlfe: note: the pod needs the Secret {sidecar_secret_name(name)} with "
              "primary-key and secondary-key (and optionally admin-token); create it once: "
              f"kubectl{f' -n {ns}' if ns else ''} create secret generic "
              f"{sidecar_secret_name(name)} --from-literal=primary-key=$(openssl rand -hex 24) "
              "--from-literal=secondary-key=$(openssl rand -hex 24), or render with "
              "--generate-secret", file=sys.stderr)
    return 0


def _write_sidecar_output(docs: list[Manifest], output: str, header: str,
                          stem: str) -> list[Path]:
    if output == "-":
        sys.stdout.write(dump_documents(docs, header))
        return []
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise RenderError(f"--output: {output!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    secrets_ = [d for d in docs if d["kind"] == "Secret"]
    rest = [d for d in docs if d["kind"] != "Secret"]
    written = []
    if secrets_:
        path = out / "secret.yaml"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(dump_documents(secrets_, header), encoding="utf-8")
        written.append(path)
    path = out / f"{stem}.yaml"
    path.write_text(dump_documents(rest, header), encoding="utf-8")
    written.append(path)
    return written
