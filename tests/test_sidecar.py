"""`mlfe sidecar`: configuration from the environment only (every setting reachable, bad values
refused by variable name, keys never shown), readiness that follows the model's liveness (a real
`mlfe score-server` killed and brought back; polled with deadlines), and the Deployment that
`mlfe render --sidecar` writes (valid for Kubernetes, strict)."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from deploy.cli import main
from deploy.sidecar import (
    SETTINGS,
    Readiness,
    SidecarConfigError,
    settings_from_env,
)
from mlfe.config import MlfeConfig
from tests.support import EXAMPLES, REPO, Proc, free_port, spawn

KUBERNETES_VERSION = "1.33.0"
KEY1 = "sidecar-primary-" + "p" * 24
KEY2 = "sidecar-secondary-" + "s" * 24
ADMIN = "admin-token-for-tests"


# ---- configuration from the environment -----------------------------------------------------


def service_of(cfg: MlfeConfig) -> Any:
    (svc,) = cfg.services.values()
    return svc


# Every variable: a value other than the default, what must come of it, and any other variable
# the value needs. A setting added to the models shows up in SETTINGS: add it here too.
ISSUER = {"issuer": "https://idp.example", "audience": "mlfe", "jwks_url": "https://idp/jwks"}
REACH: dict[str, tuple[str, Callable[[MlfeConfig], Any], Any, dict[str, str]]] = {
    "MLFE_SERVICE_NAME": ("fraud", lambda c: list(c.services), ["fraud"], {}),
    "MLFE_UPSTREAM": ("127.0.0.1:6001", lambda c: service_of(c).upstreams,
                      ["127.0.0.1:6001"], {}),
    "MLFE_AUTH_ENABLED": ("false", lambda c: service_of(c).auth_enabled, False, {}),
    "MLFE_TOKEN_AUTH_ENABLED": ("true", lambda c: service_of(c).token_auth_enabled, True,
                                {"MLFE_AUTH_ENABLED": "false"}),
    "MLFE_PRIMARY_KEY": (KEY1, lambda c: service_of(c).primary_key, KEY1, {}),
    "MLFE_SECONDARY_KEY": (KEY2, lambda c: service_of(c).secondary_key, KEY2, {}),
    "MLFE_PRIMARY_KEY_FILE": ("<file>", lambda c: service_of(c).primary_key, KEY1, {}),
    "MLFE_SECONDARY_KEY_FILE": ("<file>", lambda c: service_of(c).secondary_key, KEY2, {}),
    "MLFE_SCORING_TIMEOUT_MS": ("1500", lambda c: service_of(c).scoring_timeout_ms, 1500, {}),
    "MLFE_REPLICA_MAX_CONCURRENT_REQUESTS": (
        "4", lambda c: service_of(c).replica_max_concurrent_requests, 4, {}),
    "MLFE_MAX_REQUEST_WAIT_TIME": ("250", lambda c: service_of(c).max_request_wait_time,
                                   250, {}),
    "MLFE_MAX_QUEUE_LENGTH": ("7", lambda c: service_of(c).max_queue_length, 7, {}),
    "MLFE_COLLECT_MODEL_DATA": ("yes", lambda c: service_of(c).collect_model_data, True, {}),
    "MLFE_PERIOD_SECONDS": ("3", lambda c: service_of(c).period_seconds, 3, {}),
    "MLFE_INITIAL_DELAY_SECONDS": ("20", lambda c: service_of(c).initial_delay_seconds, 20, {}),
    "MLFE_TIMEOUT_SECONDS": ("5", lambda c: service_of(c).timeout_seconds, 5, {}),
    "MLFE_SUCCESS_THRESHOLD": ("2", lambda c: service_of(c).success_threshold, 2, {}),
    "MLFE_FAILURE_THRESHOLD": ("6", lambda c: service_of(c).failure_threshold, 6, {}),
    "MLFE_LISTEN": ("127.0.0.1:9080", lambda c: c.router.listen, "127.0.0.1:9080", {}),
    "MLFE_ADMIN_LISTEN": ("0.0.0.0:9081", lambda c: c.router.admin_listen, "0.0.0.0:9081", {}),
    "MLFE_METRICS_LISTEN": ("0.0.0.0:9082", lambda c: c.router.metrics_listen, "0.0.0.0:9082",
                            {}),
    "MLFE_STATE_DIR": ("/var/lib/mlfe", lambda c: c.router.state_dir, Path("/var/lib/mlfe"), {}),
    "MLFE_MAX_BODY_BYTES": ("1024", lambda c: c.router.max_body_bytes, 1024, {}),
    "MLFE_TLS_CERT_FILE": ("/tls/crt", lambda c: c.router.tls and c.router.tls.cert_file,
                           Path("/tls/crt"), {"MLFE_TLS_KEY_FILE": "/tls/key"}),
    "MLFE_TLS_KEY_FILE": ("/tls/key", lambda c: c.router.tls and c.router.tls.key_file,
                          Path("/tls/key"), {"MLFE_TLS_CERT_FILE": "/tls/crt"}),
    "MLFE_TOKEN_ISSUERS": (json.dumps([ISSUER]),
                           lambda c: [i.model_dump(exclude_none=True)
                                      for i in c.router.token_issuers], [ISSUER], {}),
    "MLFE_TOKEN_LIFETIME_S": ("600", lambda c: c.router.token_lifetime_s, 600, {}),
    "MLFE_TOKEN_LEEWAY_S": ("1.5", lambda c: c.router.token_leeway_s, 1.5, {}),
    "MLFE_MAX_HEADER_BYTES": ("8192", lambda c: c.router.max_header_bytes, 8192, {}),
    "MLFE_MAX_HEADER_COUNT": ("20", lambda c: c.router.max_header_count, 20, {}),
    "MLFE_CLIENT_HEADER_TIMEOUT_S": ("5", lambda c: c.router.client_header_timeout_s, 5.0, {}),
    "MLFE_CLIENT_BODY_TIMEOUT_S": ("6", lambda c: c.router.client_body_timeout_s, 6.0, {}),
    "MLFE_KEEPALIVE_TIMEOUT_S": ("7", lambda c: c.router.keepalive_timeout_s, 7.0, {}),
    "MLFE_DRAIN_TIMEOUT_S": ("8", lambda c: c.router.drain_timeout_s, 8.0, {}),
    "MLFE_ACCESS_LOG": ("off", lambda c: c.router.access_log, False, {}),
    "MLFE_DATA_DIR": ("/data", lambda c: c.router.data_dir, Path("/data"), {}),
    "MLFE_LOG_FORMAT": ("text", lambda c: c.router.log_format, "text", {}),
    # azureml's metadata, shown by the sidecar's admin API (GET /v1/services/NAME).
    "MLFE_DESCRIPTION": ("fraud model", lambda c: service_of(c).description, "fraud model", {}),
    "MLFE_TAGS": ('{"team": "risk"}', lambda c: service_of(c).tags, {"team": "risk"}, {}),
    "MLFE_PROPERTIES": ('{"v": "3"}', lambda c: service_of(c).properties, {"v": "3"}, {}),
}


def test_every_setting_has_a_variable_and_all_are_tested() -> None:
    assert {s.var for s in SETTINGS} | {"MLFE_SERVICE_NAME"} == set(REACH)


@pytest.mark.parametrize("var", sorted(REACH))
def test_every_setting_is_reachable(var: str, tmp_path: Path) -> None:
    value, get, expected, companions = REACH[var]
    if value == "<file>":
        value = str(tmp_path / "key")
        Path(value).write_text(f"  {expected}\n")  # as a Secret file may hold it
    settings = settings_from_env({var: value, **companions})
    assert get(settings.config) == expected


def test_defaults_without_any_variable() -> None:
    settings = settings_from_env({"PATH": "/bin", "HOME": "/root"})
    cfg = settings.config
    assert settings.service == "model"
    assert service_of(cfg).upstreams == ["127.0.0.1:5001"]  # azureml's replica port
    assert cfg.router.listen == "0.0.0.0:8080"  # reachable in the pod
    assert cfg.router.admin_listen == "127.0.0.1:8081"
    assert service_of(cfg).auth_enabled and not service_of(cfg).autoscaling
    assert settings.upstream == ("127.0.0.1", 5001)


def test_empty_variables_count_as_unset_and_service_links_are_ignored() -> None:
    settings = settings_from_env({
        "MLFE_SCORING_TIMEOUT_MS": "", "MLFE_PRIMARY_KEY": "  ",
        # What Kubernetes sets for a Service named mlfe in the namespace.
        "MLFE_SERVICE_HOST": "10.0.0.1", "MLFE_SERVICE_PORT": "80", "MLFE_PORT": "tcp://x:80",
        "MLFE_PORT_80_TCP_ADDR": "10.0.0.1", "MLFE_SERVICE_PORT_HTTP": "80",
        "MLFE_ADMIN_TOKEN": ADMIN,
    })
    assert service_of(settings.config).scoring_timeout_ms == 60_000
    assert service_of(settings.config).primary_key is None


@pytest.mark.parametrize(("env", "expected"), [
    ({"MLFE_SCORING_TIMEOUT_MS": "-5"},
     ["MLFE_SCORING_TIMEOUT_MS: Input should be greater than 0 (got '-5')"]),
    ({"MLFE_REPLICA_MAX_CONCURRENT_REQUESTS": "two"},
     ["MLFE_REPLICA_MAX_CONCURRENT_REQUESTS:", "valid integer", "'two'"]),
    ({"MLFE_AUTH_ENABLED": "maybe"}, ["MLFE_AUTH_ENABLED:", "valid boolean", "'maybe'"]),
    ({"MLFE_UPSTREAM": "localhost"}, ["MLFE_UPSTREAM: expected HOST:PORT", "'localhost'"]),
    ({"MLFE_LISTEN": "8080"}, ["MLFE_LISTEN: expected HOST:PORT", "'8080'"]),
    ({"MLFE_LOG_FORMAT": "xml"}, ["MLFE_LOG_FORMAT:", "'json' or 'text'", "'xml'"]),
    ({"MLFE_PERIOD_SECONDS": "0"}, ["MLFE_PERIOD_SECONDS:", "greater than 0", "'0'"]),
    ({"MLFE_SERVICE_NAME": "My_Model"}, ["MLFE_SERVICE_NAME:", "'My_Model'"]),
    ({"MLFE_TLS_CERT_FILE": "/tls/crt"}, ["MLFE_TLS_KEY_FILE: Field required (not set)"]),
    ({"MLFE_TOKEN_ISSUERS": "[{"}, ["MLFE_TOKEN_ISSUERS: not valid JSON", "line 1, column 3"]),
    ({"MLFE_TOKEN_ISSUERS": '[{"issuer": "a", "audience": "b"}]'},
     ["MLFE_TOKEN_ISSUERS[0]: exactly one of jwks_file or jwks_url"]),
    ({"MLFE_TOKEN_AUTH_ENABLED": "1"},
     ["MLFE_AUTH_ENABLED and MLFE_TOKEN_AUTH_ENABLED cannot both be true",
      "MLFE_TOKEN_AUTH_ENABLED='1'"]),
    ({"MLFE_SCORING_TIMEOUT": "5"},
     ["MLFE_SCORING_TIMEOUT: unknown variable (did you mean MLFE_SCORING_TIMEOUT_MS?)"]),
    ({"MLFE_AUTOSCALE_MAX_REPLICAS": "5"},
     ["MLFE_AUTOSCALE_MAX_REPLICAS: does not apply to the sidecar", "no autoscaler"]),
    ({"MLFE_ENTRY_SCRIPT": "score.py"}, ["MLFE_ENTRY_SCRIPT: does not apply", "MLFE_UPSTREAM"]),
    ({"MLFE_UPSTREAMS": "a:1"}, ["MLFE_UPSTREAMS: does not apply", "use MLFE_UPSTREAM"]),
    ({"MLFE_CPU_CORES": "2"}, ["MLFE_CPU_CORES: does not apply"]),
    ({"MLFE_WORKERS": "4"}, ["MLFE_WORKERS: does not apply", "one router process"]),
    ({"MLFE_PRIMARY_KEY_FILE": "/nonexistent/key"},
     ["MLFE_PRIMARY_KEY_FILE: cannot read the key file '/nonexistent/key'"]),
    ({"MLFE_TAGS": '{"team": 5}'}, ["MLFE_TAGS.team: Input should be a valid string"]),
    ({"MLFE_NAMESPACE": "prod"}, ["MLFE_NAMESPACE: does not apply", "pod's namespace"]),
    ({"MLFE_CPU_CORES_LIMIT": "2"}, ["MLFE_CPU_CORES_LIMIT: does not apply", "resources"]),
    ({"MLFE_MEMORY_GB_LIMIT": "2"}, ["MLFE_MEMORY_GB_LIMIT: does not apply", "resources"]),
    ({"MLFE_REPLICA_SERVER": "azureml"}, ["MLFE_REPLICA_SERVER: does not apply"]),
    ({"MLFE_ENABLE_APP_INSIGHTS": "true"},
     ["MLFE_ENABLE_APP_INSIGHTS: does not apply", "MLFE_ACCESS_LOG"]),
    ({"MLFE_COMPUTE_TARGET_NAME": "aks1"},
     ["MLFE_COMPUTE_TARGET_NAME: does not apply", "no equivalent"]),
    ({"MLFE_BLOBFUSE_ENABLED": "true"}, ["MLFE_BLOBFUSE_ENABLED: does not apply"]),
])
def test_bad_values_are_refused_by_variable_name(env: dict[str, str],
                                                 expected: list[str]) -> None:
    with pytest.raises(SidecarConfigError) as exc:
        settings_from_env(env)
    for part in expected:
        assert part in str(exc.value), str(exc.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SidecarConfigError) as exc:
        settings_from_env({"MLFE_SCORING_TIMEOUT_MS": "0", "MLFE_MAX_QUEUE_LENGTH": "-1",
                           "MLFE_MAX_HEADER_COUNT": "x"})
    for var in ("MLFE_SCORING_TIMEOUT_MS", "MLFE_MAX_QUEUE_LENGTH", "MLFE_MAX_HEADER_COUNT"):
        assert var in str(exc.value)


def test_a_key_is_never_shown(tmp_path: Path) -> None:
    short = "short-secret"  # too short: refused, but not echoed
    with pytest.raises(SidecarConfigError) as exc:
        settings_from_env({"MLFE_PRIMARY_KEY": short})
    assert "MLFE_PRIMARY_KEY: String should have at least 16 characters" in str(exc.value)
    assert short not in str(exc.value)
    key_file = tmp_path / "primary-key"
    key_file.write_text(short)
    with pytest.raises(SidecarConfigError) as exc:
        settings_from_env({"MLFE_PRIMARY_KEY_FILE": str(key_file)})
    assert "MLFE_PRIMARY_KEY_FILE" in str(exc.value) and str(key_file) in str(exc.value)
    assert short not in str(exc.value)
    with pytest.raises(SidecarConfigError) as exc:
        settings_from_env({"MLFE_PRIMARY_KEY_FILE": str(key_file), "MLFE_PRIMARY_KEY": KEY1})
    assert "set one of them" in str(exc.value) and KEY1 not in str(exc.value)
    # A rule across settings names the variables, and a key's value stays hidden there too.
    with pytest.raises(SidecarConfigError) as exc:
        settings_from_env({"MLFE_TOKEN_AUTH_ENABLED": "true", "MLFE_PRIMARY_KEY": KEY1})
    assert KEY1 not in str(exc.value)


# ---- readiness thresholds (pure) --------------------------------------------------------------


def test_readiness_follows_the_thresholds() -> None:
    r = Readiness(success_threshold=2, failure_threshold=3)

    def feed(*probes: bool) -> list[bool]:
        return [r.observe(ok) for ok in probes]  # True where readiness changed

    assert [r.ready] == [False]  # unready until proven live
    assert feed(True, False, True) == [False, False, False]  # passes must be in a row
    assert feed(True) == [True] and r.ready
    assert feed(False, False, True, False, False) == [False] * 5  # so must failures
    assert feed(False) == [True]
    assert [r.ready] == [False]
    assert feed(False, True) == [False, False]
    assert feed(True) == [True] and r.ever_ready


# ---- a real sidecar in front of a real replica ---------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def start_replica_on(tmp: Path, port: int, procs: list[Proc]) -> Proc:
    p = spawn(["score-server", "--entry-script", str(EXAMPLES / "echo" / "score.py"),
               "--port", str(port)], tmp / f"replica-{len(procs)}.log", port)
    procs.append(p)
    p.wait_for(lambda: p.get_ok("/"), "replica healthy")
    return p


def start_sidecar(tmp: Path, procs: list[Proc], env: dict[str, str]) -> Proc:
    port = free_port()
    full = {"MLFE_LISTEN": f"127.0.0.1:{port}", "MLFE_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
            "MLFE_STATE_DIR": str(tmp / "state"), "MLFE_ADMIN_TOKEN": ADMIN, **env}
    p = spawn(["sidecar"], tmp / "sidecar.log", port, full)
    procs.append(p)
    p.wait_for(lambda: p.get_ok("/-/healthy"), "sidecar live")
    return p


def status(p: Proc, path: str, **kw: Any) -> int:
    try:
        return httpx.request(kw.pop("method", "GET"), p.url + path, timeout=5, **kw).status_code
    except httpx.TransportError:
        return 0


def score(p: Proc, key: str = KEY1) -> int:
    return status(p, "/api/v1/service/model/score", method="POST", json={"x": 1},
                  headers={"Authorization": f"Bearer {key}"})


def test_readiness_follows_the_model(tmp_path: Path, procs: list[Proc]) -> None:
    upstream = free_port()
    replica = start_replica_on(tmp_path, upstream, procs)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "primary-key").write_text(KEY1 + "\n")
    period, timeout, failures, successes = 1, 1, 2, 1
    sidecar = start_sidecar(tmp_path, procs, {
        "MLFE_UPSTREAM": f"127.0.0.1:{upstream}",
        "MLFE_PRIMARY_KEY_FILE": str(keys / "primary-key"),
        "MLFE_PERIOD_SECONDS": str(period), "MLFE_TIMEOUT_SECONDS": str(timeout),
        "MLFE_FAILURE_THRESHOLD": str(failures), "MLFE_SUCCESS_THRESHOLD": str(successes),
    })
    sidecar.wait_for(lambda: status(sidecar, "/-/ready") == 200, "ready", timeout=10)
    assert score(sidecar) == 200
    assert score(sidecar, "wrong-key-" + "w" * 30) == 401
    assert KEY1 not in sidecar.log()

    replica.proc.kill()  # the model dies
    replica.wait_exit()
    # Unready after `failures` failed probes a period apart (each taking at most `timeout`).
    within = failures * period + timeout + 2.0  # + the poll's and the process's slack
    sidecar.wait_for(lambda: status(sidecar, "/-/ready") == 503, "unready", timeout=within)
    assert score(sidecar) == 503  # No ready replicas: not a 502 from a dead upstream
    assert status(sidecar, "/-/healthy") == 200  # the sidecar itself is fine

    start_replica_on(tmp_path, upstream, procs)  # the model is back on its port
    within = successes * period + timeout + 2.0
    sidecar.wait_for(lambda: status(sidecar, "/-/ready") == 200, "ready again", timeout=within)
    assert score(sidecar) == 200  # at once: the probe put the replica back in rotation

    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait_exit() == 0
    assert "draining" in sidecar.log()


def test_not_ready_until_the_model_is_up(tmp_path: Path, procs: list[Proc]) -> None:
    upstream = free_port()
    sidecar = start_sidecar(tmp_path, procs, {"MLFE_UPSTREAM": f"127.0.0.1:{upstream}",
                                              "MLFE_INITIAL_DELAY_SECONDS": "1",
                                              "MLFE_PRIMARY_KEY": KEY1})
    assert status(sidecar, "/-/ready") == 503
    sidecar.wait_for(lambda: "still not live after 1 s" in sidecar.log(), "the warning")
    start_replica_on(tmp_path, upstream, procs)
    sidecar.wait_for(lambda: status(sidecar, "/-/ready") == 200, "ready", timeout=5)
    assert score(sidecar) == 200


def test_metrics_listener_without_the_admin_token(tmp_path: Path, procs: list[Proc]) -> None:
    upstream = free_port()
    start_replica_on(tmp_path, upstream, procs)
    metrics = free_port()
    sidecar = start_sidecar(tmp_path, procs, {"MLFE_UPSTREAM": f"127.0.0.1:{upstream}",
                                              "MLFE_PRIMARY_KEY": KEY1,
                                              "MLFE_METRICS_LISTEN": f"127.0.0.1:{metrics}"})
    sidecar.wait_for(lambda: score(sidecar) == 200, "a scored request")
    r = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5)
    assert r.status_code == 200
    assert 'mlfe_requests_total{service="model"' in r.text
    assert httpx.get(f"http://127.0.0.1:{metrics}/v1/services/model/keys",
                     timeout=5).status_code == 404
    assert KEY1 not in r.text and ADMIN not in r.text


def test_bad_environment_exits_2_naming_the_variable() -> None:
    env = {"PATH": "/usr/bin:/bin", "MLFE_MAX_REQUEST_WAIT_TIME": "soon",
           "MLFE_PRIMARY_KEY": "too-short"}
    result = subprocess.run([sys.executable, "-m", "deploy.cli", "sidecar"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "MLFE_MAX_REQUEST_WAIT_TIME" in result.stderr and "'soon'" in result.stderr
    assert "MLFE_PRIMARY_KEY" in result.stderr and "too-short" not in result.stderr


# ---- mlfe render --sidecar ------------------------------------------------------------------------

MODEL_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: iris
  namespace: models
  labels: {app: iris}
spec:
  replicas: 2
  selector:
    matchLabels: {app: iris}
  template:
    metadata:
      labels: {app: iris, tier: model}
    spec:
      containers:
        - name: model
          image: registry.example.com/iris:1
          command: [mlfe, score-server, --entry-script, /var/azureml-app/iris/score.py,
                    --host, 127.0.0.1, --port, "5001"]
          ports:
            - {name: http, containerPort: 5001}
          env:
            - {name: WORKER_COUNT, value: "2"}
          livenessProbe:
            httpGet: {path: /, port: http}
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 2
"""

