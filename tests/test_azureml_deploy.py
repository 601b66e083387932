"""Azure ML's deployment configurations, unchanged: the SDK's parameters in the YAML, `mlfe
import` of the az ml CLI v1 JSON files, and Microsoft's azmlinfsrv as the replica server.

The JSON files here are written as Azure ML's documentation writes them. The end-to-end test runs
a real `mlfe serve` whose replica is a real azmlinfsrv (from the venv `make setup` installs
`mlfe[azureml]` into: its pins would move the dev venv's packages back).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deploy import render
from deploy.config_file import load_config
from deploy.import_azureml import import_azureml
from mlfe.config import ConfigError, inert_settings, parse_config
from tests.support import Proc, start_router

ROOT = Path(__file__).resolve().parents[1]
AZUREML_PYTHON = ROOT / ".venv-azureml" / "bin" / "python"  # made by `make setup`

# Every parameter of azureml-core's AksWebservice.deploy_configuration (SDK v1), by its name.
AKS_WEBSERVICE_PARAMETERS: dict[str, Any] = {
    "autoscale_enabled": True,
    "autoscale_min_replicas": 2,
    "autoscale_max_replicas": 4,
    "autoscale_refresh_seconds": 5,
    "autoscale_target_utilization": 60,
    "collect_model_data": True,
    "auth_enabled": True,
    "cpu_cores": 0.5,
    "memory_gb": 1,
    "enable_app_insights": True,
    "scoring_timeout_ms": 5000,
    "replica_max_concurrent_requests": 2,
    "max_request_wait_time": 1000,
    "num_replicas": None,  # with autoscale_enabled: the SDK refuses both
    "primary_key": "a-primary-key-of-the-sdk-0001",
    "secondary_key": "a-secondary-key-of-the-sdk-01",
    "tags": {"team": "fraud"},
    "properties": {"model": "gbm-7"},
    "description": "fraud scoring",
    "gpu_cores": 1,
    "period_seconds": 5,
    "initial_delay_seconds": 20,
    "timeout_seconds": 3,
    "success_threshold": 1,
    "failure_threshold": 4,
    "namespace": "fraud",
    "token_auth_enabled": False,
    "compute_target_name": "aks-prod",
    "cpu_cores_limit": 2,
    "memory_gb_limit": 4,
    "blobfuse_enabled": False,
}


def sdk_service(**extra: Any) -> dict[str, Any]:
    params = {k: v for k, v in AKS_WEBSERVICE_PARAMETERS.items() if v is not None}
    return {"entry_script": "score.py", **params, **extra}


# ---- the SDK's parameters in the YAML ---------------------------------------------------------


def test_every_aks_webservice_parameter_is_accepted_by_its_name() -> None:
    cfg = parse_config({"services": {"fraud": sdk_service()}})
    svc = cfg.services["fraud"]
    for key, value in AKS_WEBSERVICE_PARAMETERS.items():
        if value is not None:
            assert getattr(svc, key) == value, key
    assert parse_config({"services": {"x-1": {"entry_script": "s.py", "num_replicas": 3,
                                               "autoscale_enabled": False}}})


def test_an_unknown_key_is_still_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"services\.fraud\.cpu_core_limit: Extra inputs"):
        parse_config({"services": {"fraud": sdk_service(cpu_core_limit=2)}})


def test_limits_below_requests_are_refused_as_azureml_does() -> None:
    with pytest.raises(ConfigError, match=r"cpu_cores_limit \(0\.2\) is less than cpu_cores"):
        parse_config({"services": {"abc": {"entry_script": "s.py", "cpu_cores": 1,
                                           "cpu_cores_limit": 0.2}}})
    with pytest.raises(ConfigError, match=r"memory_gb_limit \(1\) is less than memory_gb"):
        parse_config({"services": {"abc": {"entry_script": "s.py", "memory_gb": 2,
                                           "memory_gb_limit": 1}}})


def test_namespace_must_be_a_kubernetes_name() -> None:
    with pytest.raises(ConfigError, match=r"services\.abc\.namespace: .*Kubernetes namespace"):
        parse_config({"services": {"abc": {"entry_script": "s.py", "namespace": "Fraud_NS"}}})


def test_replica_server_is_for_entry_scripts_only() -> None:
    with pytest.raises(ConfigError, match="replica_server applies to entry_script services"):
        parse_config({"services": {"abc": {"synthetic": "latency=fixed:1",
                                           "replica_server": "azureml"}}})
    with pytest.raises(ConfigError, match=r"replica_server: Input should be 'mlfe' or"):
        parse_config({"services": {"abc": {"entry_script": "s.py", "replica_server": "tf"}}})


def test_endpoint_versions_take_the_sdks_control_version_name() -> None:
    base = {"services": {"blue": {"entry_script": "s.py"}, "green": {"entry_script": "s.py"}}}
    cfg = parse_config({**base, "endpoints": {"fraud-ep": {
        "description": "two models", "tags": {"a": "b"},
        "versions": {"v1": {"service": "blue", "is_control_version_type": True,
                            "description": "the control", "tags": {"stage": "control"}},
                     "v2": {"service": "green", "traffic_percentile": 20}}}}})
    ep = cfg.endpoints["fraud-ep"]
    assert ep.versions["v1"].is_control_version and ep.description == "two models"
    # Two controls are refused whichever name says so.
    with pytest.raises(ConfigError, match="at most one control version"):
        parse_config({**base, "endpoints": {"fraud-ep": {"versions": {
            "v1": {"service": "blue", "is_control_version_type": True},
            "v2": {"service": "green", "is_control_version": True}}}}})
    with pytest.raises(ConfigError, match="disagree"):
        parse_config({**base, "endpoints": {"fraud-ep": {"versions": {
            "v1": {"service": "blue", "is_control_version_type": True,
                   "is_control_version": False}}}}})


def test_settings_without_effect_are_named() -> None:
    cfg = parse_config({"router": {"access_log": False}, "services": {
        "fraud": sdk_service(blobfuse_enabled=True),
        "k8s": {"kubernetes": {"namespace": "a", "deployment": "b"}, "cpu_cores": 2,
                "compute_target_name": "aks-prod"}}})
    inert = inert_settings(cfg)
    for key in ("cpu_cores", "memory_gb", "gpu_cores", "cpu_cores_limit", "memory_gb_limit",
                "namespace", "compute_target_name", "blobfuse_enabled", "enable_app_insights"):
        assert f"services.fraud.{key}" in inert
    # A kubernetes: service's resources were applied by render: only what nothing applies.
    assert [k for k in inert if k.startswith("services.k8s.")] == [
        "services.k8s.compute_target_name"]
    # Defaults (not set) and settings mlfe acts on are not reported.
    cfg = parse_config({"services": {"abc": {"entry_script": "s.py", "scoring_timeout_ms": 9,
                                             "enable_app_insights": True}}})
    assert inert_settings(cfg) == []


# ---- render -----------------------------------------------------------------------------------


def _render(cfg: dict[str, Any], tmp_path: Path) -> list[dict[str, Any]]:
    parsed = parse_config(cfg)
    docs = render.render_kubernetes(parsed, tmp_path, render.RenderOptions(
        namespace="mlfe", image="registry.example/fraud:1"))
    import kubernetes_validate

    for d in docs:
        kubernetes_validate.validate(d, "1.33.0", strict=True)
    return docs


def test_render_applies_limits_namespace_and_the_replica_server(tmp_path: Path) -> None:
    docs = _render({"services": {
        "fraud": sdk_service(replica_server="azureml"),
        "plain": {"entry_script": "score.py"}}}, tmp_path)
    (dep,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "fraud"]
    assert dep["metadata"]["namespace"] == "fraud"
    (svc,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "fraud"]
    assert svc["metadata"]["namespace"] == "fraud"
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                              "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1}}
    assert c["command"] == ["azmlinfsrv", "--entry_script", "/var/azureml-app/score.py",
                            "--port", "5001"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["WORKER_COUNT"] == "2" and env["AZUREML_MODEL_DIR"]
    # The default stays mlfe's own server, memory limit = request, no CPU limit.
    (plain,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "plain"]
    (pc,) = plain["spec"]["template"]["spec"]["containers"]
    assert pc["command"][:2] == ["mlfe", "score-server"]
    assert pc["resources"]["limits"] == {"memory": "512Mi"}
    assert plain["metadata"]["namespace"] == "mlfe"
    # The router follows the model in its namespace, and may scale it there (and only there).
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cluster = yaml.safe_load(cm["data"]["config.yaml"])
    assert cluster["services"]["fraud"]["kubernetes"] == {"namespace": "fraud",
                                                          "deployment": "fraud"}
    assert "replica_server" not in cluster["services"]["fraud"]
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs
             if d["kind"] == "Role"}
    scale = [r for r in roles[("fraud", "mlfe-router")]["rules"]
             if r["resources"] == ["deployments/scale"]]
    assert scale[0]["resourceNames"] == ["fraud"]
    own = [r for r in roles[("mlfe", "mlfe-router")]["rules"]
           if r["resources"] == ["deployments/scale"]]
    assert "fraud" not in own[0]["resourceNames"] and "plain" in own[0]["resourceNames"]


# ---- mlfe import ------------------------------------------------------------------------------

# As Azure ML's "deploy to AKS" documentation writes them (CLI v1).
DEPLOYMENT_CONFIG: dict[str, Any] = {
    "computeType": "aks",
    "autoScaler": {"autoscaleEnabled": True, "minReplicas": 1, "maxReplicas": 3,
                   "refreshPeriodInSeconds": 1, "targetUtilization": 70},
    "authEnabled": True,
    "containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 1.0, "cpuLimit": 1,
                                      "memoryInGBLimit": 2},
    "appInsightsEnabled": True,
    "scoringTimeoutMs": 5000,
    "maxConcurrentRequestsPerContainer": 2,
    "maxQueueWaitMs": 5000,
    "livenessProbeRequirements": {"periodSeconds": 10, "initialDelaySeconds": 310,
                                  "timeoutSeconds": 2, "successThreshold": 1,
                                  "failureThreshold": 3},
    "dataCollection": {"storageEnabled": True},
    "namespace": "fraud",
    "keys": {"primaryKey": "sekrit-primary-key-value-01", "secondaryKey":
             "sekrit-secondary-key-value-1"},
    "tags": {"team": "fraud"},
    "description": "fraud scoring",
}
INFERENCE_CONFIG: dict[str, Any] = {
    "entryScript": "score.py",
    "sourceDirectory": "src",
    "environment": {
        "name": "fraud-env",
        "python": {"condaDependencies": {"dependencies": ["python=3.11", "scikit-learn"]}},
        "environmentVariables": {"MODEL_FLAVOUR": "large"},
    },
}


def test_import_maps_every_deployment_key(tmp_path: Path) -> None:
    config, notes = import_azureml(DEPLOYMENT_CONFIG, INFERENCE_CONFIG, "fraud",
                                   inference_dir=tmp_path, output_dir=tmp_path)
    svc = config["services"]["fraud"]
    assert svc == {
        "autoscale_enabled": True, "autoscale_min_replicas": 1, "autoscale_max_replicas": 3,
        "autoscale_refresh_seconds": 1, "autoscale_target_utilization": 70,
        "auth_enabled": True, "cpu_cores": 0.5, "memory_gb": 1.0, "cpu_cores_limit": 1,
        "memory_gb_limit": 2, "enable_app_insights": True, "scoring_timeout_ms": 5000,
        "replica_max_concurrent_requests": 2, "max_request_wait_time": 5000,
        "period_seconds": 10, "initial_delay_seconds": 310, "timeout_seconds": 2,
        "success_threshold": 1, "failure_threshold": 3, "collect_model_data": True,
        "namespace": "fraud", "primary_key": "sekrit-primary-key-value-01",
        "secondary_key": "sekrit-secondary-key-value-1", "tags": {"team": "fraud"},
        "description": "fraud scoring", "entry_script": "src/score.py",
        "environment_variables": {"MODEL_FLAVOUR": "large"},
    }
    # What describes an image is not carried over, and said so.
    assert any("environment.name, environment.python" in n for n in notes)


def test_import_of_an_endpoint_gives_an_endpoint_and_its_version(tmp_path: Path) -> None:
    deployment = {"computeType": "AKSENDPOINT", "versionName": "versiona",
                  "trafficPercentile": 20, "tokenAuthEnabled": True, "authEnabled": False,
                  "numReplicas": 2}
    config, _ = import_azureml(deployment, {"entryScript": "score.py"}, "fraud-ep",
                               inference_dir=tmp_path, output_dir=tmp_path)
    assert config["services"] == {"versiona": {"num_replicas": 2, "entry_script": "score.py"}}
    assert config["endpoints"] == {"fraud-ep": {
        "token_auth_enabled": True, "auth_enabled": False,
        "versions": {"versiona": {"service": "versiona", "is_default": True,
                                  "traffic_percentile": 20}}}}


@pytest.mark.parametrize(("doc", "message"), [
    ({**DEPLOYMENT_CONFIG, "sslEnabled": True}, "sslEnabled: not a key mlfe knows"),
    ({**DEPLOYMENT_CONFIG, "autoScaler": {"minReplica": 1}}, "autoScaler.minReplica: not a key"),
    ({**DEPLOYMENT_CONFIG, "computeType": "ACI"}, "computeType: only AKS"),
    ({k: v for k, v in DEPLOYMENT_CONFIG.items() if k != "computeType"},
     "computeType is missing"),
    ({**DEPLOYMENT_CONFIG, "keys": {"primaryKey": "sekrit-short"}},
     r"services\.fraud\.primary_key: String should have at least 16 characters"),
    ({**DEPLOYMENT_CONFIG, "dataCollection": {"eventHubEnabled": True}},
     "no Event Hub"),
])
def test_import_refuses_what_it_cannot_map_naming_the_key(
        tmp_path: Path, doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        import_azureml(doc, None, "fraud", inference_dir=tmp_path, output_dir=tmp_path)
    assert "sekrit" not in str(err.value)


def test_import_refuses_unknown_inference_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="entryScripts: not a key"):
        import_azureml(DEPLOYMENT_CONFIG, {"entryScripts": "score.py"}, "fraud",
                       inference_dir=tmp_path, output_dir=tmp_path)


def test_mlfe_import_writes_a_config_mlfe_serves(tmp_path: Path) -> None:
    """The command as a user runs it: files on disk, an owner-only output that loads."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "score.py").write_text("def init(): pass\ndef run(d): return d\n")
    (tmp_path / "deploymentconfig.json").write_text(json.dumps(DEPLOYMENT_CONFIG, indent=4))
    (tmp_path / "inferenceconfig.json").write_text(json.dumps(INFERENCE_CONFIG, indent=4))
    (tmp_path / "out").mkdir()
    cmd = [sys.executable, "-m", "deploy.cli", "import", "--deployment-config",
           "deploymentconfig.json", "--inference-config", "inferenceconfig.json",
           "--name", "fraud", "--output", "out/mlfe.yaml"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out" / "mlfe.yaml"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "note: environment.name, environment.python" in done.stderr
    cfg = load_config(out)
    assert cfg.services["fraud"].entry_script.resolve() == tmp_path / "src" / "score.py"
    assert "sekrit" not in done.stderr
    # It does not overwrite; a broken file is refused by position, never echoed.
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=60, check=False)
    assert again.returncode == 2 and "exists" in again.stderr
    (tmp_path / "broken.json").write_text('{"keys": {"primaryKey": "sekrit-x",}}')
    broken = subprocess.run([*cmd[:5], "broken.json"], cwd=tmp_path, capture_output=True,
                            text=True, env=env, timeout=60, check=False)
    assert broken.returncode == 2 and "not valid JSON (line 1" in broken.stderr
    assert "sekrit" not in broken.stderr


