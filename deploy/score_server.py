"""The replica inference server (`mlfe score-server`): azureml's inference server, on aiohttp.

`GET /` -> `Healthy`; `GET|POST|OPTIONS /score` -> the entry script's `run(data)`;
`GET /swagger.json`. `init()` runs once before the socket is bound, so a health probe succeeds
only after it. Sync `run` executes on a pool of `WORKER_COUNT` threads (default 1); async `run`
is awaited. Errors are `{"message": ...}`; exception text from `run()` is logged, never returned.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import uvloop
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDictProxy, MultiMapping

from deploy.entry_script import EntryScript, EntryScriptError, load_entry_script

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 100 * 1024 * 1024
HEADER_LIMIT = 100  # azureml: longer request id headers are refused with 431
SHUTDOWN_TIMEOUT_S = 60.0  # how long SIGTERM waits for in-flight requests
RUN_FAILED_MESSAGE = "An unexpected error occurred in scoring script. Check the logs for more info."
INTERNAL_ERROR_MESSAGE = "An unexpected internal error occurred. Check the logs for more info."
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def worker_count(environ: Mapping[str, str]) -> int:
    """Threads for sync `run()`: env `WORKER_COUNT`, default 1 (azureml's gunicorn default)."""
    raw = environ.get("WORKER_COUNT", "").strip() or "1"
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"WORKER_COUNT must be a positive integer, got {raw!r}")
    return count


def json_error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps({"message": message}), content_type="application/json"
    )


def _to_list(obj: Any) -> Any:
    # orjson's numpy support needs C-contiguous arrays; anything with tolist() (slices,
    # transposes, numpy scalars of odd dtypes) goes through plain lists instead.
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def dumps(value: Any) -> bytes:
    """JSON-encode a `run()` result (numpy arrays included)."""
    return orjson.dumps(value, default=_to_list, option=_JSON_OPTIONS)


# -- request ids (azureml inference server's before_request / after_request) ---------------------


@functools.cache
def _warn_legacy_request_id() -> None:
    # Once per process: the router may forward this header on every request.
    logger.warning(
        "x-ms-request-id header has been deprecated and will be removed from future versions"
        " of the server. Please use x-ms-client-request-id."
    )


def request_id_headers(
    headers: CIMultiDictProxy[str], server_version: str = ""
) -> tuple[dict[str, str], str | None]:
    """Response headers carrying the request ids, and a 431 message if an id is too long."""
    out: dict[str, str] = {}
    if server_version:
        out["x-ms-server-version"] = server_version
    if "TraceId" in headers:
        out["TraceId"] = headers["TraceId"]

    request_id = headers.get("x-request-id") or str(uuid.uuid4())
    if len(request_id) > HEADER_LIMIT:
        return out, f"x-request-id must not exceed {HEADER_LIMIT} characters"
    out["x-request-id"] = request_id

    legacy_id = headers.get("x-ms-request-id", "")
    client_id = headers.get("x-ms-client-request-id", "")
    if legacy_id:
        _warn_legacy_request_id()
        client_id = client_id or legacy_id
    else:
        legacy_id = client_id or request_id
    if len(legacy_id) > HEADER_LIMIT or len(client_id) > HEADER_LIMIT:
        return out, (
            f"x-ms-request-id and x-ms-client-request-id must not exceed {HEADER_LIMIT} characters"
        )
    out["x-ms-request-id"] = legacy_id
    if client_id:
        out["x-ms-client-request-id"] = client_id
    return out, None