MODEL_SERVICE = """
---
apiVersion: v1
kind: Service
metadata:
  name: iris
  namespace: models
spec:
  selector: {app: iris}
  ports:
    - {name: http, port: 80, targetPort: http}
    - {name: metrics, port: 9100, targetPort: 9100}
"""


def validate(docs: list[dict[str, Any]]) -> None:
    assert docs
    for d in docs:
        kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)


def render_cli(tmp: Path, text: str, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    path = tmp / "deployment.yaml"
    path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["render", "--target", "kubernetes", "--sidecar", "--deployment", str(path),
                     *args])
    docs = [d for d in yaml.safe_load_all(out.getvalue()) if d]
    return code, docs, err.getvalue()


def find(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def containers(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_rendered_sidecar_deployment(tmp_path: Path) -> None:
    code, docs, err = render_cli(tmp_path, MODEL_DEPLOYMENT + MODEL_SERVICE,
                                 "--generate-secret", "--router-image", "reg/mlfe:1")
    assert code == 0, err
    validate(docs)
    assert [d["kind"] for d in docs] == ["Secret", "Deployment", "Service"]
    dep = find(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    model, mlfe = containers(dep)["model"], containers(dep)["mlfe"]
    assert model == yaml.safe_load(MODEL_DEPLOYMENT)["spec"]["template"]["spec"]["containers"][0]
    assert mlfe["image"] == "reg/mlfe:1" and mlfe["command"] == ["mlfe", "sidecar"]
    assert mlfe["ports"] == [{"name": "mlfe-scoring", "containerPort": 8080, "protocol": "TCP"}]
    assert mlfe["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert mlfe["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert mlfe["readinessProbe"]["httpGet"]["port"] == "mlfe-scoring"
    assert mlfe["resources"]["requests"] and mlfe["resources"]["limits"]["memory"]
    sc = mlfe["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0 and not sc["allowPrivilegeEscalation"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]}
    env = env_of(mlfe)
    assert env["MLFE_UPSTREAM"] == "127.0.0.1:5001" and env["MLFE_SERVICE_NAME"] == "iris"
    assert env["MLFE_LISTEN"] == "0.0.0.0:8080"
    # The model's own settings carry over: its concurrency, its liveness probe.
    assert env["MLFE_REPLICA_MAX_CONCURRENT_REQUESTS"] == "2"
    assert (env["MLFE_PERIOD_SECONDS"], env["MLFE_TIMEOUT_SECONDS"],
            env["MLFE_FAILURE_THRESHOLD"]) == ("5", "3", "2")
    # Keys from the mounted Secret, never in the manifest's env.
    secret = find(docs, "Secret")
    assert secret["metadata"] == {"name": "iris-mlfe-keys", "namespace": "models"}
    mounts = {m["name"]: m for m in mlfe["volumeMounts"]}
    assert mounts["mlfe-keys"]["readOnly"]
    assert env["MLFE_PRIMARY_KEY_FILE"] == mounts["mlfe-keys"]["mountPath"] + "/primary-key"
    assert set(secret["stringData"]) == {"primary-key", "secondary-key", "admin-token"}
    assert not any(k in json.dumps(dep) for k in secret["stringData"].values())
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["mlfe-keys"]["secret"]["secretName"] == "iris-mlfe-keys"
    assert pod["terminationGracePeriodSeconds"] >= 45
    # The Service now reaches mlfe; its other port is left alone.
    ports = {p["name"]: p for p in find(docs, "Service")["spec"]["ports"]}
    assert ports["http"]["targetPort"] == "mlfe-scoring"
    assert ports["metrics"]["targetPort"] == 9100


def test_rendered_env_is_a_valid_sidecar_environment(tmp_path: Path) -> None:
    """What render puts in the container is accepted by `mlfe sidecar` as it is."""
    _, docs, _ = render_cli(tmp_path, MODEL_DEPLOYMENT, "--generate-secret")
    mlfe = containers(find(docs, "Deployment"))["mlfe"]
    secret = find(docs, "Secret")["stringData"]
    env = {k: v for k, v in env_of(mlfe).items() if isinstance(v, str)}
    for name in ("primary-key", "secondary-key"):  # the Secret's files, as mounted
        (tmp_path / name).write_text(secret[name])
        var = f"MLFE_{name.upper().replace('-', '_')}_FILE"
        env[var] = str(tmp_path / name)
    settings = settings_from_env(env)
    svc = service_of(settings.config)
    assert settings.service == "iris" and svc.primary_key == secret["primary-key"]
    assert svc.replica_max_concurrent_requests == 2 and svc.period_seconds == 5


def test_a_service_is_added_when_the_file_has_none(tmp_path: Path) -> None:
    code, docs, err = render_cli(tmp_path, MODEL_DEPLOYMENT)
    assert code == 0, err
    validate(docs)
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    svc = find(docs, "Service")
    assert svc["metadata"]["namespace"] == "models"
    assert svc["spec"]["selector"] == {"app": "iris"}
    assert svc["spec"]["ports"][0]["targetPort"] == "mlfe-scoring"
    assert "kubectl -n models create secret generic iris-mlfe-keys" in err  # no --generate-secret


def test_rendering_again_replaces_mlfe_and_keeps_variables_added_by_hand(tmp_path: Path) -> None:
    _, first, _ = render_cli(tmp_path, MODEL_DEPLOYMENT + MODEL_SERVICE)
    mlfe = containers(find(first, "Deployment"))["mlfe"]
    mlfe["env"].append({"name": "MLFE_SCORING_TIMEOUT_MS", "value": "5000"})
    text = yaml.safe_dump_all(first)
    code, again, err = render_cli(tmp_path, text)
    assert code == 0, err
    validate(again)
    dep = find(again, "Deployment")
    assert list(containers(dep)) == ["model", "mlfe"]
    assert env_of(containers(dep)["mlfe"])["MLFE_SCORING_TIMEOUT_MS"] == "5000"
    names = [v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]]
    assert len(names) == len(set(names))
    assert find(again, "Service") == find(first, "Service")


def test_ports_taken_by_the_model_are_avoided(tmp_path: Path) -> None:
    text = MODEL_DEPLOYMENT.replace("containerPort: 5001", "containerPort: 8080").replace(
        '"5001"', '"8080"')
    code, docs, err = render_cli(tmp_path, text, "--service-name", "flowers")
    assert code == 0, err
    validate(docs)
    mlfe = containers(find(docs, "Deployment"))["mlfe"]
    env = env_of(mlfe)
    assert env["MLFE_UPSTREAM"] == "127.0.0.1:8080"
    assert mlfe["ports"][0]["containerPort"] != 8080
    assert env["MLFE_LISTEN"].endswith(f":{mlfe['ports'][0]['containerPort']}")
    assert env["MLFE_SERVICE_NAME"] == "flowers"


def test_several_containers_need_the_model_named(tmp_path: Path) -> None:
    doc = yaml.safe_load(MODEL_DEPLOYMENT)
    doc["spec"]["template"]["spec"]["containers"].append(
        {"name": "logger", "image": "busybox", "ports": [{"containerPort": 9000}]})
    doc["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": 7000}]
    code, _, err = render_cli(tmp_path, yaml.safe_dump(doc))
    assert code == 2 and "--model-container" in err
    code, docs, err = render_cli(tmp_path, yaml.safe_dump(doc), "--model-container", "model")
    assert code == 0, err
    validate(docs)
    assert env_of(containers(find(docs, "Deployment"))["mlfe"])["MLFE_UPSTREAM"] == (
        "127.0.0.1:7000")


@pytest.mark.parametrize(("text", "args", "message"), [
    ("kind: ConfigMap\napiVersion: v1\nmetadata: {name: x}\n", [], "exactly one Deployment"),
    (MODEL_DEPLOYMENT, ["--service-name", "Bad_Name"], "--service-name"),
    (MODEL_DEPLOYMENT, ["--config", "x.yaml"], "neither --config"),
    ("a: [", [], "not valid YAML"),
])
def test_render_sidecar_refusals(tmp_path: Path, text: str, args: list[str],
                                 message: str) -> None:
    code, _, err = render_cli(tmp_path, text, *args)
    assert code == 2 and message in err, err


def test_render_without_config_or_sidecar_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--target", "kubernetes"]) == 2
    assert "--config" in capsys.readouterr().err


def test_kubernetes_validate_cli_passes(tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("kubernetes-validate")
    if not cli.exists():
        pytest.skip("the kubernetes-validate command is not installed next to this Python")
    (tmp_path / "deployment.yaml").write_text(MODEL_DEPLOYMENT + MODEL_SERVICE)
    out = tmp_path / "out"
    assert main(["render", "--target", "kubernetes", "--sidecar", "--deployment",
                 str(tmp_path / "deployment.yaml"), "--generate-secret",
                 "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["deployment.yaml", "secret.yaml"]
    assert (out / "secret.yaml").stat().st_mode & 0o077 == 0
    result = subprocess.run(
        [str(cli), "--strict", "-k", KUBERNETES_VERSION, *sorted(map(str, out.iterdir()))],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 3

