"""`mlfe sidecar`: one service in front of one upstream on the pod's loopback (dev-test sidecar).

A developer puts mlfe next to a model container in the same pod; the model gets azureml's
front-end behaviour (keys, the admission cap and wait queue, timeouts, request ids, access log,
metrics) without a cluster-wide router. No autoscaler runs: the pod count is its Deployment's.

Configured entirely from the environment: one variable per setting, the config's name
upper-cased with `MLFE_` in front, validated by the same models as the YAML (mlfe/config.py):

- the service: `MLFE_SERVICE_NAME` (default `model`), `MLFE_UPSTREAM` (HOST:PORT, default
  `127.0.0.1:5001`, azureml's replica port), `MLFE_AUTH_ENABLED`, `MLFE_TOKEN_AUTH_ENABLED`,
  `MLFE_PRIMARY_KEY` / `MLFE_SECONDARY_KEY` or `MLFE_PRIMARY_KEY_FILE` / `MLFE_SECONDARY_KEY_FILE`
  (a mounted Secret file; its content, stripped of surrounding whitespace, is the key),
  `MLFE_SCORING_TIMEOUT_MS`, `MLFE_REPLICA_MAX_CONCURRENT_REQUESTS`, `MLFE_MAX_REQUEST_WAIT_TIME`,
  `MLFE_MAX_QUEUE_LENGTH`, `MLFE_COLLECT_MODEL_DATA`, azureml's metadata shown by the admin API
  (`MLFE_DESCRIPTION`, `MLFE_TAGS` and `MLFE_PROPERTIES` as JSON objects), and the upstream's
  liveness probe:
  `MLFE_PERIOD_SECONDS`, `MLFE_INITIAL_DELAY_SECONDS`, `MLFE_TIMEOUT_SECONDS`,
  `MLFE_SUCCESS_THRESHOLD`, `MLFE_FAILURE_THRESHOLD`;
- the router: `MLFE_LISTEN` (default `0.0.0.0:8080`: the pod's scoring port must be reachable),
  `MLFE_ADMIN_LISTEN` (default `127.0.0.1:8081`), `MLFE_METRICS_LISTEN` (`GET /metrics` alone,
  without the admin token; off by default), `MLFE_STATE_DIR`, `MLFE_MAX_BODY_BYTES`,
  `MLFE_TLS_CERT_FILE` + `MLFE_TLS_KEY_FILE`, `MLFE_TOKEN_ISSUERS` (JSON),
  `MLFE_TOKEN_LIFETIME_S`, `MLFE_TOKEN_LEEWAY_S`, `MLFE_MAX_HEADER_BYTES`,
  `MLFE_MAX_HEADER_COUNT`, `MLFE_CLIENT_HEADER_TIMEOUT_S`, `MLFE_CLIENT_BODY_TIMEOUT_S`,
  `MLFE_KEEPALIVE_TIMEOUT_S`, `MLFE_DRAIN_TIMEOUT_S`, `MLFE_ACCESS_LOG`, `MLFE_DATA_DIR`,
  `MLFE_LOG_FORMAT`;
- `MLFE_ADMIN_TOKEN`, as for `mlfe serve`.

The list is built from the models, so every setting that applies has its variable (`SETTINGS`).
Settings that do not apply to a sidecar (the replica source and server, autoscaling, the model's
resources and namespace, Azure ML settings with no equivalent, Application Insights, router
workers, coordination and self-scaling) are refused by name, as is any other `MLFE_*` variable (a
typo), except those Kubernetes itself sets for a Service named `mlfe` (`MLFE_SERVICE_HOST`,
`MLFE_PORT...`). An empty variable counts as unset. A bad value is refused naming the variable,
and shows the value only where it cannot be a secret, as in a config file's errors
(mlfe/redact.py): never a key, a JSON value's text, tags or properties.

Readiness follows the model: `/-/ready` answers 503 until the upstream passes its liveness probe
(`GET /`, 2xx/3xx within `timeout_seconds`) `success_threshold` times in a row, and again once it
fails it `failure_threshold` times in a row, so Kubernetes takes the pod out of its Service while
the model is down; scoring requests that still arrive meanwhile wait in the queue for it, up to
`max_request_wait_time` (then azureml's 503 `No ready replicas`, with `Retry-After`), and are
handed to it as soon as the probe passes. The upstream is probed every
`period_seconds`; until it has been live once (a model still loading) it is probed every 0.1 s,
and a warning is logged if it is still not live after `initial_delay_seconds`. Liveness
(`/-/healthy`) is the sidecar's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

from deploy.lifecycle import ProcessLife
from deploy.startup import settle_heap
from mlfe.config import NAME_RE, MlfeConfig, RouterSettings, ServiceConfig, parse_hostport
from mlfe.redact import shown_at, shown_token, shown_value
from mlfe.supervise import Supervisor
from router.probe import probe_http

log = logging.getLogger(__name__)

PREFIX = "MLFE_"
DEFAULT_SERVICE_NAME = "model"
DEFAULT_UPSTREAM = "127.0.0.1:5001"
DEFAULT_LISTEN = "0.0.0.0:8080"
STARTUP_PROBE_S = 0.1  # while the upstream has never been live (as the local target probes)

# Service settings that do not apply to a sidecar, and why.
_SOURCE = "the sidecar's only replica is MLFE_UPSTREAM, the model container next to it"
_SCALING = "no autoscaler runs in a sidecar: the pod count is its Deployment's business"
_RESOURCES = "the model container's resources are set on it, in its Deployment"
_NO_EQUIVALENT = "an Azure ML setting with no equivalent in mlfe"
NOT_APPLICABLE: dict[str, str] = {
    "entry_script": _SOURCE, "upstreams": "use MLFE_UPSTREAM (one HOST:PORT)",
    "kubernetes": _SOURCE, "synthetic": _SOURCE, "model_dir": _SOURCE,
    "environment_variables": _SOURCE, "sample_input": _SOURCE,
    "num_replicas": _SCALING, "autoscale_enabled": _SCALING,
    "autoscale_min_replicas": _SCALING, "autoscale_max_replicas": _SCALING,
    "autoscale_refresh_seconds": _SCALING, "autoscale_target_utilization": _SCALING,
    "autoscale_scale_down_window_seconds": _SCALING, "autoscale_policy": _SCALING,
    "autoscale_cold_start_seconds": _SCALING,
    "cpu_cores": _RESOURCES, "memory_gb": _RESOURCES, "gpu_cores": _RESOURCES,
    "cpu_cores_limit": _RESOURCES, "memory_gb_limit": _RESOURCES,
    "namespace": "the sidecar runs in its pod's namespace (this is where `mlfe render` puts a "
                 "model's Deployment)",
    "replica_server": "the model container next to the sidecar is the replica's server",
    "enable_app_insights": "no Application Insights: the sidecar's access log (MLFE_ACCESS_LOG) "
                           "and /metrics are what it offers instead",
    "compute_target_name": _NO_EQUIVALENT, "blobfuse_enabled": _NO_EQUIVALENT,
}
_ONE_ROUTER = ("the sidecar is one router process in its pod: it runs no workers, coordinates "
               "with no other router and never scales itself")
ROUTER_NOT_APPLICABLE: dict[str, str] = {
    "workers": _ONE_ROUTER, "coordination": _ONE_ROUTER, "self_scaling": _ONE_ROUTER,
    "cluster_purpose": _ONE_ROUTER,
}
# Keys a sidecar may also read from a file (a mounted Secret): MLFE_PRIMARY_KEY_FILE ...
SECRET_FIELDS = ("primary_key", "secondary_key")
# Other MLFE_* variables mlfe reads (not settings of the config).
OTHER_VARIABLES = frozenset({"MLFE_ADMIN_TOKEN", "MLFE_ADMIN_URL"})
# What Kubernetes sets in every pod for a Service named `mlfe` (enableServiceLinks).
_SERVICE_LINK = re.compile(r"^MLFE_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\w+)?)$")


class SidecarConfigError(ValueError):
    """The environment was refused; the message names each variable and what is wrong."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable: where its value goes in the config."""

    var: str
    section: Literal["router", "service"]
    path: tuple[str, ...]  # field names under the section
    kind: Literal["text", "json", "file", "list"] = "text"


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _settings_of(model: type[BaseModel], section: Literal["router", "service"],
                 skip: Mapping[str, str]) -> list[Setting]:
    out: list[Setting] = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        tp = _unwrap(info.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):  # tls: one variable per field
            out.extend(Setting(f"{PREFIX}{name.upper()}_{sub.upper()}", section, (name, sub))
                       for sub in tp.model_fields)
        elif typing.get_origin(tp) in (list, dict):
            out.append(Setting(f"{PREFIX}{name.upper()}", section, (name,), "json"))
        else:
            out.append(Setting(f"{PREFIX}{name.upper()}", section, (name,)))
    return out


