"""`mlfe render --target kubernetes`, the router's manifests and the Dockerfile.

Every manifest (static and rendered) is validated offline against the official schemas of a
pinned Kubernetes version (kubernetes-validate, strict: unknown fields are errors); then the
properties that matter are checked one by one: least-privilege RBAC, the router's probes,
security context, spread and shutdown budget, and the model Deployments against their config.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy import render
from deploy.cli import main
from mlfe.config import parse_config
from router.keystore import KeyStore
from router.tokens import SigningKeys

KUBERNETES_VERSION = "1.33.0"  # pinned: the schemas ship inside kubernetes-validate
ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
ROUTER_LABELS = {"app.kubernetes.io/name": "mlfe", "app.kubernetes.io/component": "router"}

Doc = dict[str, Any]


def validate(docs: list[Doc]) -> None:
    assert docs
    for d in docs:
        kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)


def find(docs: list[Doc], kind: str, name: str, namespace: str | None = None) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name
            and (namespace is None or d["metadata"].get("namespace") == namespace)]
    assert len(hits) == 1, f"{kind} {name}: {len(hits)} found"
    return hits[0]


def container(deployment: Doc, name: str, key: str = "containers") -> Doc:
    (c,) = [c for c in deployment["spec"]["template"]["spec"][key] if c["name"] == name]
    return c


def run_render(
    capsys: pytest.CaptureFixture[str], config: Path, *args: str
) -> tuple[int, list[Doc], str]:
    code = main(["render", "--config", str(config), "--target", "kubernetes", *args])
    out, err = capsys.readouterr()
    docs = [d for d in yaml.safe_load_all(out) if d] if code == 0 else []
    return code, docs, err


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "mlfe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def quickstart(capsys: pytest.CaptureFixture[str]) -> list[Doc]:
    code, docs, err = run_render(capsys, QUICKSTART, "--image", "iris:1")
    assert code == 0, err
    return docs


GPU_CONFIG: dict[str, Any] = {
    "router": {"drain_timeout_s": 100, "listen": "127.0.0.1:9999"},
    "services": {
        "vision": {
            "entry_script": "app/score.py",
            "model_dir": "app/weights",
            "num_replicas": 3,
            "cpu_cores": 1.5,
            "memory_gb": 2,
            "gpu_cores": 2,
            "period_seconds": 7,
            "initial_delay_seconds": 120,
            "timeout_seconds": 4,
            "success_threshold": 2,
            "failure_threshold": 5,
            "replica_max_concurrent_requests": 4,
            "environment_variables": {"MODEL_FLAVOUR": "large"},
            "primary_key": "a-primary-key-from-config-0001",
        },
        "small": {"entry_script": "small.py", "autoscale_min_replicas": 2,
                  "autoscale_max_replicas": 5, "memory_gb": 0.3},
        "static": {"upstreams": ["legacy.models.svc.cluster.local:5001"]},
    },
    "endpoints": {
        "vision-ep": {"versions": {"blue": {"service": "vision", "traffic_percentile": 100}}},
    },
}


@pytest.fixture
def gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[Doc]:
    config = write_config(tmp_path, GPU_CONFIG)
    code, docs, err = run_render(capsys, config, "--image", "registry.example/vision:7",
                                 "--namespace", "models")
    assert code == 0, err
    return docs


# ---- schema validation ------------------------------------------------------------------------


def test_static_manifests_validate_and_are_all_listed() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    docs = [d for f in files for d in yaml.safe_load_all((MANIFESTS / f).read_text()) if d]
    validate(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Role", "RoleBinding",
                     "Secret", "Service", "Service", "Service", "ServiceAccount"]
    # The static config is a valid config with the container's addresses.
    cfg = parse_config(yaml.safe_load(find(docs, "ConfigMap", "mlfe-config")["data"]["config.yaml"]))
    assert cfg.router.listen == "0.0.0.0:8080" and cfg.router.admin_listen == "0.0.0.0:8081"
    assert cfg.router.metrics_listen == "0.0.0.0:8082"
    assert str(cfg.router.state_dir) == "/var/lib/mlfe"


def test_quickstart_renders_valid_manifests(quickstart: list[Doc]) -> None:
    validate(quickstart)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in quickstart) == sorted([
        ("ServiceAccount", "mlfe-router"), ("Role", "mlfe-router"),
        ("RoleBinding", "mlfe-router"), ("ConfigMap", "mlfe-config"),
        ("Deployment", "mlfe-router"), ("Service", "mlfe-router"),
        ("Service", "mlfe-router-admin"), ("Service", "mlfe-router-metrics"),
        ("PodDisruptionBudget", "mlfe-router"),
        ("Deployment", "iris"), ("Service", "iris"),
    ])
    assert {d["metadata"]["namespace"] for d in quickstart} == {"mlfe"}


def test_gpu_config_renders_valid_manifests(gpu: list[Doc]) -> None:
    validate(gpu)
    assert {d["metadata"]["namespace"] for d in gpu} == {"models"}
    assert not [d for d in gpu if d["kind"] == "Secret"]  # only with --generate-secret


def test_the_validator_cli_accepts_the_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "rendered"
    assert main(["render", "--config", str(QUICKSTART), "--target", "kubernetes",
                 "--image", "iris:1", "--generate-secret", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["router.yaml", "secret.yaml",
                                                     "service-iris.yaml"]
    assert stat.S_IMODE((out / "secret.yaml").stat().st_mode) == 0o600
    cli = Path(sys.executable).with_name("kubernetes-validate")
    if not cli.exists():
        pytest.skip("the kubernetes-validate command is not installed next to this Python")
    result = subprocess.run(
        [str(cli), "--strict", "-k", KUBERNETES_VERSION, *sorted(map(str, out.iterdir()))],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 12


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_static_manifests() -> None:
    result = subprocess.run(["kubectl", "kustomize", str(MANIFESTS)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    validate(docs)
    assert {d["metadata"]["namespace"] for d in docs} == {"mlfe"}
    assert find(docs, "RoleBinding", "mlfe-router")["subjects"][0]["namespace"] == "mlfe"


# ---- RBAC -------------------------------------------------------------------------------------


def rules(role: Doc) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    return sorted(
        (r["apiGroups"][0], r["resources"][0], tuple(r.get("resourceNames", ())),
         tuple(r["verbs"]))
        for r in role["rules"] if len(r["apiGroups"]) == 1 and len(r["resources"]) == 1
    )


LEAST_PRIVILEGE = [
    ("", "secrets", ("mlfe-keys",), ("get", "watch", "update")),
    ("apps", "deployments/scale", (), ("get", "patch")),
    ("coordination.k8s.io", "leases", (), ("create",)),
    ("coordination.k8s.io", "leases", ("mlfe-autoscaler",), ("get", "update")),
    ("discovery.k8s.io", "endpointslices", (), ("list", "watch")),
]


def test_static_role_is_least_privilege() -> None:
    docs = list(yaml.safe_load_all((MANIFESTS / "role.yaml").read_text()))
    role = find(docs, "Role", "mlfe-router")
    assert len(rules(role)) == len(role["rules"])  # one group and one resource per rule
    assert rules(role) == LEAST_PRIVILEGE
    binding = find(docs, "RoleBinding", "mlfe-router")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "mlfe-router"}
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [
        ("ServiceAccount", "mlfe-router")]


def test_role_allows_every_call_the_kubernetes_backend_makes() -> None:
    api = pytest.importorskip("deploy.kube.api")
    leader = pytest.importorskip("deploy.kube.leader")
    role = find(list(yaml.safe_load_all((MANIFESTS / "role.yaml").read_text())), "Role",
                "mlfe-router")

    def allowed(group: str, resource: str, verb: str, name: str | None) -> bool:
        return any(
            group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
            and ("resourceNames" not in r or name in r["resourceNames"])
            for r in role["rules"]
        )

    for rule in api.ROLE_RULES:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    # Leader election touches one Lease by name (create is never name-bound),
                    # the shared state one Secret.
                    name = leader.LEASE_NAME if resource == "leases" and verb != "create" else (
                        "mlfe-keys" if resource == "secrets" else None)
                    assert allowed(group, resource, verb, name), (group, resource, verb)


def test_rendered_role_scales_only_the_rendered_deployments(quickstart: list[Doc]) -> None:
    assert not [d for d in quickstart if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    expected = [r if r[1] != "deployments/scale" else (r[0], r[1], ("iris", "mlfe-router"), r[3])
                for r in LEAST_PRIVILEGE]
    assert rules(find(quickstart, "Role", "mlfe-router")) == expected
    subjects = find(quickstart, "RoleBinding", "mlfe-router")["subjects"]
    assert subjects == [{"kind": "ServiceAccount", "name": "mlfe-router", "namespace": "mlfe"}]
    for d in quickstart:
        for r in d.get("rules", []):
            assert "*" not in r["verbs"] + r["resources"] + r["apiGroups"]


def test_kubernetes_services_elsewhere_get_their_own_narrow_role(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {"services": {
        "ext-a": {"kubernetes": {"namespace": "team-a", "deployment": "scorer"}},
        "ext-b": {"kubernetes": {"namespace": "team-a", "deployment": "ranker"}},
        "local": {"kubernetes": {"namespace": "mlfe", "deployment": "local-model"}},
    }})
    code, docs, err = run_render(capsys, config)  # no entry_script service: no --image needed
    assert code == 0, err
    validate(docs)
    scale = [r for r in find(docs, "Role", "mlfe-router", "mlfe")["rules"]
             if r["resources"] == ["deployments/scale"]]
    assert scale[0]["resourceNames"] == ["local-model", "mlfe-router"]
    other = find(docs, "Role", "mlfe-router", "team-a")
    assert rules(other) == [
        ("apps", "deployments/scale", ("ranker", "scorer"), ("get", "patch")),
        ("discovery.k8s.io", "endpointslices", (), ("list", "watch")),
    ]
    binding = find(docs, "RoleBinding", "mlfe-router", "team-a")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mlfe-router", "namespace": "mlfe"}]


# ---- the router -------------------------------------------------------------------------------


def test_router_deployment_is_hardened_spread_and_probed(quickstart: list[Doc]) -> None:
    dep = find(quickstart, "Deployment", "mlfe-router")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"] == ROUTER_LABELS
    assert ROUTER_LABELS.items() <= spec["template"]["metadata"]["labels"].items()
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == ROUTER_LABELS
    assert pod["serviceAccountName"] == "mlfe-router"

    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001 != 0
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["initContainers"] + pod["containers"]:
        assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                        "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}, c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
        assert c["image"] == render.default_router_image()

    router = container(dep, "router")
    assert router["command"] == ["mlfe", "serve", "--config", "/etc/mlfe/config.yaml"]
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports == {"scoring": 8080, "admin": 8081, "metrics": 8082, "slot-broker": 8083}
    assert router["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": "scoring",
                                                  "scheme": "HTTP"}
    assert router["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": "scoring",
                                                   "scheme": "HTTP"}
    assert router["resources"]["limits"] == {"cpu": "2", "memory": "1200Mi"}
    env = {e["name"]: e["valueFrom"] for e in router["env"]}
    assert env == {
        "MLFE_ADMIN_TOKEN": {"secretKeyRef": {"name": "mlfe-keys", "key": "admin-token"}},
        "POD_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
        "POD_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        "POD_IP": {"fieldRef": {"fieldPath": "status.podIP"}},
    }

    mounts = {m["mountPath"]: m["name"] for m in router["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/mlfe"]]["configMap"]["name"] == "mlfe-config"
    assert "emptyDir" in volumes[mounts["/var/lib/mlfe"]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes["keys"]["secret"]["secretName"] == "mlfe-keys"
    assert "keys" not in mounts.values()  # only the init container reads the Secret's files

    pdb = find(quickstart, "PodDisruptionBudget", "mlfe-router")
    assert pdb["spec"]["selector"]["matchLabels"] == ROUTER_LABELS
    assert pdb["spec"]["maxUnavailable"] == 1 < spec["replicas"]


def test_grace_period_outlasts_the_presleep_and_the_drain(
    quickstart: list[Doc], gpu: list[Doc]
) -> None:
    for docs, drain in ((quickstart, 30), (gpu, 100)):
        dep = find(docs, "Deployment", "mlfe-router")
        pod = dep["spec"]["template"]["spec"]
        pre_stop = container(dep, "router")["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain
    static = yaml.safe_load((MANIFESTS / "deployment.yaml").read_text())
    assert static["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 5 + 30


def test_router_services_expose_scoring_outside_and_admin_inside(quickstart: list[Doc]) -> None:
    lb = find(quickstart, "Service", "mlfe-router")
    assert lb["spec"]["type"] == "LoadBalancer"
    assert lb["spec"]["selector"] == ROUTER_LABELS
    assert [(p["port"], p["targetPort"]) for p in lb["spec"]["ports"]] == [(80, "scoring")]
    admin = find(quickstart, "Service", "mlfe-router-admin")
    assert admin["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in admin["spec"]["ports"]] == [(8081, "admin")]
    # A Prometheus following the annotations must not be sent to the token-guarded admin port.
    assert "prometheus.io/scrape" not in admin["metadata"].get("annotations", {})


def test_prometheus_annotations_point_at_the_metrics_listener(quickstart: list[Doc]) -> None:
    """What a stock Prometheus follows: the annotated Service's port is the router container's
    `metrics` port, which the rendered config's metrics_listen opens (GET /metrics, no token)."""
    metrics = find(quickstart, "Service", "mlfe-router-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert metrics["spec"]["selector"] == ROUTER_LABELS
    assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [(8082, "metrics")]
    annotations = metrics["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (
        "8082", "/metrics")
    router = container(find(quickstart, "Deployment", "mlfe-router"), "router")
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports["metrics"] == 8082
    cfg = parse_config(yaml.safe_load(find(quickstart, "ConfigMap", "mlfe-config")["data"]["config.yaml"]))
    assert cfg.router.metrics_addr == ("0.0.0.0", 8082)


# ---- Prometheus Operator monitors (--monitor) ---------------------------------------------------

# kubernetes-validate knows only the built-in kinds. A monitor is checked in three parts: its
# metadata and label selector against the built-in schemas of those types (inside a ConfigMap and
# a PodDisruptionBudget), and its spec against the fields the Prometheus Operator's
# monitoring.coreos.com/v1 API defines for them (closed: an unknown field is an error, as in
# strict validation).
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_ENDPOINT = {
    "type": "object", "additionalProperties": False, "required": ["port"],
    "properties": {"port": {"type": "string", "minLength": 1}, "path": {"type": "string"},
                   "scheme": {"enum": ["http", "https"]},
                   "interval": {"type": "string", "pattern": _DURATION}},
}
MONITOR_SPECS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {"type": "object", "additionalProperties": False,
                       "required": ["selector", "endpoints"],
                       "properties": {"selector": {"type": "object"},
                                      "endpoints": {"type": "array", "minItems": 1,
                                                    "items": _ENDPOINT}}},
    "PodMonitor": {"type": "object", "additionalProperties": False,
                   "required": ["selector", "podMetricsEndpoints"],
                   "properties": {"selector": {"type": "object"},
                                  "podMetricsEndpoints": {"type": "array", "minItems": 1,
                                                          "items": _ENDPOINT}}},
}


