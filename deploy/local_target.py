"""The local target: each replica of an `entry_script` service is an `mlfe score-server` child.

Replicas are probed as Kubernetes probes a pod: liveness (`GET /`) begins
`initial_delay_seconds` after the start and runs every `period_seconds` with `timeout_seconds`;
a replica is replaced only when it dies or fails `failure_threshold` liveness probes in a row, so
one still starting is never killed before then. It joins the router's pool (is ready) after
`success_threshold` readiness probes in a row, probed often while it starts so a fast replica
serves at once. At most `start_slots()` replicas (one per core this process may use) start at
once, so a scale-up does not starve itself of CPU; the rest wait their turn, not counted ready.
A start gives its slot up after START_SLOT_MAX_S even if not ready (probing goes on), so a
replica stuck starting delays the others' starts by that much at most.
A replica that fails is restarted with an exponential backoff, shown by `start_status()` (the
status line and `GET /v1/stats`). A replica is removed by taking it out of rotation, letting its
in-flight requests finish, then stopping it.
Children live in their own session (a terminal's Ctrl-C reaches mlfe, which drains them in
order) and get SIGTERM from the kernel if mlfe itself dies, so no replica outlives mlfe.

This is the `Actuator` the replica autoscaler drives: `current()` and `scale()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from deploy.cgroup import available_cores
from mlfe.config import ServiceConfig
from mlfe.supervise import Supervisor
from router.admission import Replica
from router.probe import probe_http
from router.services import Service

log = logging.getLogger(__name__)

_LISTENING = re.compile(rb"Listening on http://[^:]+:(\d+)")
STOP_GRACE_S = 10.0
# Restart backoff after a replica fails (crash loops must not spin).
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
# Local replicas are probed for readiness this often while starting.
STARTUP_PROBE_S = 0.1
# A start holds its start slot until the replica is ready or fails, but no longer than this:
# one that listens late or never passes readiness (liveness may give it minutes: azureml's
# initial_delay_seconds is 310) must not keep every other replica from starting. Readiness and
# liveness probing go on outside the slot.
START_SLOT_MAX_S = 30.0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when mlfe dies, however mlfe dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# `replica_server: azureml`: Microsoft's azmlinfsrv, started as its `azmlinfsrv` command is, but
# on loopback: its listen address is fixed at 0.0.0.0 (right in its container, not on a laptop),
# so the launcher sets it before azmlinfsrv reads it. The rest of the command line is its own.
AZMLINFSRV_ON_LOOPBACK = (
    "import sys\n"
    "import azureml_inference_server_http.constants as c\n"
    "c.DEFAULT_HOST = '127.0.0.1'\n"
    "from azureml_inference_server_http.amlserver import run\n"
    "sys.argv[0] = 'azmlinfsrv'\n"
    "sys.exit(run())\n"
)
AZMLINFSRV_PYTHON_ENV = "MLFE_AZMLINFSRV_PYTHON"


def azmlinfsrv_python() -> str:
    """The Python that has azureml-inference-server-http: mlfe's own (`pip install
    'mlfe[azureml]'`), or another environment's, named by MLFE_AZMLINFSRV_PYTHON."""
    return os.environ.get(AZMLINFSRV_PYTHON_ENV) or sys.executable


def check_replica_servers(configs: dict[str, ServiceConfig]) -> str | None:
    """Why a config's `replica_server: azureml` services cannot start here, or None."""
    wanting = [n for n, c in configs.items() if c.replica_server == "azureml"]
    if not wanting:
        return None
    python = azmlinfsrv_python()
    try:
        found = subprocess.run(
            [python, "-c", "import azureml_inference_server_http"],
            capture_output=True, timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    if found:
        return None
    return (f"services.{wanting[0]}.replica_server: azureml needs Microsoft's inference server "
            f"(azureml-inference-server-http) in {python}: pip install 'mlfe[azureml]', or name "
            f"a Python that has it in {AZMLINFSRV_PYTHON_ENV}")


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now (a server given a port cannot say which one it got)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def is_local(cfg: ServiceConfig) -> bool:
    """Services whose replicas this target runs as child processes."""
    return cfg.entry_script is not None or cfg.synthetic is not None


class State(Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    DEAD = "dead"


@dataclass(eq=False)
class LocalReplica:
    service: str
    proc: asyncio.subprocess.Process | None = None
    port: int = 0
    state: State = State.STARTING
    replica: Replica | None = None
    task: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    port_found: asyncio.Future[int] | None = None


def _scaled_away(rep: LocalReplica) -> bool:
    return rep.state is not State.STARTING


def start_slots() -> int:
    """Replicas that may start at once: one per core this process may use. Starting a replica
    (an interpreter, the model's imports and init) is CPU-bound; more at once only slows each,
    and the router serving the load that asked for them."""
    return max(1, available_cores())


class LocalTarget:
    def __init__(self, services: dict[str, Service], base_dir: Path, supervisor: Supervisor
                 ) -> None:
        self._services = services  # the router's live services, by name
        self._supervisor = supervisor
        self._base_dir = base_dir
        self._configs: dict[str, ServiceConfig] = {}
        self._replicas: dict[str, list[LocalReplica]] = {}
        self._desired: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}  # loop time of the next restart after a failure
        self._starts = asyncio.Semaphore(start_slots())
        self._closing = False

    # ---- configuration ---------------------------------------------------------------------

    def configure(self, services: dict[str, Service], configs: dict[str, ServiceConfig]) -> None:
        """Track the `entry_script` services of a (re)loaded config."""
        self._services = services
        local = {n: c for n, c in configs.items() if is_local(c)}
        for name in list(self._configs):
            if name not in local:
                self._desired[name] = 0
                self._reconcile(name)
        self._configs = local
        for name, cfg in local.items():
            self._replicas.setdefault(name, [])
            if name not in self._desired:
                self._desired[name] = cfg.num_replicas or cfg.autoscale_min_replicas
            self._reconcile(name)

    def replica_argv(self, cfg: ServiceConfig) -> tuple[list[str], int | None]:
        """The replica's command line, and its port when mlfe picks it (azmlinfsrv takes a port;
        `mlfe score-server --port 0` prints the one it got)."""
        if cfg.replica_server == "azureml":
            assert cfg.entry_script is not None
            port = free_loopback_port()
            return [azmlinfsrv_python(), "-c", AZMLINFSRV_ON_LOOPBACK,
                    "--entry_script", str(self._base_dir / cfg.entry_script),
                    "--port", str(port)], port
        return [sys.executable, "-m", "deploy.cli", "score-server", *self.model_args(cfg),
                "--host", "127.0.0.1", "--port", "0"], None

    def model_args(self, cfg: ServiceConfig) -> list[str]:
        """What `mlfe score-server` runs: the entry script, or the synthetic model."""
        if cfg.synthetic is not None:
            return ["--synthetic", cfg.synthetic.to_arg()]
        assert cfg.entry_script is not None
        return ["--entry-script", str(self._base_dir / cfg.entry_script)]  # absolute stays

    # ---- Actuator ---------------------------------------------------------------------------

    def current(self, service: str) -> int:
        return self._desired.get(service, 0)

    async def scale(self, service: str, desired: int) -> None:
        if service not in self._configs:
            raise KeyError(f"{service} is not a local service")
        log.info("service %s: scaling to %d replicas", service, desired)
        self._desired[service] = desired
        self._reconcile(service)

    def replicas(self, service: str) -> list[LocalReplica]:
        return list(self._replicas.get(service, []))

    def start_status(self, service: str) -> dict[str, int | float]:
        """Replicas starting, failures in a row and the backoff before the next restart."""
        starting = sum(1 for r in self._replicas.get(service, []) if r.state is State.STARTING)
        out: dict[str, int | float] = {"starting": starting,
                                       "startFailures": self._failures.get(service, 0)}
        retry_at = self._retry_at.get(service)
        if retry_at is not None:
            left = retry_at - asyncio.get_running_loop().time()
            if left > 0:
                out["retryInSeconds"] = round(left, 1)
        return out

    # ---- reconciliation ---------------------------------------------------------------------

    def _alive(self, service: str) -> list[LocalReplica]:
        return [r for r in self._replicas.get(service, [])
                if r.state in (State.STARTING, State.READY)]

    def _reconcile(self, service: str) -> None:
        if self._closing:
            return
        alive = self._alive(service)
        want = self._desired.get(service, 0)
        for _ in range(want - len(alive)):
            self._start(service)
        if len(alive) > want:
            # Remove replicas still starting first, then the least busy.
            alive.sort(key=lambda r: (r.state is State.READY,
                                      r.replica.in_flight if r.replica else 0))
            for rep in alive[: len(alive) - want]:
                rep.state = State.STOPPING
                rep.tasks.append(self._supervisor.spawn(
                    self._stop(rep), name=f"stop {service}:{rep.port}", finishable=True))

    def _start(self, service: str) -> None:
        rep = LocalReplica(service)
        self._replicas[service].append(rep)
        rep.task = self._supervisor.spawn(
            self._run(rep), name=f"replica {service}", finishable=True)

    # ---- one replica's life ---------------------------------------------------------------------

    async def _run(self, rep: LocalReplica) -> None:
        cfg = self._configs[rep.service]
        loop = asyncio.get_running_loop()
        live: asyncio.Task[None] | None = None
        ready: asyncio.Future[None] | None = None
        try:
            delay = self._restart_delay(rep.service)
            if delay:
                self._retry_at[rep.service] = loop.time() + delay
                await asyncio.sleep(delay)
            async with self._starts:
                if _scaled_away(rep):
                    return  # while waiting for its turn
                await self._spawn(rep, cfg)
                live = asyncio.ensure_future(self._liveness(rep, cfg, loop.time()))
                ready = asyncio.ensure_future(self._until_ready(rep, cfg, live))
                await asyncio.wait({ready}, timeout=START_SLOT_MAX_S)
                if not ready.done():
                    log.warning("service %s: replica on port %d not ready after %.0f s; "
                                "the next start does not wait for it", rep.service, rep.port,
                                START_SLOT_MAX_S)
            await ready  # probed on outside the slot, until ready or liveness gives up
            if _scaled_away(rep):
                return  # while starting
            svc = self._services[rep.service]
            rep.replica = svc.add_replica(f"127.0.0.1:{rep.port}")
            rep.state = State.READY
            self._failures[rep.service] = 0
            self._retry_at.pop(rep.service, None)
            log.info("service %s: replica on port %d is ready", rep.service, rep.port)
            await live
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("service %s: replica on port %d failed: %s", rep.service, rep.port, e)
        finally:
            for task in (ready, live):
                if task is not None:
                    task.cancel()
        if rep.state in (State.STARTING, State.READY):
            self._failures[rep.service] = self._failures.get(rep.service, 0) + 1
            rep.state = State.DEAD
            await self._terminate(rep, drain=False)
            self._forget(rep)
            self._reconcile(rep.service)  # start a replacement

    def _restart_delay(self, service: str) -> float:
        n = self._failures.get(service, 0)
        return 0.0 if n == 0 else min(RESTART_MIN_S * 2 ** (n - 1), RESTART_MAX_S)

    async def _spawn(self, rep: LocalReplica, cfg: ServiceConfig) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "WORKER_COUNT": str(cfg.replica_max_concurrent_requests),
               **cfg.environment_variables}
        if cfg.model_dir is not None:
            env["AZUREML_MODEL_DIR"] = str(self._base_dir / cfg.model_dir)  # absolute stays
        if cfg.replica_server == "azureml":
            env.setdefault("AML_APP_ROOT", str(self._base_dir))  # on azmlinfsrv's sys.path
        argv, fixed_port = self.replica_argv(cfg)
        rep.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        rep.port_found = asyncio.get_running_loop().create_future()
        if fixed_port is not None:
            rep.port_found.set_result(fixed_port)
            rep.port = fixed_port
        rep.tasks.append(self._supervisor.spawn(
            self._pump(rep, rep.port_found), name=f"output {rep.service}", finishable=True))

    async def _pump(self, rep: LocalReplica, port_found: asyncio.Future[int]) -> None:
        """Relay the replica's output to our log (and keep its pipe from filling up)."""
        assert rep.proc is not None and rep.proc.stdout is not None
        child_log = logging.getLogger(f"replica.{rep.service}")
        async for line in rep.proc.stdout:
            if not port_found.done():
                m = _LISTENING.search(line)
                if m:
                    port_found.set_result(int(m.group(1)))
                    rep.port = int(m.group(1))
            child_log.info("%s", line.rstrip().decode(errors="replace"))

    async def _until_ready(self, rep: LocalReplica, cfg: ServiceConfig,
                           live: asyncio.Task[None]) -> None:
        """Readiness: `success_threshold` probes in a row, every STARTUP_PROBE_S once the
        replica listens. Raises when liveness gives up (or the process exits) first."""
        assert rep.port_found is not None
        successes = 0
        while True:
            if live.done():
                live.result()  # raises why the replica is not alive
                raise RuntimeError("exited before it was ready")
            if rep.port_found.done():
                ok = await probe_http("127.0.0.1", rep.port, timeout_s=cfg.timeout_seconds)
                successes = successes + 1 if ok else 0
                if successes >= cfg.success_threshold:
                    return
                await asyncio.wait({live}, timeout=STARTUP_PROBE_S)
            else:
                either: set[asyncio.Future[Any]] = {live, rep.port_found}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)

    async def _liveness(self, rep: LocalReplica, cfg: ServiceConfig, started: float) -> None:
        """Kubernetes' liveness probe: from `initial_delay_seconds` after the start, every
        `period_seconds`; returns (raising why) when the process exits or `failure_threshold`
        probes in a row failed. A replica not listening yet fails its probes."""
        assert rep.proc is not None
        loop = asyncio.get_running_loop()
        failures = 0
        next_probe = started + cfg.initial_delay_seconds
        exited = asyncio.ensure_future(rep.proc.wait())
        try:
            while True:
                done, _ = await asyncio.wait({exited}, timeout=max(0.0, next_probe - loop.time()))
                if done:
                    raise RuntimeError(f"exited with {rep.proc.returncode}")
                next_probe += cfg.period_seconds
                ok = rep.port != 0 and await probe_http(
                    "127.0.0.1", rep.port, timeout_s=cfg.timeout_seconds)
                failures = 0 if ok else failures + 1
                if failures >= cfg.failure_threshold:
                    raise RuntimeError(f"failed {failures} liveness probes in a row")
        finally:
            exited.cancel()

    async def _stop(self, rep: LocalReplica) -> None:
        await self._terminate(rep, drain=True)
        self._forget(rep)

    async def _terminate(self, rep: LocalReplica, drain: bool) -> None:
        svc = self._services.get(rep.service)
        if rep.replica is not None and svc is not None:
            if drain:
                cfg = self._configs.get(rep.service)
                timeout = cfg.scoring_timeout_ms / 1000 if cfg else STOP_GRACE_S
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await svc.drain_replica(rep.replica)
            else:
                svc.remove_replica(rep.replica)
        if rep.task is not None and rep.task is not asyncio.current_task():
            rep.task.cancel()
        proc = rep.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE_S):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        log.info("service %s: replica on port %d stopped", rep.service, rep.port)

    def _forget(self, rep: LocalReplica) -> None:
        reps = self._replicas.get(rep.service, [])
        if rep in reps:
            reps.remove(rep)

    async def close(self) -> None:
        """Stop every replica (the router has drained by now)."""
        self._closing = True
        reps = [r for rs in self._replicas.values() for r in rs]
        await asyncio.gather(*(self._terminate(r, drain=False) for r in reps),
                             return_exceptions=True)
        for r in reps:
            for t in [r.task, *r.tasks]:
                if t is not None and t is not asyncio.current_task():
                    t.cancel()
        tasks = [t for r in reps for t in [r.task, *r.tasks] if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._replicas.clear()