# The current request's x-request-id, for log lines (set per request task by the middleware).
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def _request_id_middleware(server_version: str) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        ids, error = request_id_headers(request.headers, server_version)
        _request_id.set(ids.get("x-request-id", ""))
        response: web.StreamResponse = (
            json_error(431, error) if error is not None else await handler(request)
        )
        response.headers.update(ids)
        return response

    return middleware


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413 ...) as azureml's `{"message": ...}` bodies."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"Not found: {request.path}"
        elif exc.status == 405:
            message = "Method not allowed"
        else:
            message = exc.text or exc.reason
        response = json_error(exc.status, message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        logger.exception("Unhandled error serving %s %s", request.method, request.path)
        return json_error(500, INTERNAL_ERROR_MESSAGE)


# -- /score --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What one `run()` call gave: its value or its exception, and how long it took."""

    value: Any
    error: Exception | None
    elapsed_ms: float


def _run_timed(run: Callable[[Any], Any], data: Any) -> RunOutcome:
    # Timed inside the worker thread: waiting for a free worker is not run() time.
    start = time.perf_counter()
    try:
        value = run(data)
    except Exception as exc:
        return RunOutcome(None, exc, (time.perf_counter() - start) * 1e3)
    return RunOutcome(value, None, (time.perf_counter() - start) * 1e3)


async def _run_timed_async(run: Callable[[Any], Any], data: Any) -> RunOutcome:
    start = time.perf_counter()
    try:
        value = await run(data)
    except Exception as exc:
        return RunOutcome(None, exc, (time.perf_counter() - start) * 1e3)
    return RunOutcome(value, None, (time.perf_counter() - start) * 1e3)


def _parse_query_value(value: str) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return value


def query_input(query: MultiMapping[str]) -> dict[str, Any]:
    """azureml's GET input: each parameter parsed as JSON if it can be; repeated ones as lists.

    `?a=1&b=[1,2]&c=x&c=y` -> `{"a": 1, "b": [1, 2], "c": ["x", "y"]}`.
    """
    data: dict[str, Any] = {}
    for key in dict.fromkeys(query.keys()):  # unique keys, in order
        values = [_parse_query_value(v) for v in query.getall(key)]
        data[key] = values[0] if len(values) == 1 else values
    return data


def _is_json(content_type: str) -> bool:
    # Like flask's request.is_json: application/json or application/*+json; params are ignored.
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


class ScoreHandlers:
    """The routes' handlers, bound to one entry script and its `run()` thread pool."""

    def __init__(self, script: EntryScript, executor: Executor) -> None:
        self._script = script
        self._executor = executor

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="Healthy")

    async def swagger(self, request: web.Request) -> web.Response:
        doc = self._script.swagger()
        if doc is None:
            return json_error(404, "Swagger not found")
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def score(self, request: web.Request) -> web.StreamResponse:
        data: Any
        if request.method == "POST":
            if not _is_json(request.content_type):
                return json_error(415, "Expects Content-Type to be application/json")
            body = await request.read()
            if not body:
                return json_error(400, "POST body is empty. Expecting a JSON document.")
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return json_error(400, f"POST body could not be decoded as JSON: {exc}")
        elif request.method == "GET":
            data = query_input(request.query)
        elif request.method == "OPTIONS":
            # azureml answers OPTIONS with an empty 200 when no CORS handler is configured.
            return web.Response(status=200)
        else:
            return json_error(405, "Method not allowed")

        outcome = await self._invoke(data)
        response = self._respond(outcome)
        # Formatted explicitly so it reads '0.012', never '1.2e-2'.
        response.headers["x-ms-run-fn-exec-ms"] = f"{outcome.elapsed_ms:.3f}"
        return response

    async def _invoke(self, data: Any) -> RunOutcome:
        if self._script.is_async:
            return await _run_timed_async(self._script.run, data)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _run_timed, self._script.run, data)

    def _respond(self, outcome: RunOutcome) -> web.StreamResponse:
        request_id = _request_id.get()
        if outcome.error is not None:
            logger.error("run() raised (x-request-id %s)", request_id, exc_info=outcome.error)
            return _run_failed(json_error(500, RUN_FAILED_MESSAGE))
        if isinstance(outcome.value, web.StreamResponse):
            # The script built its own response: passed through as is.
            response = outcome.value
            return _run_failed(response) if response.status >= 500 else response
        try:
            body = dumps(outcome.value)
        except TypeError:
            logger.exception(
                "run() returned a value that cannot be encoded as JSON (x-request-id %s)",
                request_id,
            )
            return _run_failed(json_error(500, RUN_FAILED_MESSAGE))
        return web.Response(body=body, content_type="application/json")


def _run_failed(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["x-ms-run-function-failed"] = "True"
    return response


def make_app(script: EntryScript, executor: Executor) -> web.Application:
    """The aiohttp application for `script`; `init()` must already have run."""
    handlers = ScoreHandlers(script, executor)
    server_version = os.environ.get("HTTP_X_MS_SERVER_VERSION", "")
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[_request_id_middleware(server_version), _json_errors],
    )
    app.router.add_get("/", handlers.health)
    app.router.add_route("*", "/score", handlers.score)
    app.router.add_get("/swagger.json", handlers.swagger)
    return app


# -- process lifecycle ---------------------------------------------------------------------------


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(script: EntryScript, *, host: str, port: int, workers: int) -> int:
    """Run `init()`, serve until SIGTERM/SIGINT, drain in-flight requests; return the exit code."""
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="score-run")
    try:
        try:
            await script.init(executor)
        except Exception:
            logger.exception("init() in %s failed", script.path)
            return 1

        runner = web.AppRunner(
            make_app(script, executor), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        try:
            # Bound here (not by TCPSite) so --port 0 works and the real port can be reported.
            sock = socket.create_server((host, port))
        except OSError as exc:
            logger.error("Cannot listen on %s: %s", _url(host, port), exc)
            await runner.cleanup()
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            await web.SockSite(runner, sock).start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            logger.info("Listening on %s", _url(host, sock.getsockname()[1]))
            await stop.wait()
            logger.info("Shutting down: no new connections, finishing in-flight requests")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            # Stops listening, lets in-flight handlers finish (up to SHUTDOWN_TIMEOUT_S).
            await runner.cleanup()
            sock.close()
        return 0
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def run_score_server(
    *, entry_script: str, host: str = "127.0.0.1", port: int = 5001, log_level: str = "INFO"
) -> int:
    """`mlfe score-server`: load the entry script and serve it. Returns the process exit code."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        workers = worker_count(os.environ)
        script = load_entry_script(entry_script)
    except (ValueError, EntryScriptError) as exc:
        logger.error("%s", exc, exc_info=exc.__cause__)
        return 1
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(serve(script, host=host, port=port, workers=workers))
    except KeyboardInterrupt:
        # Ctrl-C during init(), before our handler is installed. A sync init() cannot be
        # interrupted in its worker thread and the interpreter would wait for it: leave now.
        logger.info("Interrupted during init()")
        logging.shutdown()
        os._exit(130)
