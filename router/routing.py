"""Which service a scoring URL names: an exact-path table, rebuilt whole on every change.

The table is an immutable snapshot swapped by reference, so a request sees either the old
routes or the new ones, never half of a change.
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from router import errors

# What a route points at (router.services.Service and Endpoint): generic, so that this pure
# table depends on no live-state module.
S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)


class Versions(Protocol[S_co]):
    @property
    def services(self) -> Mapping[str, S_co]: ...


E = TypeVar("E", bound=Versions[Any])


class RouteKind(Enum):
    SCORE = "score"
    ENDPOINT = "endpoint"
    SWAGGER = "swagger"
    HEALTHY = "healthy"
    READY = "ready"


SCORE_METHODS = frozenset({b"POST", b"GET", b"OPTIONS"})
SWAGGER_METHODS = frozenset({b"GET"})


@dataclass(frozen=True, slots=True)
class Route(Generic[S, E]):
    kind: RouteKind
    service: S | None = None
    endpoint: E | None = None
    version: str | None = None  # pinned by the URL
    upstream_path: bytes = b""
    methods: frozenset[bytes] = frozenset()
    allow: bytes = b""
    auth: bool = True


_HEALTH_ROUTES: dict[bytes, Route[Any, Any]] = {
    b"/-/healthy": Route(RouteKind.HEALTHY, methods=frozenset({b"GET", b"HEAD"}), allow=b"GET"),
    b"/-/ready": Route(RouteKind.READY, methods=frozenset({b"GET", b"HEAD"}), allow=b"GET"),
}


def build_routes(
    services: Mapping[str, S], endpoints: Mapping[str, E] | None = None
) -> dict[bytes, Route[S, E]]:
    routes: dict[bytes, Route[S, E]] = dict(_HEALTH_ROUTES)
    for name, ep in (endpoints or {}).items():
        base = f"/api/v1/endpoint/{name}".encode()
        allow = b"GET, POST, OPTIONS"
        routes[base + b"/score"] = Route(
            RouteKind.ENDPOINT, endpoint=ep, methods=SCORE_METHODS, allow=allow,
            upstream_path=b"/score",
        )
        for version in ep.services:
            routes[base + b"/" + version.encode() + b"/score"] = Route(
                RouteKind.ENDPOINT, endpoint=ep, version=version, methods=SCORE_METHODS,
                allow=allow, upstream_path=b"/score",
            )
    for name, svc in services.items():
        base = f"/api/v1/service/{name}".encode()
        routes[base + b"/score"] = Route(
            RouteKind.SCORE, service=svc, upstream_path=b"/score", methods=SCORE_METHODS,
            allow=b"GET, POST, OPTIONS",
        )
        # azureml serves the swagger document without auth.
        routes[base + b"/swagger.json"] = Route(
            RouteKind.SWAGGER, service=svc, upstream_path=b"/swagger.json",
            methods=SWAGGER_METHODS, allow=b"GET", auth=False,
        )
    return routes


_SERVICE_PATH = re.compile(rb"^/api/v1/service/([^/]+)/(score|swagger\.json)$")
_ENDPOINT_PATH = re.compile(rb"^/api/v1/endpoint/([^/]+)/(?:([^/]+)/)?score$")


def _safe(name: bytes) -> str | None:
    text = name[:64].decode("ascii", "replace")
    return text if text.isprintable() else None


def not_found(path: bytes, endpoints: Container[str] = ()) -> errors.RouterError:
    """A 404 that names what was not found (never echoing more than a short, safe name)."""
    m = _SERVICE_PATH.match(path)
    if m is not None:
        name = _safe(m.group(1))
        return errors.not_found(f"Service {name}" if name else "Service")
    m = _ENDPOINT_PATH.match(path)
    if m is not None:
        name = _safe(m.group(1))
        if m.group(2) is None or name is None or name not in endpoints:
            return errors.not_found(f"Endpoint {name}" if name else "Endpoint")
        return version_not_found(name, m.group(2))
    return errors.not_found("Path")


def version_not_found(endpoint: str, version: bytes) -> errors.RouterError:
    v = _safe(version)
    return errors.not_found(f"Version {v} of endpoint {endpoint}" if v else "Version")