def validate_monitor(doc: Doc) -> None:
    import jsonschema

    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    validate([{"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
              {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
               "metadata": {"name": "selector-check"},
               "spec": {"maxUnavailable": 1, "selector": doc["spec"]["selector"]}}])
    jsonschema.validate(doc["spec"], MONITOR_SPECS[doc["kind"]])


def matches(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("kind", ["service", "pod"])
def test_monitor_is_valid_and_scrapes_the_metrics_port(
    kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, docs, err = run_render(capsys, QUICKSTART, "--image", "iris:1", "--monitor", kind,
                                 "--namespace", "obs")
    assert code == 0, err
    monitors = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    validate([d for d in docs if d not in monitors])
    (monitor,) = monitors
    validate_monitor(monitor)
    assert monitor["metadata"]["namespace"] == "obs"
    router = find(docs, "Deployment", "mlfe-router")
    if kind == "service":
        assert monitor["kind"] == "ServiceMonitor"
        # It selects the metrics Service only (not the scoring or admin one), on its port.
        selected = [d for d in docs if d["kind"] == "Service"
                    and matches(monitor["spec"]["selector"], d["metadata"].get("labels", {}))]
        assert [d["metadata"]["name"] for d in selected] == ["mlfe-router-metrics"]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in [p["name"] for p in selected[0]["spec"]["ports"]]
    else:
        assert monitor["kind"] == "PodMonitor"
        assert matches(monitor["spec"]["selector"],
                       router["spec"]["template"]["metadata"]["labels"])
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics"
        assert "metrics" in [p["name"] for p in container(router, "router")["ports"]]
    assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"


def test_monitor_validation_catches_an_unknown_field() -> None:
    import jsonschema

    doc = render.monitor_objects("service", "mlfe")[0]
    doc["spec"]["endpoints"][0]["bearerTokenSecret"] = {"name": "mlfe-keys"}
    with pytest.raises(jsonschema.ValidationError):
        validate_monitor(doc)


def test_without_monitor_no_operator_object_is_rendered(quickstart: list[Doc]) -> None:
    assert not [d for d in quickstart if d["apiVersion"].startswith("monitoring.coreos.com/")]


def test_monitor_goes_to_its_own_file(tmp_path: Path) -> None:
    out = tmp_path / "rendered"
    assert main(["render", "--config", str(QUICKSTART), "--target", "kubernetes",
                 "--image", "iris:1", "--monitor", "pod", "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["monitoring.yaml", "router.yaml",
                                                     "service-iris.yaml"]
    (doc,) = [d for d in yaml.safe_load_all((out / "monitoring.yaml").read_text()) if d]
    assert doc["kind"] == "PodMonitor"


def test_the_monitoring_overlay_lists_the_static_monitors() -> None:
    overlay = MANIFESTS / "monitoring"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "servicemonitor.yaml"]
    for name in render.MONITORS.values():
        (doc,) = [d for d in yaml.safe_load_all((overlay / name).read_text()) if d]
        validate_monitor(doc)


def test_config_map_points_services_at_their_deployments(quickstart: list[Doc]) -> None:
    data = find(quickstart, "ConfigMap", "mlfe-config")["data"]
    cfg = parse_config(yaml.safe_load(data["config.yaml"]))
    assert (cfg.router.listen, cfg.router.admin_listen) == ("0.0.0.0:8080", "0.0.0.0:8081")
    assert str(cfg.router.state_dir) == "/var/lib/mlfe"
    # A cluster front end keeps at least the 2 pods it is rendered with.
    scaling = cfg.router.self_scaling
    assert scaling.min_pods == 2 and scaling.max_pods >= 2
    iris = cfg.services["iris"]
    assert iris.kubernetes is not None
    assert (iris.kubernetes.namespace, iris.kubernetes.deployment) == ("mlfe", "iris")
    assert iris.entry_script is None and iris.model_dir is None
    assert (iris.autoscale_min_replicas, iris.autoscale_max_replicas) == (1, 4)


@pytest.mark.parametrize(("scaling", "pods"), [
    (None, 2), ({"min_pods": 1}, 1), ({"min_pods": 3, "max_pods": 6}, 3), ({"min_pods": 5, "max_pods": 5}, 5)])
def test_the_router_deployment_starts_with_min_pods(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], scaling: dict[str, int] | None,
        pods: int) -> None:
    router: dict[str, Any] = {} if scaling is None else {"self_scaling": scaling}
    config = write_config(tmp_path, {
        "router": router,
        "services": {"iris": {"kubernetes": {"namespace": "mlfe", "deployment": "iris"}}}})
    code, docs, err = run_render(capsys, config)
    assert code == 0, err
    assert find(docs, "Deployment", "mlfe-router")["spec"]["replicas"] == pods
    rendered = parse_config(yaml.safe_load(
        find(docs, "ConfigMap", "mlfe-config")["data"]["config.yaml"])).router.self_scaling
    assert rendered.min_pods == pods and rendered.max_pods >= pods


def test_config_map_never_holds_keys_and_a_config_change_rolls_the_pods(
    gpu: list[Doc], quickstart: list[Doc]
) -> None:
    text = find(gpu, "ConfigMap", "mlfe-config")["data"]["config.yaml"]
    assert "primary_key" not in text and "a-primary-key-from-config" not in text
    cfg = parse_config(yaml.safe_load(text))
    assert cfg.services["vision"].environment_variables == {}
    assert cfg.services["static"].upstreams == ["legacy.models.svc.cluster.local:5001"]
    assert cfg.router.drain_timeout_s == 100

    def checksum(docs: list[Doc]) -> str:
        dep = find(docs, "Deployment", "mlfe-router")
        return str(dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert len(checksum(gpu)) == 64 and checksum(gpu) != checksum(quickstart)


def test_tls_switches_the_load_balancer_probes_and_mounts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "idp.json").write_text('{"keys": []}')
    config = write_config(tmp_path, {
        "router": {"tls": {"cert_file": "cert.pem", "key_file": "key.pem"},
                   "token_issuers": [{"issuer": "https://idp.example", "audience": "mlfe",
                                      "jwks_file": "idp.json"}]},
        "services": {"echo": {"upstreams": ["echo.default.svc:5001"]}},
    })
    code, docs, err = run_render(capsys, config)
    assert code == 0, err
    validate(docs)
    lb = find(docs, "Service", "mlfe-router")
    assert [(p["name"], p["port"], p["targetPort"]) for p in lb["spec"]["ports"]] == [
        ("https", 443, "scoring")]
    dep = find(docs, "Deployment", "mlfe-router")
    router = container(dep, "router")
    assert router["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert router["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "mlfe-tls"
    assert {"name": "tls", "mountPath": "/etc/mlfe-tls", "readOnly": True} in router[
        "volumeMounts"]
    data = find(docs, "ConfigMap", "mlfe-config")["data"]
    cfg = parse_config(yaml.safe_load(data["config.yaml"]))
    assert cfg.router.tls is not None
    assert str(cfg.router.tls.cert_file) == "/etc/mlfe-tls/tls.crt"
    assert str(cfg.router.token_issuers[0].jwks_file) == "/etc/mlfe/jwks-0.json"
    assert data["jwks-0.json"] == '{"keys": []}'


# ---- keys -------------------------------------------------------------------------------------


def test_generated_secret_is_what_the_router_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, GPU_CONFIG)
    code, docs, err = run_render(capsys, config, "--image", "v:1", "--generate-secret")
    assert code == 0, err
    validate(docs)
    data = find(docs, "Secret", "mlfe-keys")["stringData"]
    assert set(data) == {"keys.json", "signing-key.pem", "admin-token"}
    assert len(data["admin-token"]) >= 32
    keys = json.loads(data["keys.json"])
    assert set(keys) == {"vision", "small", "static", "vision-ep"}
    assert keys["vision"]["primaryKey"] == "a-primary-key-from-config-0001"
    assert len({k for owner in keys.values() for k in owner.values()}) == 8  # all distinct

    # The init container's copies, as the router reads them.
    state = tmp_path / "state"
    state.mkdir()
    (state / "keys.json").write_text(data["keys.json"])
    (state / "signing-key.pem").write_text(data["signing-key.pem"])
    assert KeyStore(state).get("small") == (keys["small"]["primaryKey"],
                                            keys["small"]["secondaryKey"])
    assert SigningKeys(state).private_key.curve.name == "secp256r1"

    # Without --generate-secret: no Secret, and a note that the config's keys go only there.
    code, docs, err = run_render(capsys, config, "--image", "v:1")
    assert code == 0 and not [d for d in docs if d["kind"] == "Secret"]
    assert "services.vision" in err and "--generate-secret" in err


def seed_script(docs: list[Doc], keys_dir: Path, state_dir: Path) -> str:
    init = container(find(docs, "Deployment", "mlfe-router"), "seed-state", "initContainers")
    assert init["command"][:2] == ["sh", "-c"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"keys": "/etc/mlfe-keys", "state": "/var/lib/mlfe"}
    return str(init["command"][2]).replace("/etc/mlfe-keys", str(keys_dir)).replace(
        "/var/lib/mlfe", str(state_dir))


def test_init_container_seeds_the_state_dir_or_refuses_an_empty_secret(
    quickstart: list[Doc], tmp_path: Path
) -> None:
    keys_dir, state_dir = tmp_path / "secret", tmp_path / "state"
    keys_dir.mkdir()
    state_dir.mkdir()
    script = seed_script(quickstart, keys_dir, state_dir)
    for name in ("keys.json", "signing-key.pem", "admin-token"):
        (keys_dir / name).write_text("")  # the static secret.yaml as it is
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 1
    assert "mlfe-keys has no keys.json" in result.stderr and "--generate-secret" in result.stderr
    assert not list(state_dir.iterdir())

    for name, content in (("keys.json", "{}"), ("signing-key.pem", "PEM"),
                          ("admin-token", "t")):
        (keys_dir / name).write_text(content)
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in state_dir.iterdir()) == ["keys.json", "signing-key.pem"]
    for p in state_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert (state_dir / "keys.json").read_text() == "{}"


# ---- model services ---------------------------------------------------------------------------


def test_model_deployment_follows_the_deploy_config(gpu: list[Doc]) -> None:
    dep = find(gpu, "Deployment", "vision")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 3  # num_replicas
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    c = container(dep, "model")
    assert c["image"] == "registry.example/vision:7"
    assert c["command"] == ["mlfe", "score-server", "--entry-script",
                            "/var/azureml-app/app/score.py", "--host", "0.0.0.0",
                            "--port", "5001"]
    assert c["ports"] == [{"name": "http", "containerPort": 5001, "protocol": "TCP"}]
    assert c["resources"] == {"requests": {"cpu": "1500m", "memory": "2Gi"},
                              "limits": {"memory": "2Gi", "nvidia.com/gpu": 2}}
    assert c["livenessProbe"] == {
        "httpGet": {"path": "/", "port": "http", "scheme": "HTTP"},
        "initialDelaySeconds": 120, "periodSeconds": 7, "timeoutSeconds": 4,
        "successThreshold": 1, "failureThreshold": 5,
    }
    assert c["readinessProbe"] == {
        "httpGet": {"path": "/", "port": "http", "scheme": "HTTP"},
        "initialDelaySeconds": 0, "periodSeconds": 7, "timeoutSeconds": 4,
        "successThreshold": 2, "failureThreshold": 5,
    }
    assert {e["name"]: e["value"] for e in c["env"]} == {
        "AZUREML_MODEL_DIR": "/var/azureml-app/app/weights",
        "WORKER_COUNT": "4",
        "MODEL_FLAVOUR": "large",
    }
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    # A drained replica finishes its requests (score-server: 60 s) before the kubelet kills it.
    assert pod["terminationGracePeriodSeconds"] > 5 + 60

    svc = find(gpu, "Service", "vision")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 5001, "targetPort": "http",
                                     "protocol": "TCP"}]


