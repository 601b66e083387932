"""`mlfe import`: the JSON files Azure ML's CLI v1 deploys from, as an mlfe YAML service.

`az ml model deploy --deploy-config-file deploymentconfig.json --inference-config-file
inferenceconfig.json` takes a deployment configuration (the parameters of
`AksWebservice.deploy_configuration` / `AksEndpoint.deploy_configuration`, in the REST payload's
camelCase names) and an inference configuration (the entry script and the environment to build an
image from). Every key of the deployment configuration has an mlfe key of the SDK's name, so it
maps one to one; `computeType: aksendpoint` also gives an endpoint with one version. Of the
inference configuration, the entry script and the environment variables carry over; what
describes an image to build (conda file, base image, Docker steps) cannot, and is listed in the
output's header, not dropped silently. A key this module does not know is refused, naming it; no
error ever shows a key's value (the files may hold keys).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mlfe.config import NAME_RE, VERSION_RE, ConfigError, parse_config


class ImportError_(ConfigError):
    """A file that cannot be imported; the message names the file and the key."""


# deploymentconfig.json key -> mlfe service key (nested objects: "parent.child").
SERVICE_KEYS: dict[str, str] = {
    "autoScaler.autoscaleEnabled": "autoscale_enabled",
    "autoScaler.minReplicas": "autoscale_min_replicas",
    "autoScaler.maxReplicas": "autoscale_max_replicas",
    "autoScaler.refreshPeriodInSeconds": "autoscale_refresh_seconds",
    "autoScaler.targetUtilization": "autoscale_target_utilization",
    "containerResourceRequirements.cpu": "cpu_cores",
    "containerResourceRequirements.memoryInGB": "memory_gb",
    "containerResourceRequirements.gpu": "gpu_cores",
    "containerResourceRequirements.cpuLimit": "cpu_cores_limit",
    "containerResourceRequirements.memoryInGBLimit": "memory_gb_limit",
    "gpuCores": "gpu_cores",
    "dataCollection.storageEnabled": "collect_model_data",
    "appInsightsEnabled": "enable_app_insights",
    "scoringTimeoutMs": "scoring_timeout_ms",
    "maxConcurrentRequestsPerContainer": "replica_max_concurrent_requests",
    "maxQueueWaitMs": "max_request_wait_time",
    "numReplicas": "num_replicas",
    "livenessProbeRequirements.periodSeconds": "period_seconds",
    "livenessProbeRequirements.initialDelaySeconds": "initial_delay_seconds",
    "livenessProbeRequirements.timeoutSeconds": "timeout_seconds",
    "livenessProbeRequirements.successThreshold": "success_threshold",
    "livenessProbeRequirements.failureThreshold": "failure_threshold",
    "namespace": "namespace",
    "computeTargetName": "compute_target_name",
    "blobfuseEnabled": "blobfuse_enabled",
}
# Keys of whoever is scored: the service, or with aksendpoint the endpoint.
OWNER_KEYS: dict[str, str] = {
    "authEnabled": "auth_enabled",
    "tokenAuthEnabled": "token_auth_enabled",
    "keys.primaryKey": "primary_key",
    "keys.secondaryKey": "secondary_key",
    "tags": "tags",
    "properties": "properties",
    "description": "description",
}
ENDPOINT_VERSION_KEYS = ("versionName", "trafficPercentile")
# Known keys that carry nothing over: dataCollection's Event Hub has no mlfe counterpart, but
# false (the default) is harmless.
_FALSE_ONLY = ("dataCollection.eventHubEnabled",)
_GROUPS = ("autoScaler", "containerResourceRequirements", "dataCollection",
           "livenessProbeRequirements", "keys")

# inferenceconfig.json: what describes the image to build; mlfe runs the entry script in the
# Python environment it runs in (or the image you build for `mlfe render`).
IMAGE_KEYS = ("runtime", "condaFile", "extraDockerfileSteps", "baseImage", "baseImageRegistry",
              "enableGpu", "cudaVersion", "schemaFile", "dependencies")
INFERENCE_KEYS = ("entryScript", "sourceDirectory", "environment", "description", *IMAGE_KEYS)


def _flatten(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """{"autoScaler": {"minReplicas": 1}} -> {"autoScaler.minReplicas": 1}; tags and
    properties stay whole."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _GROUPS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ImportError_(f"{source}: {key} must be an object")
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def _relative(path: str, base: Path, out_dir: Path) -> str:
    """A path of the inference config (relative to where `az ml` ran, here `base`) as the
    mlfe config needs it: relative to the config file's own directory."""
    absolute = (base / path).resolve()
    return Path(os.path.relpath(absolute, out_dir)).as_posix()


