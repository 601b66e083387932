"""mlfe's configuration schema: validated models with azureml's names and defaults.

The bottom layer of mlfe (docs/architecture.md): pure data and validation, no file or network
I/O, so the router and the deployment layer both build on it. Reading a YAML file is
deploy/config_file.py. Every error names the key path and the problem, and the value given only
where it cannot be a secret (mlfe/redact.py: numbers, booleans, choices, addresses and names);
a config is accepted or refused whole: `parse_config` returns a complete `MlfeConfig` or raises
`ConfigError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mlfe.redact import SHOWN, shown_value
from mlfe.synthetic_spec import SyntheticSpec

# azureml service names: 3-32 chars, lowercase letters, digits and '-', starting with a letter.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{1,30}[a-z0-9]$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]")
MAX_VERSIONS_PER_ENDPOINT = 6

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
# Strings that errors may echo (mlfe/redact.py): addresses and names are never secrets.
Shown = Annotated[str, SHOWN]


class ConfigError(ValueError):
    """A configuration was refused; the message names each bad key and what is wrong with it
    (its value too where that cannot be a secret)."""


def parse_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:8080' -> ('127.0.0.1', 8080); '[::1]:8080' -> ('::1', 8080).

    The error does not repeat the value (it may be a URL with a password in it): whoever
    formats it shows the value when the rule lets it (mlfe/redact.py)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT")
    if not _HOST_RE.fullmatch(host):
        raise ValueError("HOST is not a host name or IP address")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Model(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them rather than ignore them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Model):
    cert_file: Path
    key_file: Path


class TokenIssuer(_Model):
    issuer: str
    audience: str
    jwks_file: Path | None = None
    jwks_url: str | None = None

    @model_validator(mode="after")
    def _one_jwks_source(self) -> TokenIssuer:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("exactly one of jwks_file or jwks_url is required")
        return self


def _hostport(v: str) -> str:
    parse_hostport(v)
    return v


# One upstream: checked one by one, so that an error names its index and shows its value.
HostPort = Annotated[str, SHOWN, AfterValidator(_hostport)]


def _check_address(v: str | None) -> str | None:
    if v is not None and not v.startswith("unix:"):
        parse_hostport(v)
    return v


class CoordinationSettings(_Model):
    """Several router instances sending to the same replicas share each replica's slots
    through a slot broker (router/coordination.py): one instance runs it (`listen`), every
    instance joins it (`broker`; the one that runs it joins its own by default)."""

    listen: Shown | None = None
    broker: Shown | None = None
    grace_seconds: PositiveFloat = 2.0
    member_id: str | None = None  # default: host name and process id

    @field_validator("listen", "broker")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        return _check_address(v)

    @model_validator(mode="after")
    def _somewhere(self) -> CoordinationSettings:
        if self.listen is None and self.broker is None:
            raise ValueError("set listen (run the broker here) and/or broker (join one)")
        return self

    @property
    def broker_address(self) -> str:
        address = self.broker or self.listen
        assert address is not None
        return address


class SelfScalingSettings(_Model):
    """The router scales itself (azureml-fe): more worker processes when its own routing time
    stays high, more pods if that persists; fewer by CPU. Off with cluster_purpose DevTest."""

    max_workers: PositiveInt | Literal["auto"] = 1  # "auto": the cores this process may use
    max_pods: PositiveInt = 1  # > 1: also scale the router's own Deployment (in a cluster)
    # Never fewer router pods than this (`mlfe render --target kubernetes` sets 2: a cluster's
    # front end survives the loss of one pod).
    min_pods: PositiveInt = 1
    deployment: Shown = "mlfe-router"  # the router's own Deployment, in the pod's namespace
    routing_time_up_ms: PositiveFloat = 2.0
    up_window_seconds: PositiveFloat = 10.0
    cpu_down_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.3
    down_window_seconds: PositiveFloat = 300.0
    cooldown_seconds: PositiveFloat = 30.0  # after any change of workers or pods
    pod_cooldown_seconds: PositiveFloat = 120.0  # after a change of pods (at least cooldown)
    period_seconds: PositiveFloat = 5.0

    @model_validator(mode="after")
    def _pods_in_order(self) -> SelfScalingSettings:
        if self.min_pods > self.max_pods:
            raise ValueError(f"min_pods ({self.min_pods}) is more than max_pods "
                             f"({self.max_pods})")
        return self


class RouterSettings(_Model):
    listen: Shown = "127.0.0.1:8080"
    admin_listen: Shown = "127.0.0.1:8081"
    # GET /metrics alone, without the admin token, for a stock Prometheus (off by default; on in
    # the rendered manifests). The admin port keeps /metrics too, behind its token.
    metrics_listen: Shown | None = None
    state_dir: Path = Path(".mlfe")
    cluster_purpose: Literal["FastProd", "DenseProd", "DevTest"] = "FastProd"
    max_body_bytes: PositiveInt = 100 * 1024 * 1024
    tls: TlsSettings | None = None
    token_issuers: list[TokenIssuer] = Field(default_factory=list)
    # Tokens the router issues (POST /v1/services/{name}/token): lifetime and clock leeway.
    token_lifetime_s: PositiveInt = 3600
    token_leeway_s: Annotated[float, Field(ge=0)] = 30.0
    # Client-side protocol limits (nginx's defaults where it has one).
    max_header_bytes: PositiveInt = 64 * 1024
    max_header_count: PositiveInt = 100
    client_header_timeout_s: PositiveFloat = 60.0
    client_body_timeout_s: PositiveFloat = 60.0
    keepalive_timeout_s: PositiveFloat = 75.0
    # Worker processes sharing the scoring port ("auto": the cores this process may use).
    workers: PositiveInt | Literal["auto"] = 1
    coordination: CoordinationSettings | None = None
    self_scaling: SelfScalingSettings = Field(default_factory=SelfScalingSettings)
    # Graceful shutdown: how long in-flight requests may take to finish after SIGTERM.
    drain_timeout_s: PositiveFloat = 30.0
    # One line per request on stdout; the format applies to the router's own log too (stderr).
    access_log: bool = True
    # Where `collect_model_data` services' inputs and outputs go (default: <state_dir>/modeldata).
    data_dir: Path | None = None
    log_format: Literal["json", "text"] = "json"

    @field_validator("listen", "admin_listen", "metrics_listen")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hostport(v)
        return v

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    @property
    def admin_addr(self) -> tuple[str, int]:
        return parse_hostport(self.admin_listen)

    @property
    def metrics_addr(self) -> tuple[str, int] | None:
        return None if self.metrics_listen is None else parse_hostport(self.metrics_listen)


class KubernetesDeployment(_Model):
    """A `kubernetes:` service: its replicas are this Deployment's pods."""

    namespace: Shown
    deployment: Shown