# ---- Microsoft's server as the replica server, through mlfe serve -----------------------------

SCORE = '''
import json
import os

def init():
    global flavour
    flavour = os.environ.get("MODEL_FLAVOUR", "none")

def run(raw_data):
    data = json.loads(raw_data)["data"]
    return {"sum": sum(data), "flavour": flavour, "pid": os.getpid()}
'''


def test_replica_server_azureml_serves_through_mlfe(tmp_path: Path) -> None:
    if not AZUREML_PYTHON.exists():
        pytest.skip("no .venv-azureml (make setup installs mlfe[azureml] there)")
    (tmp_path / "score.py").write_text(SCORE)
    router = start_router(tmp_path, {"services": {"fraud": {
        "entry_script": str(tmp_path / "score.py"), "replica_server": "azureml",
        "num_replicas": 1, "auth_enabled": False, "initial_delay_seconds": 60,
        "environment_variables": {"MODEL_FLAVOUR": "large"},
        "description": "fraud scoring", "tags": {"team": "fraud"},
        "properties": {"model": "gbm-7"}, "cpu_cores_limit": 1}}},
        env={"MLFE_AZMLINFSRV_PYTHON": str(AZUREML_PYTHON)})
    try:
        url = f"{router.url}/api/v1/service/fraud/score"

        def scored() -> bool:
            try:
                return httpx.post(url, json={"data": [1, 2]}, timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        router.wait_for(scored, "a score from azmlinfsrv", timeout=90)
        r = httpx.post(url, json={"data": [1, 2, 3]}, timeout=5)
        assert r.json()["sum"] == 6 and r.json()["flavour"] == "large"
        # Microsoft's server answered (it names itself), behind mlfe's request id.
        assert r.headers["x-ms-server-version"].startswith("azmlinfsrv/")
        assert len(r.headers["x-ms-request-id"]) == 36
        # It listens on loopback only, on the port mlfe picked.
        _assert_loopback_only(router, r.json()["pid"])
        # The deploy configuration's metadata is shown; the inert key was named at start.
        _assert_described(router)
        assert "accepted, without effect in this run: services.fraud.cpu_cores_limit" in (
            router.log())
    finally:
        router.signal()
        router.wait_exit()


def _assert_loopback_only(router: Proc, pid: int) -> None:
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=False,
                               timeout=10).stdout
    mine = [line for line in listening.splitlines() if f"pid={pid}," in line]
    if not mine:  # a gunicorn worker answered: its master holds the socket
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        mine = [line for line in listening.splitlines() if f"pid={ppid}," in line]
    assert mine, listening
    assert all(" 127.0.0.1:" in line for line in mine), mine


