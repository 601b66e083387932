"""The admin API (aiohttp, its own port and token): service state, keys and live counts.

Everything here is off the scoring path; a request costs far more than the framework does.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mlfe.config import ConfigError, VersionConfig
from router.keystore import atomic_write
from router.slots import ReloadUnconfirmed
from router.state import StateConflict, StateUnavailable

if TYPE_CHECKING:
    from router.server import Router

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "MLFE_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "admin-token"
JWKS_PATH = "/v1/jwks.json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_token(state_dir: Path) -> str:
    """From MLFE_ADMIN_TOKEN, else generated once and kept (owner-only) in the state dir."""
    env = os.environ.get(ADMIN_TOKEN_ENV)
    if env is not None:
        if not env.strip():
            raise ConfigError(f"{ADMIN_TOKEN_ENV} is set but empty")
        return env
    path = state_dir / ADMIN_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if not token:
            raise ConfigError(f"{path} is empty; delete it to generate a new admin token")
        return token
    token = secrets.token_urlsafe(32)
    atomic_write(path, token.encode())
    return token


def exposition(registry: CollectorRegistry) -> web.Response:
    """The registry in Prometheus's text exposition format (the admin port's `/metrics` and the
    metrics listener's)."""
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on host:port (0: any free port); the runner and the port bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    await web.SockSite(runner, sock).start()
    return runner, int(sock.getsockname()[1])


