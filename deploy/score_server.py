"""The replica inference server (`mlfe score-server`): azureml's inference server, on aiohttp.

It answers as Microsoft's azureml-inference-server-http (azmlinfsrv) does, so Azure ML entry
scripts run unchanged: `GET /` -> `Healthy`; `GET|POST|OPTIONS /score` -> the entry script's
run(), fed as deploy/entry_script.py explains (the body as a str; inference-schema's parsed
parameters; or the raw request for `@rawhttp`); `GET /swagger.json[?version=2|3|3.1]`.
`init()` runs once before the socket is bound, so a health probe succeeds only after it. Sync
`run` executes on a pool of `WORKER_COUNT` threads (default 1); async `run` is awaited; one that
outlives `SCORING_TIMEOUT_MS` (default an hour) is answered with a 500. Errors are
`{"message": ...}`; exception text from `run()` is logged, never returned.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import orjson
import uvloop
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from deploy.entry_script import (
    EntryScript,
    EntryScriptError,
    InputMode,
    load_entry_script,
    resolve_entry_script,
)
from deploy.swagger import Swagger, SwaggerNotFound
from mlfe_azureml.aml_request import AMLRequest
from mlfe_azureml.aml_response import AMLResponse

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 100 * 1024 * 1024
HEADER_LIMIT = 100  # azureml: longer request id headers are refused with 431
SHUTDOWN_TIMEOUT_S = 60.0  # how long SIGTERM waits for in-flight requests
RUN_FAILED_MESSAGE = "An unexpected error occurred in scoring script. Check the logs for more info."
INTERNAL_ERROR_MESSAGE = "An unexpected internal error occurred. Check the logs for more info."
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
DEFAULT_SCORING_TIMEOUT_MS = 3600 * 1000  # azmlinfsrv's default
# gunicorn's exit code when a worker cannot boot: azmlinfsrv's for a script that fails to load
# or whose init() raises.
SCRIPT_FAILED_EXIT = 3


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


def scoring_timeout_ms(environ: Mapping[str, str]) -> int:
    """How long run() may take: env `SCORING_TIMEOUT_MS` (azmlinfsrv's), default an hour."""
    raw = environ.get("SCORING_TIMEOUT_MS", "").strip()
    if not raw:
        return DEFAULT_SCORING_TIMEOUT_MS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"SCORING_TIMEOUT_MS must be a positive integer, got {raw!r}")
    return value


def _flagged(response: web.StreamResponse, *, failed: bool) -> web.StreamResponse:
    # azmlinfsrv's AMLResponse carries this header on every answer it builds: "True" or "False".
    response.headers["x-ms-run-function-failed"] = "True" if failed else "False"
    return response


def json_error(status: int, message: str, *, failed: bool = False) -> web.Response:
    response = web.Response(
        status=status, body=orjson.dumps({"message": message}), content_type="application/json"
    )
    response.headers["x-ms-run-function-failed"] = "True" if failed else "False"
    return response


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


def _joined(headers: CIMultiDictProxy[str], name: str) -> str:
    # A repeated header reads as its values joined by "," (as gunicorn hands it to azmlinfsrv).
    values = headers.getall(name, ())
    return values[0] if len(values) == 1 else ",".join(values)


def request_id_headers(
    headers: CIMultiDictProxy[str], server_version: str = ""
) -> tuple[dict[str, str], str | None]:
    """Response headers carrying the request ids, and a 431 message if an id is too long."""
    out: dict[str, str] = {}
    if server_version:
        out["x-ms-server-version"] = server_version
    if "TraceId" in headers:
        out["TraceId"] = headers["TraceId"]

    request_id = _joined(headers, "x-request-id") or str(uuid.uuid4())
    if len(request_id) > HEADER_LIMIT:
        return out, f"x-request-id must not exceed {HEADER_LIMIT} characters"
    out["x-request-id"] = request_id

    legacy_id = _joined(headers, "x-ms-request-id")
    client_id = _joined(headers, "x-ms-client-request-id")
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


