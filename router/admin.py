"""The admin API (aiohttp, its own port and token): service state, keys and live counts.

Everything here is off the scoring path; a request costs far more than the framework does.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from router.keystore import atomic_write

if TYPE_CHECKING:
    from router.server import Router

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "MLFE_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = "admin-token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_token(state_dir: Path) -> str:
    """From MLFE_ADMIN_TOKEN, else generated once and kept (owner-only) in the state dir."""
    env = os.environ.get(ADMIN_TOKEN_ENV)
    if env:
        return env
    path = state_dir / ADMIN_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    atomic_write(path, token.encode())
    return token


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
        self.app.router.add_get("/v1/stats", self.stats)
        self.app.router.add_get("/v1/services", self.list_services)
        self.app.router.add_get("/v1/services/{name}", self.get_service)
        self.app.router.add_get("/v1/services/{name}/keys", self.get_keys)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        log.info("admin API on http://%s:%d", host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- handlers -------------------------------------------------------------------------

    def _service_or_404(self, request: web.Request) -> str:
        name = request.match_info["name"]
        if name not in self._router.services:
            raise web.HTTPNotFound(
                body=orjson.dumps({"message": f"Service {name} not found"}),
                content_type="application/json",
            )
        return name

    async def stats(self, request: web.Request) -> web.Response:
        return json_response({"services": self._router.stats()})

    async def list_services(self, request: web.Request) -> web.Response:
        return json_response(
            {"services": [self._router.describe(n) for n in self._router.services]}
        )

    async def get_service(self, request: web.Request) -> web.Response:
        return json_response(self._router.describe(self._service_or_404(request)))

    async def get_keys(self, request: web.Request) -> web.Response:
        name = self._service_or_404(request)
        keys = self._router.keys.get(name)
        if keys is None:
            return json_error(404, f"Service {name} has no keys (auth_enabled is false)")
        return json_response({"primaryKey": keys[0], "secondaryKey": keys[1]})