def _all_settings() -> list[Setting]:
    settings = [
        Setting("MLFE_UPSTREAM", "service", ("upstreams",), "list"),
        *_settings_of(ServiceConfig, "service", NOT_APPLICABLE),
        *(Setting(f"{PREFIX}{k.upper()}_FILE", "service", (k,), "file") for k in SECRET_FIELDS),
        *_settings_of(RouterSettings, "router", ROUTER_NOT_APPLICABLE),
    ]
    seen: dict[str, Setting] = {}
    for s in settings:
        assert s.var not in seen, f"two settings share the variable {s.var}"
        seen[s.var] = s
    return settings


SETTINGS: list[Setting] = _all_settings()
SETTING_BY_VAR = {s.var: s for s in SETTINGS}
SERVICE_NAME_VAR = "MLFE_SERVICE_NAME"
KNOWN_VARIABLES = frozenset({*SETTING_BY_VAR, SERVICE_NAME_VAR, *OTHER_VARIABLES})
_VAR_OF_PATH = {(s.section, *s.path): s.var for s in SETTINGS if s.kind != "file"}
# A config field name -> its variable (for messages of rules across fields).
_FIELD_VARS = {s.path[0]: s.var for s in SETTINGS if len(s.path) == 1 and s.kind != "file"}


@dataclass(frozen=True)
class SidecarSettings:
    config: MlfeConfig
    service: str

    @property
    def service_config(self) -> ServiceConfig:
        return self.config.services[self.service]

    @property
    def upstream(self) -> tuple[str, int]:
        upstreams = self.service_config.upstreams
        assert upstreams is not None
        return parse_hostport(upstreams[0])