# werkzeug's descriptions, which azmlinfsrv returns for unknown paths and methods.
NOT_FOUND_MESSAGE = (
    "The requested URL was not found on the server. If you entered the URL manually please"
    " check your spelling and try again."
)
METHOD_NOT_ALLOWED_MESSAGE = "The method is not allowed for the requested URL."


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
            message = NOT_FOUND_MESSAGE
        elif exc.status == 405:
            message = METHOD_NOT_ALLOWED_MESSAGE
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


def _run_timed(
    script: EntryScript, params: dict[str, Any], headers: Mapping[str, str] | None
) -> RunOutcome:
    # Timed inside the worker thread: waiting for a free worker is not run() time.
    start = time.perf_counter()
    try:
        value = script.call(params, headers)
    except Exception as exc:
        return RunOutcome(None, exc, (time.perf_counter() - start) * 1e3)
    return RunOutcome(value, None, (time.perf_counter() - start) * 1e3)


async def _run_timed_async(
    script: EntryScript, params: dict[str, Any], headers: Mapping[str, str] | None
) -> RunOutcome:
    start = time.perf_counter()
    try:
        value = await script.call(params, headers)
    except Exception as exc:
        return RunOutcome(None, exc, (time.perf_counter() - start) * 1e3)
    return RunOutcome(value, None, (time.perf_counter() - start) * 1e3)


def _parse_query_value(value: str) -> Any:
    # The stdlib parser, as azmlinfsrv's: it also reads NaN and Infinity.
    try:
        return json.loads(value)
    except ValueError:
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


def script_headers(request: web.Request) -> list[tuple[str, str]]:
    """The request's headers as a script sees them under azmlinfsrv (gunicorn + werkzeug).

    Names title-cased (`X-Ms-Client-Request-Id`), a repeated header's values joined with ",",
    names containing "_" dropped (gunicorn drops them).
    """
    out: dict[str, str] = {}
    for raw_name, raw_value in request.raw_headers:
        name = raw_name.decode("latin-1")
        if "_" in name:
            continue
        key = name.title()
        value = raw_value.decode("latin-1")
        out[key] = f"{out[key]},{value}" if key in out else value
    return list(out.items())


def _aml_request(request: web.Request, body: bytes) -> AMLRequest:
    return AMLRequest(
        method=request.method,
        path=request.path,
        query_string=request.query_string.encode("latin-1"),
        headers=script_headers(request),
        body=body,
        scheme=request.scheme,
        host=request.host,
        remote_addr=request.remote,
    )


class BadInput(Exception):
    """The request cannot become run()'s arguments: answered with `status` and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_body(body: bytes) -> Any:
    """A schema run()'s POST body, with azmlinfsrv's answers when it is not a JSON object."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        # The stdlib parser for what orjson refuses (NaN, huge ints) and for its error text.
        # (A body that is not UTF-8 makes it raise UnicodeDecodeError: azmlinfsrv's 500 too.)
        try:
            doc = json.loads(body)
        except json.JSONDecodeError as exc:
            if body:
                raise BadInput(400, f"POST body could not be decoded as JSON: {exc}") from None
            raise BadInput(400, "POST body is empty. Expecting a JSON dictionary.") from None
    if not isinstance(doc, dict):
        raise BadInput(400, "POST body should be a JSON dictionary.")
    return doc