_SCALING_KEYS = (
    "num_replicas",
    "autoscale_enabled",
    "autoscale_min_replicas",
    "autoscale_max_replicas",
    "autoscale_refresh_seconds",
    "autoscale_target_utilization",
    "autoscale_scale_down_window_seconds",
    "autoscale_policy",
    "autoscale_cold_start_seconds",
)


_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class Described(_Model):
    """azureml's free-form metadata of a webservice, an endpoint or a version: kept and shown
    (`GET /v1/services/{name}`, `mlfe services NAME`), never interpreted."""

    description: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    properties: dict[str, str] = Field(default_factory=dict)


class AuthSettings(Described):
    auth_enabled: bool = True
    token_auth_enabled: bool = False
    primary_key: str | None = Field(default=None, min_length=16, repr=False)
    secondary_key: str | None = Field(default=None, min_length=16, repr=False)

    @model_validator(mode="after")
    def _one_auth_mode(self) -> AuthSettings:
        if self.auth_enabled and self.token_auth_enabled:
            raise ValueError(
                "auth_enabled and token_auth_enabled cannot both be true "
                "(set auth_enabled: false to use token auth)"
            )
        return self


class ServiceConfig(AuthSettings):
    # Where replicas come from: exactly one of these.
    entry_script: Path | None = None
    upstreams: list[HostPort] | None = None
    kubernetes: KubernetesDeployment | None = None
    synthetic: SyntheticSpec | None = None  # a model stand-in (deploy/synthetic.py)
    model_dir: Path | None = None

    scoring_timeout_ms: PositiveInt = 60_000
    replica_max_concurrent_requests: PositiveInt = 1
    max_request_wait_time: PositiveInt = 500
    # Requests allowed to wait for a slot at once; more are refused at once with 503.
    max_queue_length: PositiveInt = 1024

    autoscale_enabled: bool | None = None  # default: on unless num_replicas is given
    # 0: scale to zero when idle for a scale-down window; the next request starts a replica.
    autoscale_min_replicas: Annotated[int, Field(ge=0)] = 1
    autoscale_max_replicas: PositiveInt = 10
    autoscale_refresh_seconds: PositiveFloat = 1.0
    autoscale_target_utilization: Annotated[int, Field(gt=0, le=100)] = 70
    # Scale down only to the highest replica count wanted over this window (azureml: ~1 min).
    autoscale_scale_down_window_seconds: PositiveFloat = 60.0
    # demand: arrival rate x service time (Little's law); azureml: azureml-fe's utilization rule.
    autoscale_policy: Literal["demand", "azureml"] = "demand"
    # With autoscale_min_replicas 0: how long a request may wait for the first replica to start
    # (its max_request_wait_time for a free slot then counts from that replica's start).
    autoscale_cold_start_seconds: PositiveFloat = 60.0
    num_replicas: PositiveInt | None = None
    environment_variables: dict[str, str] = Field(default_factory=dict)
    # A request body that `mlfe up` shows in its ready-to-paste curl line.
    sample_input: str | None = None

    collect_model_data: bool = False
    cpu_cores: PositiveFloat = 0.1
    memory_gb: PositiveFloat = 0.5
    gpu_cores: Annotated[int, Field(ge=0)] = 0

    period_seconds: PositiveInt = 10
    initial_delay_seconds: PositiveInt = 310
    timeout_seconds: PositiveInt = 2
    success_threshold: PositiveInt = 1
    failure_threshold: PositiveInt = 3

    # The rest of AksWebservice.deploy_configuration's parameters, under the SDK's names.
    cpu_cores_limit: PositiveFloat | None = None  # rendered as the container's limits
    memory_gb_limit: PositiveFloat | None = None
    namespace: Shown | None = None  # the namespace `mlfe render` puts the model Deployment in
    # What Application Insights would get, mlfe writes anyway: the access log (one line per
    # request), the replica's own output relayed into mlfe's log, and /metrics.
    enable_app_insights: bool = False
    compute_target_name: str | None = None  # an Azure ML compute target: nothing to pick here
    blobfuse_enabled: bool | None = None  # model download through blobfuse: no equivalent

    # Which inference server runs each local or rendered replica: mlfe's own `mlfe score-server`
    # or Microsoft's `azmlinfsrv` (azureml-inference-server-http, `pip install 'mlfe[azureml]'`).
    replica_server: Literal["mlfe", "azureml"] = "mlfe"

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is not None and not _DNS_LABEL_RE.match(v):
            raise ValueError(
                "not a Kubernetes namespace name (lowercase letters, digits and '-', at most "
                "63, starting and ending with a letter or digit)"
            )
        return v

    @field_validator("upstreams")
    @classmethod
    def _upstreams(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("at least one upstream HOST:PORT is required")
        return v

    @model_validator(mode="after")
    def _azureml_rules(self) -> ServiceConfig:
        sources = [
            k for k in ("entry_script", "upstreams", "kubernetes", "synthetic")
            if getattr(self, k) is not None
        ]
        if len(sources) != 1:
            raise ValueError(
                "exactly one of entry_script, upstreams, kubernetes, synthetic is required"
                + (f" (got {', '.join(sources)})" if sources else "")
            )
        if self.replica_server != "mlfe" and self.entry_script is None:
            raise ValueError("replica_server applies to entry_script services only")
        if self.upstreams is not None:
            fixed = sorted(set(_SCALING_KEYS) & self.model_fields_set)
            if fixed:
                raise ValueError(
                    f"{', '.join(fixed)} do not apply to static upstreams "
                    "(the upstreams list is the replica pool)"
                )
            return self
        if self.autoscale_enabled is True and self.num_replicas is not None:
            raise ValueError("autoscale enabled and num_replicas provided")
        if self.autoscale_enabled is False and self.num_replicas is None:
            raise ValueError("autoscale_enabled is false but num_replicas is not set")
        if not self.autoscaling:
            stray = sorted(
                k for k in self.model_fields_set if k.startswith("autoscale_")
                and k != "autoscale_enabled"
            )
            if stray:
                raise ValueError(f"{', '.join(stray)} provided without enabling autoscaling")
        if self.autoscale_min_replicas > self.autoscale_max_replicas:
            raise ValueError(
                f"autoscale_min_replicas ({self.autoscale_min_replicas}) is greater than "
                f"autoscale_max_replicas ({self.autoscale_max_replicas})"
            )
        # azureml's own checks: a limit below its request is refused.
        if self.cpu_cores_limit is not None and self.cpu_cores_limit < self.cpu_cores:
            raise ValueError(f"cpu_cores_limit ({self.cpu_cores_limit:g}) is less than "
                             f"cpu_cores ({self.cpu_cores:g})")
        if self.memory_gb_limit is not None and self.memory_gb_limit < self.memory_gb:
            raise ValueError(f"memory_gb_limit ({self.memory_gb_limit:g}) is less than "
                             f"memory_gb ({self.memory_gb:g})")
        return self

    @property
    def autoscaling(self) -> bool:
        if self.upstreams is not None:
            return False
        if self.autoscale_enabled is None:
            return self.num_replicas is None
        return self.autoscale_enabled


class VersionConfig(Described):
    service: Shown
    traffic_percentile: Annotated[float, Field(ge=0, le=100)] = 0
    is_default: bool = False
    is_control_version: bool = False

    @model_validator(mode="before")
    @classmethod
    def _sdk_name(cls, data: Any) -> Any:
        """`is_control_version_type` (AksEndpoint.create_version's name) = is_control_version."""
        if isinstance(data, dict) and "is_control_version_type" in data:
            data = dict(data)
            value = data.pop("is_control_version_type")
            if "is_control_version" in data and data["is_control_version"] != value:
                raise ValueError("is_control_version and is_control_version_type disagree")
            data["is_control_version"] = value
        return data


class EndpointConfig(AuthSettings):
    versions: dict[str, VersionConfig]

    @model_validator(mode="after")
    def _version_rules(self) -> EndpointConfig:
        if not self.versions:
            raise ValueError("an endpoint needs at least one version")
        if len(self.versions) > MAX_VERSIONS_PER_ENDPOINT:
            raise ValueError(
                f"at most {MAX_VERSIONS_PER_ENDPOINT} versions per endpoint "
                f"(got {len(self.versions)})"
            )
        defaults = [n for n, v in self.versions.items() if v.is_default]
        if len(defaults) > 1:
            raise ValueError(f"only one version can be default (got {', '.join(defaults)})")
        controls = [n for n, v in self.versions.items() if v.is_control_version]
        if len(controls) > 1:
            raise ValueError(f"at most one control version (got {', '.join(controls)})")
        total = sum(v.traffic_percentile for v in self.versions.values())
        if total > 100:
            raise ValueError(f"traffic percentiles sum to {total:g}, over 100")
        return self

    @property
    def default_version(self) -> str:
        """The version marked default, else the first one (azureml's rule)."""
        for name, v in self.versions.items():
            if v.is_default:
                return name
        return next(iter(self.versions))


class MlfeConfig(_Model):
    router: RouterSettings = Field(default_factory=RouterSettings)
    services: dict[str, ServiceConfig] = Field(default_factory=dict)
    endpoints: dict[str, EndpointConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_and_references(self) -> MlfeConfig:
        for kind, names in (("services", self.services), ("endpoints", self.endpoints)):
            for name in names:
                if not NAME_RE.match(name):
                    raise ValueError(
                        f"{kind}.{name}: name must be 3-32 characters of lowercase letters, "
                        "digits and '-', start with a letter and end with a letter or digit"
                    )
        for ep_name, ep in self.endpoints.items():
            if ep_name in self.services:
                raise ValueError(f"endpoints.{ep_name}: the name is already a service")
            for v_name, v in ep.versions.items():
                if not VERSION_RE.match(v_name):
                    raise ValueError(
                        f"endpoints.{ep_name}.versions.{v_name!r}: a version name is 1-63 "
                        "letters, digits, '.', '_' and '-', starting with a letter or digit"
                    )
                if v_name == ep_name:
                    raise ValueError(
                        f"endpoints.{ep_name}.versions.{v_name}: "
                        "a version name must differ from its endpoint's name"
                    )
                if v.service not in self.services:
                    raise ValueError(
                        f"endpoints.{ep_name}.versions.{v_name}.service: "
                        f"unknown service {v.service!r}"
                    )
        return self


# Deploy-configuration keys that change nothing in a run on this machine (local replicas):
# they are for `mlfe render`, or have no mlfe equivalent at all.
_INERT_LOCALLY = ("cpu_cores", "memory_gb", "gpu_cores", "cpu_cores_limit", "memory_gb_limit",
                  "namespace", "compute_target_name", "blobfuse_enabled")
_INERT_EVERYWHERE = ("compute_target_name", "blobfuse_enabled")


def inert_settings(cfg: MlfeConfig) -> list[str]:
    """The settings a config gives that have no effect where it runs, as `services.NAME.KEY`:
    logged once at start, so that an accepted setting is never silently dropped. A `kubernetes:`
    service's resources were applied by `mlfe render`; a local one's are not applied at all."""
    out = []
    for name, svc in cfg.services.items():
        local = svc.entry_script is not None or svc.synthetic is not None
        inert = list(_INERT_LOCALLY if local else _INERT_EVERYWHERE)
        if not cfg.router.access_log:
            inert.append("enable_app_insights")  # its mlfe equivalent, the access log, is off
        out += [f"services.{name}.{k}" for k in inert
                if k in svc.model_fields_set and getattr(svc, k) not in (None, False)]
    return out


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        shown = shown_value(MlfeConfig, e["loc"], e.get("input"))
        lines.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_config(data: Any, source: str = "<config>") -> MlfeConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return MlfeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_errors(e)}") from None