class MetricsApi:
    """`router.metrics_listen`: `GET /metrics` and nothing else, without a token, so that a stock
    Prometheus can scrape it. No admin route, key or secret is reachable here; the admin port
    keeps its own `/metrics` behind the admin token."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self.app = web.Application()
        self.app.router.add_get("/metrics", self.metrics)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def metrics(self, request: web.Request) -> web.Response:
        return exposition(self._registry)

    async def start(self, host: str, port: int) -> None:
        self._runner, self.port = await _serve(self.app, host, port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json"
    )


def json_error(status: int, message: str) -> web.Response:
    return json_response({"message": message}, status)


def _auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == JWKS_PATH:
            return await handler(request)  # public keys, for other routers to verify tokens
        presented = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(presented, expected):
            resp = json_error(401, "Unauthorized")
            resp.headers["WWW-Authenticate"] = "Bearer"
            return resp
        return await handler(request)

    return check


class AdminApi:
    def __init__(self, router: Router, token: str) -> None:
        self._router = router
        self.app = web.Application(middlewares=[_auth_middleware(token)])
        add = self.app.router
        add.add_get("/v1/stats", self.stats)
        add.add_get("/v1/services", self.list_services)
        add.add_get("/v1/services/{name}", self.get_service)
        add.add_get("/v1/endpoints", self.list_endpoints)
        add.add_get("/v1/endpoints/{name}", self.get_endpoint)
        for kind in ("services", "endpoints"):
            add.add_get(f"/v1/{kind}/{{name}}/keys", self.get_keys)
            add.add_post(f"/v1/{kind}/{{name}}/regen-key", self.regen_key)
            add.add_post(f"/v1/{kind}/{{name}}/token", self.token)
        add.add_get(JWKS_PATH, self.jwks)
        add.add_get("/metrics", self.metrics)
        version = "/v1/endpoints/{name}/versions/{version}"
        add.add_get(version, self.get_version)
        add.add_put(version, self.put_version)
        add.add_patch(version, self.patch_version)
        add.add_delete(version, self.delete_version)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._runner, self.port = await _serve(self.app, host, port)
        log.info("admin API on http://%s:%d", host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- handlers -------------------------------------------------------------------------

    def _owner_or_404(self, request: web.Request) -> str:
        """The service or endpoint a /v1/services/... or /v1/endpoints/... route names."""
        name = request.match_info["name"]
        if request.path.startswith("/v1/services/"):
            if name not in self._router.services:
                raise _not_found(f"Service {name}")
        elif name not in self._router.endpoints:
            raise _not_found(f"Endpoint {name}")
        return name

    async def stats(self, request: web.Request) -> web.Response:
        return json_response({"services": self._router.stats()})

    async def list_services(self, request: web.Request) -> web.Response:
        return json_response(
            {"services": [self._router.describe(n) for n in self._router.services]}
        )

    async def get_service(self, request: web.Request) -> web.Response:
        return json_response(self._router.describe(self._owner_or_404(request)))

    async def list_endpoints(self, request: web.Request) -> web.Response:
        return json_response(
            {"endpoints": [self._describe_endpoint(n) for n in self._router.endpoints]}
        )

    async def get_endpoint(self, request: web.Request) -> web.Response:
        return json_response(self._describe_endpoint(self._owner_or_404(request)))

    def _describe_endpoint(self, name: str) -> dict[str, Any]:
        ep = self._router.endpoints[name]
        shares = ep.split.shares()
        return {
            "name": name,
            "scoringUri": self._router.scoring_uri(f"endpoint/{name}"),
            "authEnabled": ep.cfg.auth_enabled,
            "tokenAuthEnabled": ep.cfg.token_auth_enabled,
            "defaultVersion": ep.cfg.default_version,
            "versions": {v: _version_json(vc, shares.get(v, 0.0))
                         for v, vc in ep.cfg.versions.items()},
        }

    async def get_keys(self, request: web.Request) -> web.Response:
        name = self._owner_or_404(request)
        keys = self._router.keys.get(name)
        if keys is None:
            return json_error(404, f"{name} has no keys (auth_enabled is false)")
        return json_response({"primaryKey": keys[0], "secondaryKey": keys[1]})

    async def regen_key(self, request: web.Request) -> web.Response:
        name = self._owner_or_404(request)
        owner = (self._router.services[name].cfg if name in self._router.services
                 else self._router.endpoints[name].cfg)
        if owner.token_auth_enabled:
            return json_error(400, f"{name} uses token auth: it has no keys to regenerate")
        body = await _json_body(request)
        key_type = body.get("keyType")
        if key_type not in ("Primary", "Secondary"):
            return json_error(400, "keyType must be 'Primary' or 'Secondary'")
        try:
            primary, secondary = await self._router.regenerate_key(name, key_type)  # stored first
        except (StateConflict, StateUnavailable) as e:
            return _state_error(e)
        except ReloadUnconfirmed as e:
            log.warning("%s: %s key regenerated; %s", name, key_type.lower(), e)
            return _unconfirmed(e)
        log.info("%s: %s key regenerated", name, key_type.lower())
        return json_response({"primaryKey": primary, "secondaryKey": secondary})

    async def token(self, request: web.Request) -> web.Response:
        name = self._owner_or_404(request)
        owner = (self._router.services[name].cfg if name in self._router.services
                 else self._router.endpoints[name].cfg)
        if not owner.token_auth_enabled:
            return json_error(400, f"token auth is not enabled for {name}")
        return json_response(self._router.authority.issue(name, time.time()))

    async def metrics(self, request: web.Request) -> web.Response:
        return exposition(self._router.metrics)

    async def jwks(self, request: web.Request) -> web.Response:
        return json_response(self._router.jwks())

    def _version_or_404(self, request: web.Request) -> tuple[str, str]:
        name = self._owner_or_404(request)
        version = request.match_info["version"]
        if version not in self._router.endpoints[name].cfg.versions:
            raise _not_found(f"Version {version} of endpoint {name}")
        return name, version

    async def get_version(self, request: web.Request) -> web.Response:
        name, version = self._version_or_404(request)
        ep = self._router.endpoints[name]
        vc = ep.cfg.versions[version]
        return json_response(_version_json(vc, ep.split.shares().get(version, 0.0)))

    async def put_version(self, request: web.Request) -> web.Response:
        name = self._owner_or_404(request)
        version = request.match_info["version"]
        fields = _version_fields(await _json_body(request))
        return await self._change_version(name, version, fields, replace=True)

    async def patch_version(self, request: web.Request) -> web.Response:
        name, version = self._version_or_404(request)
        fields = _version_fields(await _json_body(request))
        return await self._change_version(name, version, fields, replace=False)

    async def delete_version(self, request: web.Request) -> web.Response:
        name, version = self._version_or_404(request)

        def mutate(endpoints: dict[str, Any]) -> None:
            del endpoints[name]["versions"][version]

        try:
            await self._router.change_endpoints(mutate)
        except ConfigError as e:
            return json_error(400, str(e))
        except (StateConflict, StateUnavailable) as e:
            return _state_error(e)
        except ReloadUnconfirmed as e:
            return _unconfirmed(e)
        return web.Response(status=204)

    async def _change_version(
        self, name: str, version: str, fields: dict[str, Any], replace: bool
    ) -> web.Response:
        def mutate(endpoints: dict[str, Any]) -> None:
            versions: dict[str, Any] = endpoints[name]["versions"]
            entry = {} if replace else dict(versions.get(version, {}))
            entry.update(fields)
            versions[version] = entry
            # azureml: marking one version default (or control) unmarks every other one.
            for flag in ("is_default", "is_control_version"):
                if fields.get(flag):
                    for other, v in versions.items():
                        if other != version and v.get(flag):
                            v[flag] = False

        try:
            await self._router.change_endpoints(mutate)
        except ConfigError as e:
            return json_error(400, str(e))
        except (StateConflict, StateUnavailable) as e:
            return _state_error(e)
        except ReloadUnconfirmed as e:
            return _unconfirmed(e)
        return json_response(self._describe_endpoint(name))


_VERSION_FIELDS = {
    "service": "service",
    "trafficPercentile": "traffic_percentile",
    "isDefault": "is_default",
    "isControlVersion": "is_control_version",
}


def _version_fields(body: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(body) - set(_VERSION_FIELDS))
    if unknown:
        raise web.HTTPBadRequest(
            body=orjson.dumps({"message": f"unknown fields: {', '.join(unknown)} "
                               f"(expected {', '.join(_VERSION_FIELDS)})"}),
            content_type="application/json",
        )
    return {_VERSION_FIELDS[k]: v for k, v in body.items()}


def _version_json(vc: VersionConfig, share: float) -> dict[str, Any]:
    return {
        "service": vc.service,
        "trafficPercentile": vc.traffic_percentile,
        "isDefault": vc.is_default,
        "isControlVersion": vc.is_control_version,
        "effectiveTrafficPercentile": share,
    }


def _state_error(e: StateConflict | StateUnavailable) -> web.Response:
    """409: another admin's write landed first (nothing changed; read and try again);
    503: the shared state cannot be written now (nothing changed; this router keeps serving)."""
    if isinstance(e, StateConflict):
        return json_error(409, f"not changed: {e}")
    return json_error(503, f"not changed: {e}")


def _unconfirmed(e: ReloadUnconfirmed) -> web.Response:
    """503: stored and live in this process, but not every worker process confirmed it."""
    return json_error(503, f"the change is stored, but {e}; they take it when they answer "
                      "or restart")


def _not_found(what: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(
        body=orjson.dumps({"message": f"{what} not found"}), content_type="application/json"
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            body=orjson.dumps({"message": "the body must be a JSON object"}),
            content_type="application/json",
        )
    return body
