"""The router's live counts, as one typed interface.

Everything that reads the router's load goes through :class:`StatsSource`: the admin API's
``GET /v1/stats``, the metrics collector, the co-located autoscaler and the Kubernetes peer counts
(which sum every router pod's). Pure data: this module imports nothing of the router, so the
control plane can depend on it without depending on the data plane (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """One service's load at one moment, as the router (or all router pods together) sees it."""

    busy: int  # requests in flight at replicas
    queued: int  # requests waiting in the router for a free replica slot
    replicas: int  # ready replicas the router is sending to
    max_concurrent: int = 1  # replica_max_concurrent_requests
    slots: int = 0  # replica slots this router instance may use now (all, unless coordinated)
    completed: int = 0  # requests finished, any outcome (cumulative: rates come from deltas)
    members: int = 0  # replicas known to the router, in rotation or not
    # Cumulative, for rates from deltas on the reader's clock (the demand autoscaling policy):
    arrivals: int = 0  # requests that reached admission: served, in flight, queued or refused
    served: int = 0  # requests that were sent to a replica and are over
    service_seconds: float = 0.0  # their time at the replica (upstream), summed

    def __post_init__(self) -> None:
        if self.busy < 0 or self.queued < 0 or self.replicas < 0:
            raise ValueError(f"counts cannot be negative: {self}")

    @property
    def utilization(self) -> float | None:
        """(busy + queued) / (ready replicas x per-replica cap); None without capacity."""
        capacity = self.replicas * self.max_concurrent
        return (self.busy + self.queued) / capacity if capacity else None

    def to_json(self) -> dict[str, Any]:
        """The fields of ``GET /v1/stats`` (one service)."""
        return {
            "replicas": self.replicas,
            "busy": self.busy,
            "queued": self.queued,
            "utilization": self.utilization,
            "completed": self.completed,
            "slots": self.slots,
            "arrivals": self.arrivals,
            "served": self.served,
            "serviceSeconds": self.service_seconds,
        }


class StatsSource(Protocol):
    def counts(self, service: str) -> ServiceStats:
        """``service``'s counts now (KeyError for an unknown one); an in-process read that
        must not block."""
        ...
