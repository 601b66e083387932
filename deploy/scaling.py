"""A service's config as the replica autoscaler's settings (autoscaler/decider.py)."""

from __future__ import annotations

from autoscaler.decider import Policy, ScalingSpec
from mlfe.config import ServiceConfig


def scaling_spec(cfg: ServiceConfig) -> ScalingSpec:
    return ScalingSpec(
        min_replicas=cfg.autoscale_min_replicas,
        max_replicas=cfg.autoscale_max_replicas,
        target_utilization=cfg.autoscale_target_utilization,
        replica_max_concurrent_requests=cfg.replica_max_concurrent_requests,
        refresh_seconds=cfg.autoscale_refresh_seconds,
        scale_down_window_s=cfg.autoscale_scale_down_window_seconds,
        autoscale_enabled=cfg.autoscaling,
        num_replicas=cfg.num_replicas,
        policy=Policy(cfg.autoscale_policy),
    )