def test_autoscaled_cpu_model_starts_at_its_minimum(gpu: list[Doc]) -> None:
    dep = find(gpu, "Deployment", "small")
    assert dep["spec"]["replicas"] == 2  # autoscale_min_replicas
    c = container(dep, "model")
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "308Mi"},
                              "limits": {"memory": "308Mi"}}
    assert "tolerations" not in dep["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {"AZUREML_MODEL_DIR": "/var/azureml-app/model", "WORKER_COUNT": "1"}
    assert c["livenessProbe"]["initialDelaySeconds"] == 310  # azureml's default
    # Static upstreams get no Deployment.
    assert not [d for d in gpu if d["metadata"]["name"] == "static"]


def test_quickstart_paths_map_under_the_app_root(quickstart: list[Doc]) -> None:
    c = container(find(quickstart, "Deployment", "iris"), "model")
    assert c["command"][3] == "/var/azureml-app/iris/score.py"
    assert {"name": "AZUREML_MODEL_DIR", "value": "/var/azureml-app/iris/model"} in c["env"]
    assert c["livenessProbe"]["initialDelaySeconds"] == 60


@pytest.mark.parametrize(("cores", "quantity"),
                         [(0.1, "100m"), (1, "1"), (1.5, "1500m"), (0.0001, "1m"), (2.0, "2")])
def test_cpu_quantity(cores: float, quantity: str) -> None:
    assert render.cpu_quantity(cores) == quantity


@pytest.mark.parametrize(("gb", "quantity"),
                         [(0.5, "512Mi"), (1, "1Gi"), (1.2, "1229Mi"), (16, "16Gi")])
def test_memory_quantity(gb: float, quantity: str) -> None:
    assert render.memory_quantity(gb) == quantity


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "args", "needle"),
    [
        ({"services": {"svc": {"entry_script": "s.py", "cpu_cores": 0}}}, [],
         "services.svc.cpu_cores"),
        ({"services": {"svc": {"entry_script": "s.py"}}}, [], "--image"),
        ({"services": {"svc": {"entry_script": "s.py"}}}, ["--image", "x:1", "--namespace", "Bad_NS"],
         "--namespace: 'Bad_NS'"),
        ({"services": {"svc": {"entry_script": "../s.py"}}}, ["--image", "x:1"],
         "services.svc.entry_script"),
        ({"services": {"svc": {"entry_script": "/opt/elsewhere/s.py"}}}, ["--image", "x:1"],
         "outside the config file's directory"),
        ({"services": {"mlfe-router": {"entry_script": "s.py"}}}, ["--image", "x:1"],
         "services.mlfe-router: the name is taken"),
        ({"router": {"token_issuers": [{"issuer": "i", "audience": "a", "jwks_file": "no.json"}]}},
         [], "router.token_issuers.0.jwks_file"),
    ],
)
def test_bad_input_is_refused_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, Any], args: list[str],
    needle: str,
) -> None:
    code, docs, err = run_render(capsys, write_config(tmp_path, config), *args)
    assert code == 2
    assert needle in err and err.startswith("mlfe: ")
    assert docs == []