def _schema_arguments(script: EntryScript, doc: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, default in script.schema_params:
        value = doc.get(name, default)
        if value is inspect.Parameter.empty:
            raise BadInput(400, f"A value is not provided for the {name!r} parameter.")
        params[name] = value
    return params


def _werkzeug_response() -> type | None:
    # Scripts that import azmlinfsrv's own AMLResponse (or flask's) return werkzeug responses.
    module = sys.modules.get("werkzeug.wrappers")
    return getattr(module, "Response", None) if module is not None else None


def _as_aiohttp(status: int, headers: Any, body: bytes) -> web.Response:
    response = web.Response(status=status, body=body, headers=CIMultiDict(headers))
    if hdrs.CONTENT_TYPE not in response.headers:
        response.headers[hdrs.CONTENT_TYPE] = "text/html; charset=utf-8"
    return response


def encode_result(value: Any) -> bytes:
    """A run() result as azmlinfsrv's JSON answer; TypeError when it cannot be JSON."""
    if value is None:
        return b"{}"  # azmlinfsrv answers None with an empty object
    try:
        return dumps(value)
    except TypeError:
        # json.dumps turns int/float/bool keys into strings; orjson does it only when asked.
        return orjson.dumps(value, default=_to_list, option=_JSON_OPTIONS | orjson.OPT_NON_STR_KEYS)


class ScoreHandlers:
    """The routes' handlers, bound to one entry script and its `run()` thread pool."""

    def __init__(
        self,
        script: EntryScript,
        executor: Executor,
        *,
        swagger: Swagger | None = None,
        timeout_ms: int = DEFAULT_SCORING_TIMEOUT_MS,
    ) -> None:
        self._script = script
        self._executor = executor
        self._swagger = swagger or Swagger(script.run, script.app_root, script.swagger())
        self._timeout_ms = timeout_ms

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="Healthy", content_type="text/html")

    async def swagger(self, request: web.Request) -> web.StreamResponse:
        try:
            doc = self._swagger.get(request.query.get("version"))
        except SwaggerNotFound as exc:
            return json_error(404, str(exc))
        return _flagged(
            web.Response(body=orjson.dumps(doc), content_type="application/json"), failed=False
        )

    async def score(self, request: web.Request) -> web.StreamResponse:
        script = self._script
        method = request.method
        headers: list[tuple[str, str]] | None = None
        try:
            if script.mode is InputMode.RAW:
                # Every method reaches an @rawhttp run(), OPTIONS and HEAD included.
                aml = _aml_request(request, await request.read())
                params: dict[str, Any] = {script.input_param: aml}
                headers = aml.headers.items()
            elif method == "POST":
                body = await request.read()
                if script.mode is InputMode.STRING:
                    try:
                        params = {script.input_param: body.decode("utf-8")}
                    except UnicodeDecodeError as exc:
                        raise BadInput(400, f"Input cannot be decoded as UTF-8: {exc}") from None
                else:
                    if not _is_json(request.content_type):
                        raise BadInput(415, "Expects Content-Type to be application/json")
                    params = _schema_arguments(script, _json_body(body))
            elif method == "GET":
                data = query_input(request.query)
                if script.mode is InputMode.STRING:
                    params = {script.input_param: json.dumps(data)}
                else:
                    params = _schema_arguments(script, data)
            elif method == "OPTIONS":
                # azmlinfsrv answers OPTIONS with an empty 200 when no CORS handler is set.
                return _flagged(web.Response(status=200, content_type="text/html"), failed=False)
            else:
                return json_error(405, "Method not allowed")
        except BadInput as exc:
            return json_error(exc.status, exc.message)

        if script.wants_headers and headers is None:
            headers = script_headers(request)
        try:
            outcome = await asyncio.wait_for(
                self._invoke(params, dict(headers) if headers is not None else None),
                self._timeout_ms / 1000,
            )
        except TimeoutError:
            logger.error("run() did not finish within %d ms (x-request-id %s)",
                         self._timeout_ms, _request_id.get())
            return json_error(500, f"Scoring timeout after {self._timeout_ms} ms", failed=True)
        response = self._respond(outcome)
        if response is not None and outcome.error is None:
            # Formatted explicitly so it reads '0.012', never '1.2e-2'.
            response.headers["x-ms-run-fn-exec-ms"] = f"{outcome.elapsed_ms:.3f}"
            return response
        # A failed run() (or an unencodable result) is answered without its run time, as there.
        return response or json_error(500, INTERNAL_ERROR_MESSAGE)

    def _invoke(
        self, params: dict[str, Any], headers: Mapping[str, str] | None
    ) -> Awaitable[RunOutcome]:
        # A sync run()'s executor future goes to wait_for as it is: no task per request.
        if self._script.is_async:
            return _run_timed_async(self._script, params, headers)
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, _run_timed, self._script, params, headers)

    def _respond(self, outcome: RunOutcome) -> web.StreamResponse | None:
        """The answer to a run() outcome; None for a result that cannot be sent (a 500)."""
        request_id = _request_id.get()
        if outcome.error is not None:
            logger.error("run() raised (x-request-id %s)", request_id, exc_info=outcome.error)
            return json_error(500, RUN_FAILED_MESSAGE, failed=True)
        value = outcome.value
        if isinstance(value, web.StreamResponse):
            # The script built its own aiohttp response (mlfe's addition): passed through as is.
            return _run_failed(value) if value.status >= 500 else value
        werkzeug_response = _werkzeug_response()
        if isinstance(value, AMLResponse) or (
            werkzeug_response is not None and isinstance(value, werkzeug_response)
        ):
            value = cast(Any, value)
            response = _as_aiohttp(value.status_code, value.headers.items(), value.get_data())
            return _run_failed(response) if response.status >= 500 else response
        try:
            body = encode_result(value)
        except TypeError:
            # azmlinfsrv: an internal error (not a run() failure), without the run time.
            logger.exception(
                "run() returned a value that cannot be encoded as JSON (x-request-id %s)",
                request_id,
            )
            return None
        return _flagged(web.Response(body=body, content_type="application/json"), failed=False)


