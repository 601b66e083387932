"""Worker processes: several router processes serving one scoring port (SO_REUSEPORT).

The supervisor (`mlfe serve` with `router.workers` > 1) keeps the control plane — admin API,
local replicas, autoscaler, and the slot broker — and runs `mlfe worker` children that serve
the scoring path. Each worker joins the broker over a unix socket in the state dir, so the
per-replica cap holds across them (router/coordination.py); the supervisor pushes replica sets
and "reload" (keys or endpoints changed) to them, and an admin change returns once every live
worker confirmed it (router/slots.py). A worker that dies is restarted; on SIGTERM
every worker drains (turns unready, finishes its accepted requests) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop

from deploy.cgroup import CGROUP_CPU_MAX, available_cores
from deploy.lifecycle import ProcessLife
from deploy.local_target import _die_with_parent
from deploy.startup import load_for_serving, settle_heap
from mlfe.config import MlfeConfig
from mlfe.supervise import Supervisor
from router.server import Membership, Router

log = logging.getLogger(__name__)

RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0


def resolve_workers(workers: int | str, *, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """A ``router.workers`` value as a count: ``auto`` is the cores the container may use
    (its cgroup CPU quota, capped by the CPUs it may run on)."""
    return available_cores(cpu_max) if workers == "auto" else int(workers)


def supervisor_mode(cfg: MlfeConfig) -> bool:
    """Worker processes: asked for, or the self-scaler may add them."""
    scaling = cfg.router.self_scaling
    may_grow = cfg.router.cluster_purpose != "DevTest" and resolve_workers(scaling.max_workers) > 1
    return resolve_workers(cfg.router.workers) > 1 or may_grow


def broker_address(cfg: MlfeConfig) -> str:
    return f"unix:{(cfg.router.state_dir / 'slots.sock').resolve()}"


class WorkerPool:
    def __init__(self, config_path: Path, count: int, broker: str, supervisor: Supervisor
                 ) -> None:
        self._supervisor = supervisor
        self._config_path = config_path
        self._broker = broker
        self._count = count
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.returncode is None]

    async def start(self) -> None:
        for i in range(self._count):
            self._tasks.append(
                self._supervisor.spawn(self._keep(i), name=f"worker {i}", finishable=True))

    @property
    def count(self) -> int:
        return self._count

    def cpu_seconds(self) -> float:
        """CPU time the live workers used (user + system), from /proc."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    async def set_workers(self, count: int) -> None:
        """More or fewer workers (the router self-scaler's actuator)."""
        for i in range(self._count, count):
            self._tasks.append(
                self._supervisor.spawn(self._keep(i), name=f"worker {i}", finishable=True))
        for i in range(count, self._count):
            proc = self._procs.get(i)
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)  # it drains; _keep sees i >= count
        self._count = count

    async def _keep(self, i: int) -> None:
        """Run worker `i`, restarting it when it dies (with backoff), until stopped."""
        delay = RESTART_MIN_S
        while not self._stopping and i < self._count:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "deploy.cli", "worker", "--config", str(self._config_path),
                "--broker", self._broker, "--member", f"worker-{i}",
                start_new_session=True, preexec_fn=_die_with_parent,
            )
            self._procs[i] = proc
            started = asyncio.get_running_loop().time()
            code = await proc.wait()
            if self._stopping or i >= self._count:
                return
            log.warning("worker %d exited with %s; restarting", i, code)
            if asyncio.get_running_loop().time() - started > 30:
                delay = RESTART_MIN_S  # it had been running fine: not a crash loop
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    async def stop(self, drain_timeout_s: float) -> None:
        self._stopping = True
        procs = [p for p in self._procs.values() if p.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(drain_timeout_s + 5):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _worker(cfg: MlfeConfig, broker: str, member_id: str) -> int:
    """One worker process: serve the scoring port (shared through SO_REUSEPORT) as a member of
    the supervisor's slot broker, until SIGTERM (drain, 0) or a supervised task dies (1)."""
    life = ProcessLife()
    router = Router(cfg, asyncio.get_running_loop(), supervisor=life.supervisor,
                    membership=Membership(broker, member_id, follows_supervisor=True),
                    reuse_port=True, data_file_prefix=f"data-{member_id}")
    try:
        await router.start()
        settle_heap()
        await life.wait()
    finally:
        await router.drain(cfg.router.drain_timeout_s)
        if router.member is not None:
            router.member.send_metrics()  # the last counts reach the supervisor first
        await router.close()
        await life.supervisor.stop()
    return life.exit_code


def run_worker(config_path: str, broker: str, member_id: str, log_level: str = "INFO") -> int:
    cfg = load_for_serving(config_path, log_level, "mlfe worker")
    if cfg is None:
        return 2
    return uvloop.run(_worker(cfg, broker, member_id))