def test_unreadable_config_and_unknown_target_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_render(capsys, tmp_path / "missing.yaml")
    assert code == 2 and "cannot read config" in err
    with pytest.raises(SystemExit) as e:
        main(["render", "--config", str(QUICKSTART), "--target", "nomad"])
    assert e.value.code == 2
    assert render.run_render(str(QUICKSTART), target="nomad") == 2


def test_output_into_an_existing_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    code, _, err = run_render(capsys, QUICKSTART, "--image", "i:1", "--output",
                              str(tmp_path / "file"))
    assert code == 2 and "not a directory" in err


# ---- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends in a line continuation"
    return [(s.split(None, 1)[0].upper(), s.split(None, 1)[1]) for s in logical]


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instr, args in dockerfile_instructions():
        if instr == "FROM":
            out.append([])
        out[-1].append((instr, args))
    return out


def test_dockerfile_is_multistage_slim_and_runs_as_non_root() -> None:
    builder, runtime = stages()
    assert builder[0] == ("FROM", "python:3.11-slim AS builder")
    assert runtime[0][1].split()[0] == "python:3.11-slim"
    run = dict(runtime)
    assert run["USER"].split(":")[0] == "10001"
    assert any(i == "COPY" and a.startswith("--from=builder /opt/venv") for i, a in runtime)
    # Runtime dependencies only: mlfe with its Kubernetes client, no other extras, and nothing
    # installed in the final stage.
    installs = [a for i, a in builder if i == "RUN" and "pip install" in a]
    assert installs == ['/opt/venv/bin/pip install ".[kubernetes]"']
    assert not any(i == "RUN" and ("pip install" in a or "apt-get" in a) for i, a in runtime)
    assert run["EXPOSE"].split() == ["8080", "8081", "8082"]
    assert json.loads(run["CMD"]) == ["mlfe", "serve", "--config", "/etc/mlfe/config.yaml"]
    assert run["WORKDIR"] == "/var/azureml-app"
    # USER comes before CMD: nothing after it switches back to root.
    names = [i for i, _ in runtime]
    assert names.index("USER") < names.index("CMD") and names.count("USER") == 1