def import_azureml(
    deployment: Any,
    inference: Any | None,
    name: str,
    *,
    deployment_source: str = "deploymentconfig.json",
    inference_source: str = "inferenceconfig.json",
    inference_dir: Path = Path("."),
    output_dir: Path = Path("."),
) -> tuple[dict[str, Any], list[str]]:
    """The mlfe config (a mapping to dump as YAML) and notes on what did not carry over."""
    notes: list[str] = []
    if not isinstance(deployment, dict):
        raise ImportError_(f"{deployment_source}: the top level must be a JSON object")
    if not NAME_RE.match(name):
        raise ImportError_(
            f"--name: {name!r} is not a service name (3-32 lowercase letters, digits and '-', "
            "starting with a letter)")
    flat = _flatten(deployment, deployment_source)
    compute = flat.pop("computeType", None)
    kind = compute.lower() if isinstance(compute, str) else None
    if kind not in ("aks", "aksendpoint"):
        raise ImportError_(
            f"{deployment_source}: computeType: only AKS deployment configurations (aks, "
            "aksendpoint) can be imported" if compute is not None else
            f"{deployment_source}: computeType is missing (aks or aksendpoint)")
    service: dict[str, Any] = {}
    owner: dict[str, Any] = {}
    version: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue  # the SDK's "not given"
        if key in SERVICE_KEYS:
            service[SERVICE_KEYS[key]] = value
        elif key in OWNER_KEYS:
            owner[OWNER_KEYS[key]] = value
        elif kind == "aksendpoint" and key in ENDPOINT_VERSION_KEYS:
            version[key] = value
        elif key in _FALSE_ONLY:
            if value is not False:
                raise ImportError_(f"{deployment_source}: {key}: mlfe has no Event Hub data "
                                   "collection (dataCollection.storageEnabled writes files)")
        else:
            raise ImportError_(f"{deployment_source}: {key}: not a key mlfe knows of an AKS "
                               "deployment configuration")

    if inference is not None:
        _map_inference(inference, service, notes, inference_source, inference_dir, output_dir)
    else:
        service["entry_script"] = "score.py"
        notes.append("no --inference-config: entry_script is score.py; change it if yours "
                      "is another file")
    notes.append("set model_dir to the folder of your model files (the entry script's "
                 "AZUREML_MODEL_DIR); Azure ML downloaded registered models there")

    config: dict[str, Any]
    if kind == "aks":
        config = {"services": {name: {**service, **owner}}}
    else:
        v_name = version.get("versionName")
        if not isinstance(v_name, str) or not VERSION_RE.match(v_name):
            raise ImportError_(f"{deployment_source}: versionName: an aksendpoint configuration "
                               "needs a version name (letters, digits, '.', '_', '-')")
        svc_name = v_name if NAME_RE.match(v_name) and v_name != name else f"{name}-v"
        if not NAME_RE.match(svc_name):
            raise ImportError_(f"--name: {name!r} leaves no room for its version's service name")
        entry: dict[str, Any] = {"service": svc_name, "is_default": True}
        if "trafficPercentile" in version:
            entry["traffic_percentile"] = version["trafficPercentile"]
        config = {"services": {svc_name: service},
                  "endpoints": {name: {**owner, "versions": {v_name: entry}}}}
    # The result must be a valid mlfe config; its errors name mlfe's keys (values of keys never).
    parse_config(config, "the imported configuration")
    return config, notes


