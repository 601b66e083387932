"""Synthetic replicas: a model stand-in for load tests (`mlfe score-server --synthetic SPEC`, and
`synthetic: SPEC` in a service's config in place of `entry_script`).

A synthetic replica is the replica inference server with a fake `run()`: same routes, same
request ids and error bodies, same graceful shutdown. What `run()` does is the SPEC:

- `latency`: how long `run()` takes, in ms: a number (fixed), `fixed:MS`, `uniform:MIN:MAX`,
  `lognormal:MEDIAN:P99`, or a mapping `{distribution: fixed|uniform|lognormal, ms | min_ms,
  max_ms | median_ms, p99_ms}`. Default 0.
- `concurrency`: `run()` calls at once; more wait inside the replica in arrival order, as with a
  CPU-bound model's `WORKER_COUNT` workers. Default: env `WORKER_COUNT`, else 1.
- `error_rate`: the fraction of requests that fail, 0..1 (default 0); `error_status`: their
  status (default 500; a 5xx is marked `x-ms-run-function-failed`, as a raising `run()`'s is).
- `response_bytes`: the size of a successful response body, `{"result":"xx..."}`, at least 13
  (default 64).
- `init_ms`: the cold start: time before the server listens, so `GET /` answers (default 0).
- `seed`: seeds the latency and error draws: the same seed gives the same sequence (default 0).

SPEC is JSON (`{"latency": "lognormal:20:200", "concurrency": 2}`) or `k=v,k=v`
(`latency=lognormal:20:200,concurrency=2,error_rate=0.01`; a dotted key nests:
`latency.distribution=uniform,latency.min_ms=5,latency.max_ms=10`). In a YAML config, `synthetic:`
takes the same keys as a mapping, or the same SPEC string.

The latency and error draws come from two random streams seeded from `seed`, drawn once per
request in arrival order, so a run repeats exactly when its requests arrive in the same order.
Every replica started with the same SPEC draws the same sequence.

`GET /stats` reports what the replica saw: its concurrency limit, `running` / `maxRunning`
(calls in `run()` now / at most), `waiting` / `maxWaiting` (requests queued inside the replica),
`served`, `failed`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from mlfe.synthetic_spec import (
    MIN_RESPONSE_BYTES,
    Z99,
    SyntheticSpec,
    parse_spec,
)

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

# ---- the model's behaviour: pure, seeded ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Draw:
    latency_s: float
    fails: bool


class Sampler:
    """The latency and error of each request, from two streams seeded by `spec.seed` (so a
    change of error rate does not change the latencies)."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self._latency = random.Random(f"{spec.seed}:latency")
        self._errors = random.Random(f"{spec.seed}:errors")
        lat = spec.latency
        if lat.distribution == "lognormal":
            assert lat.median_ms is not None and lat.p99_ms is not None
            self._mu = math.log(lat.median_ms / 1000)
            self._sigma = math.log(lat.p99_ms / lat.median_ms) / Z99

    def latency_s(self) -> float:
        lat = self.spec.latency
        if lat.distribution == "uniform":
            assert lat.min_ms is not None and lat.max_ms is not None
            return self._latency.uniform(lat.min_ms, lat.max_ms) / 1000
        if lat.distribution == "lognormal":
            return self._latency.lognormvariate(self._mu, self._sigma)
        return (lat.ms or 0.0) / 1000

    def fails(self) -> bool:
        return self._errors.random() < self.spec.error_rate

    def draw(self) -> Draw:
        return Draw(self.latency_s(), self.fails())


def response_body(size: int) -> bytes:
    """A JSON document of exactly `size` bytes."""
    return b'{"result":"' + b"x" * (size - MIN_RESPONSE_BYTES) + b'"}'


class SyntheticModel:
    """The fake `run()`: at most `concurrency` at once, the rest waiting in arrival order."""

    def __init__(self, spec: SyntheticSpec, concurrency: int) -> None:
        self.spec = spec
        self.concurrency = concurrency
        self.sampler = Sampler(spec)
        self.body = response_body(spec.response_bytes)
        self._slots = asyncio.Semaphore(concurrency)
        self.running = self.max_running = 0
        self.waiting = self.max_waiting = 0
        self.served = self.failed = 0

    async def run(self) -> tuple[bool, float]:
        """One call: (failed, ms spent in `run()` itself, not waiting for a slot)."""
        draw = self.sampler.draw()
        self.waiting += 1
        self.max_waiting = max(self.max_waiting, self.waiting)
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        start = time.perf_counter()
        try:
            await asyncio.sleep(draw.latency_s)  # the model's own time: this IS its behaviour
        finally:
            self.running -= 1
            self._slots.release()
        self.served += 1
        self.failed += draw.fails
        return draw.fails, (time.perf_counter() - start) * 1e3

    def stats(self) -> dict[str, int]:
        return {
            "concurrency": self.concurrency,
            "running": self.running,
            "maxRunning": self.max_running,
            "waiting": self.waiting,
            "maxWaiting": self.max_waiting,
            "served": self.served,
            "failed": self.failed,
        }