def _assert_described(router: Proc) -> None:
    cfg = yaml.safe_load(router.extra["config_path"].read_text())
    admin = cfg["router"]["admin_listen"]
    token = (router.extra["state_dir"] / "admin-token").read_text().strip()
    svc = httpx.get(f"http://{admin}/v1/services/fraud",
                    headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
    assert svc["description"] == "fraud scoring"
    assert svc["tags"] == {"team": "fraud"} and svc["properties"] == {"model": "gbm-7"}
    shown = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "services", "fraud", "--admin-url",
         f"http://{admin}", "--token", token], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    lines = [" ".join(line.split()) for line in shown.stdout.splitlines()]
    for line in ("description: fraud scoring", "tags.team: fraud", "properties.model: gbm-7"):
        assert line in lines, shown.stdout


def test_serve_refuses_replica_server_azureml_without_azmlinfsrv(tmp_path: Path) -> None:
    (tmp_path / "score.py").write_text(SCORE)
    cfg = tmp_path / "mlfe.yaml"
    cfg.write_text(yaml.safe_dump({
        "router": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                   "state_dir": str(tmp_path / "state")},
        "services": {"fraud": {"entry_script": "score.py", "replica_server": "azureml"}}}))
    done = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "serve", "--config", str(cfg)], cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "MLFE_AZMLINFSRV_PYTHON": str(tmp_path / "no-such-python")})
    assert done.returncode == 2
    assert "services.fraud.replica_server: azureml needs" in done.stderr
    assert "MLFE_AZMLINFSRV_PYTHON" in done.stderr