def _run_failed(response: web.StreamResponse) -> web.StreamResponse:
    return _flagged(response, failed=True)


def make_app(
    script: EntryScript, executor: Executor, *, timeout_ms: int = DEFAULT_SCORING_TIMEOUT_MS
) -> web.Application:
    """The aiohttp application for `script`; `init()` must already have run."""
    handlers = ScoreHandlers(script, executor, timeout_ms=timeout_ms)
    server_version = os.environ.get("HTTP_X_MS_SERVER_VERSION", "")
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[_request_id_middleware(server_version), _json_errors],
    )
    app.router.add_get("/", handlers.health)
    app.router.add_get("/score", handlers.score)  # with HEAD, as flask adds it
    app.router.add_post("/score", handlers.score)
    app.router.add_route("OPTIONS", "/score", handlers.score)
    app.router.add_get("/swagger.json", handlers.swagger)
    return app


# -- process lifecycle ---------------------------------------------------------------------------


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    script: EntryScript,
    *,
    host: str,
    port: int,
    workers: int,
    timeout_ms: int = DEFAULT_SCORING_TIMEOUT_MS,
) -> int:
    """Run `init()`, serve until SIGTERM/SIGINT, drain in-flight requests; return the exit code."""
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="score-run")
    try:
        try:
            await script.init(executor)
        except Exception:
            logger.exception("init() in %s failed", script.path)
            _log_model_dir()
            return SCRIPT_FAILED_EXIT

        runner = web.AppRunner(
            make_app(script, executor, timeout_ms=timeout_ms),
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
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


MODEL_DIR_LISTING_LIMIT = 200  # lines, as azmlinfsrv


def _log_model_dir() -> None:
    """After a failed init(), what AZUREML_MODEL_DIR holds (azmlinfsrv logs it too)."""
    model_dir = os.environ.get("AZUREML_MODEL_DIR", "")
    if not model_dir or not os.path.isdir(model_dir):
        return
    logger.info("Model Directory Contents:")
    count = 0
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        depth = os.path.relpath(root, model_dir).count(os.sep) + (root != model_dir)
        for name in [os.path.basename(root) + os.sep, *sorted(files)]:
            if count == MODEL_DIR_LISTING_LIMIT:
                logger.info("Output Truncated. First %d lines shown.", MODEL_DIR_LISTING_LIMIT)
                return
            indent = "    " * (depth + (name[-1:] != os.sep))
            logger.info("%s%s", indent, name)
            count += 1


def run_score_server(
    *, entry_script: str | None, host: str = "127.0.0.1", port: int = 5001, log_level: str = "INFO"
) -> int:
    """`mlfe score-server`: load the entry script and serve it. Returns the process exit code."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        workers = worker_count(os.environ)
        timeout_ms = scoring_timeout_ms(os.environ)
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    try:
        script = load_entry_script(resolve_entry_script(entry_script))
    except EntryScriptError as exc:
        logger.error("%s", exc, exc_info=exc.__cause__)
        return SCRIPT_FAILED_EXIT
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(
                serve(script, host=host, port=port, workers=workers, timeout_ms=timeout_ms)
            )
    except KeyboardInterrupt:
        # Ctrl-C during init(), before our handler is installed. A sync init() cannot be
        # interrupted in its worker thread and the interpreter would wait for it: leave now.
        logger.info("Interrupted during init()")
        logging.shutdown()
        os._exit(130)