def _map_inference(inference: Any, service: dict[str, Any], notes: list[str], source: str,
                   base: Path, out_dir: Path) -> None:
    if not isinstance(inference, dict):
        raise ImportError_(f"{source}: the top level must be a JSON object")
    for key in inference:
        if key not in INFERENCE_KEYS:
            raise ImportError_(f"{source}: {key}: not a key mlfe knows of an inference "
                               "configuration")
    script = inference.get("entryScript")
    if not isinstance(script, str) or not script:
        raise ImportError_(f"{source}: entryScript is missing (the file defining init() and "
                           "run())")
    source_dir = inference.get("sourceDirectory")
    if source_dir is not None and not isinstance(source_dir, str):
        raise ImportError_(f"{source}: sourceDirectory must be a path")
    # The SDK resolves the entry script inside the source directory when one is given.
    service["entry_script"] = _relative(
        str(Path(source_dir) / script) if source_dir else script, base, out_dir)
    if inference.get("description") is not None:
        service.setdefault("description", inference["description"])
    env = inference.get("environment")
    if env is not None:
        if not isinstance(env, dict):
            raise ImportError_(f"{source}: environment must be an object")
        variables = env.get("environmentVariables")
        if variables:
            if not isinstance(variables, dict):
                raise ImportError_(f"{source}: environment.environmentVariables must be an "
                                   "object")
            service["environment_variables"] = {str(k): str(v) for k, v in variables.items()}
        rest = sorted(k for k in env if k != "environmentVariables" and env[k] is not None)
        if rest:
            notes.append(f"environment.{', environment.'.join(rest)}: not carried over; the "
                         "replicas run in mlfe's Python environment (or the image you build "
                         "for `mlfe render`): install the environment's packages there")
    image = [k for k in IMAGE_KEYS if inference.get(k) is not None]
    if image:
        notes.append(f"{', '.join(image)}: not carried over; they describe an image to build: "
                     "install its packages where the replicas run")


def _read_json(path: str, flag: str) -> Any:
    try:
        text = Path(path).read_text("utf-8")
    except OSError as e:
        raise ImportError_(f"{flag}: cannot read {path!r}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # The position, never the text: the file may hold keys.
        raise ImportError_(f"{flag}: {path!r} is not valid JSON (line {e.lineno}, column "
                           f"{e.colno})") from None


def default_name(deployment_config: str) -> str:
    return Path(deployment_config).stem.lower().replace("_", "-")


def run_import(deployment_config: str, inference_config: str | None, name: str | None,
               output: str | None, write: Callable[[str], Any] = sys.stdout.write) -> int:
    """The `mlfe import` command: 0, or 2 with the reason on stderr."""
    out_path = Path(output) if output and output != "-" else None
    try:
        if out_path is not None and out_path.exists():
            raise ImportError_(f"--output: {output!r} exists; mlfe import does not overwrite")
        deployment = _read_json(deployment_config, "--deployment-config")
        inference = (_read_json(inference_config, "--inference-config")
                     if inference_config else None)
        config, notes = import_azureml(
            deployment, inference, name or default_name(deployment_config),
            deployment_source=deployment_config,
            inference_source=inference_config or "inferenceconfig.json",
            inference_dir=Path.cwd(),
            output_dir=(out_path.parent if out_path else Path(".")).resolve())
    except ConfigError as e:
        print(f"mlfe import: {e}", file=sys.stderr)
        return 2
    header = "".join(
        [f"# Imported by `mlfe import` from {deployment_config}"
         + (f" and {inference_config}" if inference_config else "") + ".\n",
         *(f"# note: {n}\n" for n in notes)])
    text = header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    if out_path is None:
        write(text)
    else:
        # Owner-only: the file may hold the service's keys.
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"mlfe import: wrote {out_path}", file=sys.stderr)
    for n in notes:
        print(f"mlfe import: note: {n}", file=sys.stderr)
    return 0