def _loc(setting: Setting, service: str) -> tuple[str, ...]:
    """Where a setting's value sits in the config (pydantic's path)."""
    if setting.section == "router":
        return ("router", *setting.path)
    return ("services", service, *setting.path)


def _given(var: str, raw: str, service: str) -> str:
    """A variable in a message about a rule across settings: with its value where the rule of
    mlfe/redact.py lets it be shown (a boolean's, not a key's)."""
    setting = SETTING_BY_VAR.get(var)
    shown = None if setting is None or setting.kind == "file" else shown_at(
        MlfeConfig, _loc(setting, service), raw)
    return var if shown is None else f"{var}={shown}"


def _not_applicable(var: str) -> str | None:
    """Why a variable named after a setting that does not apply to a sidecar is refused."""
    name = var.removeprefix(PREFIX).lower()
    for field, reason in (*NOT_APPLICABLE.items(), *ROUTER_NOT_APPLICABLE.items()):
        if name == field or name.startswith(field + "_"):  # nested settings, or a _FILE
            return reason
    return None


def settings_from_env(environ: Mapping[str, str]) -> SidecarSettings:
    """The sidecar's config from `MLFE_*` variables, validated by the config's models."""
    env = {k: v for k, v in environ.items() if k.startswith(PREFIX) and v.strip() != ""}
    problems: list[str] = []

    for var in sorted(env):
        if var in KNOWN_VARIABLES or _SERVICE_LINK.match(var):
            continue
        reason = _not_applicable(var)
        if reason is not None:
            problems.append(f"{var}: does not apply to the sidecar: {reason}")
        else:
            near = difflib.get_close_matches(var, sorted(KNOWN_VARIABLES), n=1)
            problems.append(f"{var}: unknown variable"
                            + (f" (did you mean {near[0]}?)" if near else ""))

    name = env.get(SERVICE_NAME_VAR, DEFAULT_SERVICE_NAME).strip()
    if not NAME_RE.match(name):
        shown = shown_token(name)
        problems.append(
            f"{SERVICE_NAME_VAR}: a service name is 3-32 characters of lowercase letters, "
            "digits and '-', starting with a letter and ending with a letter or digit"
            + (f" (got {shown})" if shown else ""))

    router: dict[str, Any] = {"listen": DEFAULT_LISTEN}
    service: dict[str, Any] = {"upstreams": [DEFAULT_UPSTREAM]}
    sources: dict[tuple[str, ...], str] = {}  # (section, field, ...) -> the variable it came from
    for s in SETTINGS:
        raw = env.get(s.var)
        if raw is None:
            continue
        value: Any = raw
        if s.kind == "list":
            value = [raw.strip()]
        elif s.kind == "json":
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                # Where, not what: the text may hold a URL with a password, or a tag's value.
                problems.append(f"{s.var}: not valid JSON: {e.msg} at line {e.lineno}, "
                                f"column {e.colno}")
                continue
        elif s.kind == "file":
            other = s.var.removesuffix("_FILE")
            if other in env:
                problems.append(f"{s.var}, {other}: set one of them, not both")
                continue
            try:
                value = Path(raw).read_text("utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
                # The file's path is shown (it is no secret), never what it holds.
                problems.append(f"{s.var}: cannot read the key file {raw!r}: {reason}")
                continue
        target = router if s.section == "router" else service
        for part in s.path[:-1]:
            target = target.setdefault(part, {})
        target[s.path[-1]] = value
        sources[(s.section, *s.path)] = s.var
    if problems:
        raise SidecarConfigError(_message(problems))

    data = {"router": router, "services": {name: service}}
    try:
        cfg = MlfeConfig.model_validate(data)
    except ValidationError as e:
        raise SidecarConfigError(_message(_env_errors(e, name, sources, env))) from None
    return SidecarSettings(cfg, name)


def _message(problems: list[str]) -> str:
    return "invalid environment:\n  " + "\n  ".join(problems)


def _env_errors(err: ValidationError, service: str, sources: dict[tuple[str, ...], str],
                env: Mapping[str, str]) -> list[str]:
    """pydantic's errors, each named by the variable its key came from; the value given is shown
    as a config file's errors show it (mlfe/redact.py), never a key's."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(str(p) for p in e["loc"])
        if loc[:2] == ("services", service):
            key: tuple[str, ...] = ("service", *loc[2:])
        elif loc[:1] == ("router",):
            key = loc
        else:
            key = ()
        msg = e["msg"].removeprefix("Value error, ")
        shown = shown_value(MlfeConfig, e["loc"], e.get("input"))
        for n in range(len(key), 1, -1):
            var = sources.get(key[:n])
            if var is None:
                continue
            setting = SETTING_BY_VAR[var]
            if setting.kind == "file":
                lines.append(f"{var}: the key in {env[var]!r}: {msg} (the key is not shown)")
                break
            # A part of a JSON value is named by its path (an upstream is the only one).
            rest = "".join(f"[{p}]" if p.isdigit() else f".{p}"
                           for p in key[n:]) if setting.kind == "json" else ""
            lines.append(f"{var}{rest}: {msg}{shown}")
            break
        else:
            unset = _VAR_OF_PATH.get(key)
            if unset is not None:  # a setting that another one requires (MLFE_TLS_KEY_FILE)
                lines.append(f"{unset}: {msg} (not set)")
                continue
            # A rule across settings (auth_enabled with token_auth_enabled ...): the message
            # names fields; name their variables instead, with the values given.
            named = []
            for field, var in _FIELD_VARS.items():
                pattern = rf"\b{re.escape(field)}\b"
                if re.search(pattern, msg):
                    msg = re.sub(pattern, var, msg)
                    if var in env:
                        named.append(_given(var, env[var], service))
            lines.append(msg + (f" (got {', '.join(named)})" if named else ""))
    return lines


# ---- readiness: the upstream's liveness probe -------------------------------------------------


class Readiness:
    """Kubernetes' probe thresholds as a pure state machine: ready after `success_threshold`
    passes in a row, unready after `failure_threshold` failures in a row; starts unready."""

    def __init__(self, success_threshold: int, failure_threshold: int) -> None:
        self.success_threshold = success_threshold
        self.failure_threshold = failure_threshold
        self.ready = False
        self.ever_ready = False
        self._passes = 0
        self._failures = 0

    def observe(self, ok: bool) -> bool:
        """Record one probe; True if readiness changed."""
        if ok:
            self._passes += 1
            self._failures = 0
            if not self.ready and self._passes >= self.success_threshold:
                self.ready = self.ever_ready = True
                return True
        else:
            self._failures += 1
            self._passes = 0
            if self.ready and self._failures >= self.failure_threshold:
                self.ready = False
                return True
        return False


class UpstreamHealth:
    """Probes the upstream in the background; `is_ready` is the router's readiness hook."""

    def __init__(self, host: str, port: int, cfg: ServiceConfig, supervisor: Supervisor,
                 on_change: Callable[[bool], None] = lambda ready: None) -> None:
        self.host, self.port = host, port
        self._supervisor = supervisor
        self.on_change = on_change
        self.period_s = float(cfg.period_seconds)
        self.timeout_s = float(cfg.timeout_seconds)
        self.initial_delay_s = float(cfg.initial_delay_seconds)
        self.state = Readiness(cfg.success_threshold, cfg.failure_threshold)
        self._task: asyncio.Task[None] | None = None

    def is_ready(self) -> bool:
        return self.state.ready

    def start(self) -> None:
        self._task = self._supervisor.spawn(self._watch(), name="upstream probe")

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        warned = False
        addr = f"{self.host}:{self.port}"
        while True:
            began = loop.time()
            ok = await probe_http(self.host, self.port, timeout_s=self.timeout_s)
            if self.state.observe(ok):
                self.on_change(self.state.ready)
                if self.state.ready:
                    log.info("upstream %s is live: ready", addr)
                else:
                    log.warning("upstream %s failed its liveness probe %d time(s) in a row: "
                                "not ready", addr, self.state.failure_threshold)
            if not self.state.ever_ready:
                if not warned and loop.time() - started >= self.initial_delay_s:
                    warned = True
                    log.warning("upstream %s is still not live after %.0f s "
                                "(initial_delay_seconds)", addr, self.initial_delay_s)
                interval = STARTUP_PROBE_S
            else:
                interval = self.period_s
            await asyncio.sleep(max(0.0, began + interval - loop.time()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ---- the process --------------------------------------------------------------------------------


async def serve(settings: SidecarSettings) -> int:
    """Router + admin API + the upstream probe; on SIGTERM/SIGINT: unready, drain, exit 0
    (1 when a supervised task died)."""
    from router.admin import AdminApi, MetricsApi, admin_token
    from router.server import Router

    cfg = settings.config
    life = ProcessLife()
    host, port = settings.upstream

    def follow(ready: bool) -> None:
        # The probe is the authority on the upstream: while it is down, requests wait in the
        # queue (up to max_request_wait_time, then 503 "No ready replicas"), and are handed the
        # replica the moment it is back (not after the router's own probe backoff).
        svc = router.services[settings.service]
        for replica in svc.pool.replicas:
            if ready:
                svc.mark_up(replica)
            else:
                svc.pool.mark_down(replica)

    health = UpstreamHealth(host, port, settings.service_config, life.supervisor, follow)
    router = Router(cfg, asyncio.get_running_loop(), supervisor=life.supervisor,
                    ready_check=health.is_ready)
    admin = AdminApi(router, admin_token(cfg.router.state_dir))
    metrics_addr = cfg.router.metrics_addr
    metrics = MetricsApi(router.metrics) if metrics_addr is not None else None
    try:
        await router.start()
        await admin.start(*cfg.router.admin_addr)
        if metrics is not None and metrics_addr is not None:
            await metrics.start(*metrics_addr)
        health.start()
        settle_heap()
        print(f"mlfe sidecar: scoring on {router.scoring_uri('service/' + settings.service)}"
              f" -> upstream {host}:{port}; admin on "
              f"http://{cfg.router.admin_addr[0]}:{admin.port}", flush=True)
        await life.wait()
    finally:
        log.info("draining (up to %.0f s)", cfg.router.drain_timeout_s)
        if not await router.drain(cfg.router.drain_timeout_s):
            log.warning("drain timeout: connections were cut off")
        await health.stop()
        await router.close()
        await admin.close()
        if metrics is not None:
            await metrics.close()
        await life.supervisor.stop()
    return life.exit_code


def run_sidecar(log_level: str = "INFO", environ: Mapping[str, str] | None = None) -> int:
    """`mlfe sidecar`: 0 after a clean shutdown, 2 on a bad environment, 1 if it cannot listen."""
    import uvloop

    from deploy import logs
    from mlfe.config import ConfigError

    logs.configure(log_level)
    try:
        settings = settings_from_env(os.environ if environ is None else environ)
    except (SidecarConfigError, ConfigError) as e:
        print(f"mlfe sidecar: {e}", file=sys.stderr)
        return 2
    logs.configure(log_level, settings.config.router.log_format)
    try:
        return uvloop.run(serve(settings))
    except OSError as e:
        print(f"mlfe sidecar: cannot listen: {e.strerror}", file=sys.stderr)
        return 1
