"""Which service a scoring URL names: an exact-path table, rebuilt whole on every change.

The table is an immutable snapshot swapped by reference, so a request sees either the old
routes or the new ones, never half of a change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from router import errors

if TYPE_CHECKING:
    from router.services import Service


class RouteKind(Enum):
    SCORE = "score"
    SWAGGER = "swagger"
    HEALTHY = "healthy"
    READY = "ready"


SCORE_METHODS = frozenset({b"POST", b"GET", b"OPTIONS"})
SWAGGER_METHODS = frozenset({b"GET"})


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    service: Service | None = None
    upstream_path: bytes = b""
    methods: frozenset[bytes] = frozenset()
    allow: bytes = b""
    auth: bool = True


_HEALTH_ROUTES = {
    b"/-/healthy": Route(RouteKind.HEALTHY, methods=frozenset({b"GET", b"HEAD"}), allow=b"GET"),
    b"/-/ready": Route(RouteKind.READY, methods=frozenset({b"GET", b"HEAD"}), allow=b"GET"),
}


def build_routes(services: dict[str, Service]) -> dict[bytes, Route]:
    routes = dict(_HEALTH_ROUTES)
    for name, svc in services.items():
        base = f"/api/v1/service/{name}".encode()
        routes[base + b"/score"] = Route(
            RouteKind.SCORE, svc, b"/score", SCORE_METHODS, b"GET, POST, OPTIONS"
        )
        # azureml serves the swagger document without auth.
        routes[base + b"/swagger.json"] = Route(
            RouteKind.SWAGGER, svc, b"/swagger.json", SWAGGER_METHODS, b"GET", auth=False
        )
    return routes


_SERVICE_PATH = re.compile(rb"^/api/v1/service/([^/]+)/(score|swagger\.json)$")


def not_found(path: bytes) -> errors.RouterError:
    """A 404 that names what was not found (never echoing more than a short, safe name)."""
    m = _SERVICE_PATH.match(path)
    if m is not None:
        name = m.group(1)[:64].decode("ascii", "replace")
        if name.isprintable():
            return errors.not_found(f"Service {name}")
        return errors.not_found("Service")
    return errors.not_found("Path")