# ---- the server -------------------------------------------------------------------------------


def make_app(model: SyntheticModel) -> web.Application:
    """The replica inference server's routes and middlewares around the synthetic `run()`."""
    from aiohttp import web

    from deploy import score_server as ss

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="Healthy")

    async def swagger(request: web.Request) -> web.Response:
        return ss.json_error(404, "Swagger not found")

    async def stats(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(model.stats()), content_type="application/json")

    async def score(request: web.Request) -> web.StreamResponse:
        # The input checks of an inference-schema entry script's /score: JSON bodies only.
        if request.method == "POST":
            if not ss._is_json(request.content_type):
                return ss.json_error(415, "Expects Content-Type to be application/json")
            body = await request.read()
            if not body:
                return ss.json_error(400, "POST body is empty. Expecting a JSON document.")
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return ss.json_error(400, f"POST body could not be decoded as JSON: {exc}")
        elif request.method == "OPTIONS":
            return web.Response(status=200)
        elif request.method != "GET":
            return ss.json_error(405, "Method not allowed")
        failed, elapsed_ms = await model.run()
        if failed:
            status = model.spec.error_status
            if status >= 500:
                response = ss.json_error(status, ss.RUN_FAILED_MESSAGE)
                response.headers["x-ms-run-function-failed"] = "True"
            else:
                response = ss.json_error(status, f"Synthetic error {status}")
        else:
            response = web.Response(body=model.body, content_type="application/json")
        response.headers["x-ms-run-fn-exec-ms"] = f"{elapsed_ms:.3f}"
        return response

    app = web.Application(
        client_max_size=ss.MAX_BODY_BYTES,
        middlewares=[
            ss._request_id_middleware(os.environ.get("HTTP_X_MS_SERVER_VERSION", "")),
            ss._json_errors,
        ],
    )
    app.router.add_get("/", health)
    app.router.add_route("*", "/score", score)
    app.router.add_get("/swagger.json", swagger)
    app.router.add_get("/stats", stats)
    return app


async def serve(spec: SyntheticSpec, *, host: str, port: int, concurrency: int) -> int:
    """Cold start (`init_ms`), then serve until SIGTERM/SIGINT and drain, as `mlfe score-server`
    does with an entry script."""
    import signal

    from aiohttp import web

    from deploy.score_server import SHUTDOWN_TIMEOUT_S, _url

    model = SyntheticModel(spec, concurrency)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if spec.init_ms:
            log.info("Synthetic init: %.0f ms", spec.init_ms)
            # The cold start, before listening (a replica is not healthy during init()).
            init = asyncio.ensure_future(asyncio.sleep(spec.init_ms / 1000))
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({init, stopped}, return_when=asyncio.FIRST_COMPLETED)
            init.cancel()
            stopped.cancel()
            if stop.is_set():
                return 0
        runner = web.AppRunner(make_app(model), access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            sock = socket.create_server((host, port))
        except OSError as exc:
            log.error("Cannot listen on %s: %s", _url(host, port), exc)
            await runner.cleanup()
            return 1
        try:
            await web.SockSite(runner, sock).start()
            log.info("Synthetic model: %s, concurrency %d", spec.to_arg(), concurrency)
            log.info("Listening on %s", _url(host, sock.getsockname()[1]))
            await stop.wait()
            log.info("Shutting down: no new connections, finishing in-flight requests")
        finally:
            await runner.cleanup()
            sock.close()
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run_synthetic_server(
    *, spec: str, host: str = "127.0.0.1", port: int = 5001, log_level: str = "INFO"
) -> int:
    """`mlfe score-server --synthetic SPEC`. Returns the process exit code."""
    import uvloop

    from deploy.score_server import worker_count

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        parsed = parse_spec(spec)
        concurrency = parsed.concurrency or worker_count(os.environ)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(parsed, host=host, port=port, concurrency=concurrency))