def test_dockerfile_healthcheck_asks_the_router_with_python() -> None:
    (_, runtime) = stages()
    check = dict(runtime)["HEALTHCHECK"]
    options, _, cmd = check.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(cmd)
    assert argv[:2] == ["python", "-c"]
    assert "/-/healthy" in argv[2] and "8080" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")  # valid Python
    # Against a port nobody listens on, it fails (non-zero), as Docker expects for unhealthy.
    probe = argv[2].replace("8080", "9")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30,
                            check=False)
    assert result.returncode != 0


def test_dockerignore_keeps_the_context_small_and_free_of_secrets() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".mlfe", "tests", "**/__pycache__"} <= ignored
    copied = [a.split()[0] for i, a in stages()[0] if i == "COPY"]
    assert copied == ["pyproject.toml", "mlfe", "router", "autoscaler", "deploy", "mlfe_azureml",
                      "examples"]
    # Every package pyproject installs is in the build context (else `pip install .` fails).
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} <= set(copied)
    assert not ignored & {"pyproject.toml", "README.md", *copied}
    assert "examples/iris/model" in ignored  # a model trained locally stays out


def test_readme_documents_every_manifest() -> None:
    readme = (MANIFESTS / "README.md").read_text()
    for p in MANIFESTS.glob("*.yaml"):
        assert f"`{p.name}`" in readme, p.name
    assert "FROM mlfe" in readme and "/var/azureml-app" in readme


def test_render_is_reachable_as_a_command() -> None:
    exe = Path(sys.executable).with_name("mlfe")
    if not exe.exists():
        pytest.skip("the mlfe console script is not installed next to this Python")
    result = subprocess.run(
        [str(exe), "render", "--config", str(QUICKSTART), "--target", "kubernetes",
         "--image", "iris:1"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Rendered by `mlfe render --target kubernetes`")


def test_missing_static_manifests_are_named(tmp_path: Path) -> None:
    with pytest.raises(render.RenderError) as e:
        render.load_static_manifests(tmp_path)
    assert str(tmp_path) in str(e.value) and "deploy/kubernetes/" in str(e.value)
