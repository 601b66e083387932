"""Configuration: azureml's names, defaults and rules; every error names the key (and the value
where it cannot be a secret: tests/test_redaction.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy.config_file import load_config
from mlfe.config import ConfigError, parse_config

UP = {"upstreams": ["127.0.0.1:5001"]}
SCRIPT = {"entry_script": "examples/echo/score.py"}


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return str(e.value)


def test_defaults_are_azuremls() -> None:
    cfg = parse_config({"services": {"svc": SCRIPT}})
    s = cfg.services["svc"]
    assert (s.scoring_timeout_ms, s.replica_max_concurrent_requests, s.max_request_wait_time) == (
        60000, 1, 500)
    assert (s.autoscale_min_replicas, s.autoscale_max_replicas) == (1, 10)
    assert (s.autoscale_refresh_seconds, s.autoscale_target_utilization) == (1, 70)
    assert (s.autoscale_policy, s.autoscale_cold_start_seconds) == ("demand", 60)
    assert s.autoscaling and s.auth_enabled and not s.token_auth_enabled
    assert (s.cpu_cores, s.memory_gb, s.gpu_cores) == (0.1, 0.5, 0)
    assert (s.period_seconds, s.initial_delay_seconds, s.timeout_seconds) == (10, 310, 2)
    assert (s.success_threshold, s.failure_threshold) == (1, 3)
    assert cfg.router.listen == "127.0.0.1:8080" and cfg.router.max_body_bytes == 100 * 2**20


@pytest.mark.parametrize(
    ("service", "needle"),
    [
        ({**SCRIPT, "scoring_timeout_ms": 0}, "services.svc.scoring_timeout_ms"),
        ({**SCRIPT, "scoring_timeout_ms": -5}, "(got -5)"),
        ({**SCRIPT, "replica_max_concurrent_requests": "lots"}, "(got 'lots')"),
        ({**SCRIPT, "autoscale_enabled": True, "num_replicas": 2},
         "autoscale enabled and num_replicas provided"),
        ({**SCRIPT, "autoscale_enabled": False}, "num_replicas is not set"),
        ({**SCRIPT, "num_replicas": 2, "autoscale_max_replicas": 4},
         "autoscale_max_replicas provided without enabling autoscaling"),
        ({**SCRIPT, "autoscale_min_replicas": 5, "autoscale_max_replicas": 2},
         "autoscale_min_replicas (5) is greater than autoscale_max_replicas (2)"),
        ({**SCRIPT, "auth_enabled": True, "token_auth_enabled": True},
         "cannot both be true"),
        ({**UP, "num_replicas": 3}, "num_replicas do not apply to static upstreams"),
        ({**UP, **SCRIPT}, "exactly one of entry_script, upstreams"),
        ({}, "exactly one of entry_script, upstreams"),
        ({"upstreams": ["nohost"]}, "services.svc.upstreams.0: expected HOST:PORT (got 'nohost')"),
        ({**SCRIPT, "scoring_timout_ms": 5}, "services.svc.scoring_timout_ms: Extra inputs"),
        ({**SCRIPT, "autoscale_target_utilization": 150}, "(got 150)"),
        ({**SCRIPT, "autoscale_policy": "knative"}, "services.svc.autoscale_policy"),
        ({**SCRIPT, "autoscale_min_replicas": -1}, "(got -1)"),
        ({**SCRIPT, "autoscale_max_replicas": 0}, "services.svc.autoscale_max_replicas"),
        ({**SCRIPT, "autoscale_cold_start_seconds": 0}, "autoscale_cold_start_seconds"),
        ({**SCRIPT, "num_replicas": 2, "autoscale_policy": "azureml"},
         "autoscale_policy provided without enabling autoscaling"),
        ({**UP, "autoscale_min_replicas": 0}, "do not apply to static upstreams"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_service_settings_are_named(service: dict[str, Any], needle: str) -> None:
    assert needle in refused({"services": {"svc": service}})


def test_secrets_are_never_echoed_in_errors() -> None:
    msg = refused({"services": {"svc": {**UP, "primary_key": "short-secret"}}})
    assert "services.svc.primary_key: String should have at least 16 characters" in msg
    assert "short-secret" not in msg


@pytest.mark.parametrize("name", ["A-upper", "x", "-lead", "trail-", "has_underscore", "a" * 33])
def test_service_names_follow_azureml(name: str) -> None:
    assert name in refused({"services": {name: UP}})


def test_endpoint_rules() -> None:
    services = {"blue": UP, "green": UP}

    def ep(**versions: Any) -> dict[str, Any]:
        return {"services": services, "endpoints": {"myep": {"versions": versions}}}

    ok = parse_config(ep(v1={"service": "blue", "traffic_percentile": 20},
                         v2={"service": "green", "traffic_percentile": 30}))
    assert ok.endpoints["myep"].default_version == "v1"  # the first, unless one is marked
    marked = parse_config(ep(v1={"service": "blue"}, v2={"service": "green", "is_default": True}))
    assert marked.endpoints["myep"].default_version == "v2"
    assert "sum to 120" in refused(ep(v1={"service": "blue", "traffic_percentile": 60},
                                      v2={"service": "green", "traffic_percentile": 60}))
    assert "only one version can be default" in refused(
        ep(v1={"service": "blue", "is_default": True}, v2={"service": "green", "is_default": True}))
    assert "at most one control" in refused(
        ep(v1={"service": "blue", "is_control_version": True},
           v2={"service": "green", "is_control_version": True}))
    assert "unknown service 'red'" in refused(ep(v1={"service": "red"}))
    assert "at most 6 versions" in refused(ep(**{f"v{i}": {"service": "blue"} for i in range(7)}))
    assert "must differ from its endpoint" in refused(ep(myep={"service": "blue"}))
    assert "a version name is" in refused(ep(**{'v"1': {"service": "blue"}}))
    assert "not a host name" in refused({"services": {"svc": {"upstreams": ['a"b:1']}}})


def test_load_config_reports_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("services: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_router_pods_have_a_floor_and_every_cooldown_is_configurable() -> None:
    cfg = parse_config({"router": {"self_scaling": {
        "min_pods": 2, "max_pods": 4, "pod_cooldown_seconds": 45}}})
    s = cfg.router.self_scaling
    assert (s.min_pods, s.max_pods, s.pod_cooldown_seconds, s.cooldown_seconds) == (2, 4, 45, 30)
    with pytest.raises(ConfigError, match="min_pods"):
        parse_config({"router": {"self_scaling": {"min_pods": 3, "max_pods": 2}}})


def test_scale_to_zero_and_the_azureml_policy_are_accepted() -> None:
    s = parse_config({"services": {"svc": {**SCRIPT, "autoscale_min_replicas": 0,
                                           "autoscale_policy": "azureml",
                                           "autoscale_cold_start_seconds": 20}}}).services["svc"]
    assert (s.autoscale_min_replicas, s.autoscale_policy, s.autoscale_cold_start_seconds) == (
        0, "azureml", 20)
