"""`mlfe serve` and `mlfe up`: the router, its admin API, the local replicas and the co-located
autoscaler, started in order and stopped in reverse.

Shutdown on SIGTERM or Ctrl-C: the router turns unready and drains (accepted and queued requests
finish), the autoscaler stops, the local replicas stop, the admin API closes; exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

from autoscaler.decider import Counts, ScalingSpec
from autoscaler.loop import AutoscalerLoop
from autoscaler.router_decider import RouterScalingSpec
from autoscaler.router_loop import DeltaProbe, DeploymentPods, RouterScaler, WorkerActuator
from deploy.cgroup import PROC_SELF_CGROUP, cpu_seconds_source
from deploy.cluster import Cluster, uses_kubernetes
from deploy.local_target import LocalTarget, is_local
from deploy.startup import load_for_serving, settle_heap
from deploy.workers import WorkerPool, broker_address, resolve_workers, supervisor_mode
from mlfe.clock import MonotonicClock
from mlfe.config import ConfigError, MlfeConfig, ServiceConfig
from router.admin import AdminApi, admin_token
from router.server import Router
from router.slots import DEFAULT_GRACE_S, BrokerServer, SlotMember

log = logging.getLogger(__name__)


def scaling_spec(cfg: ServiceConfig) -> ScalingSpec:
    return ScalingSpec(
        min_replicas=cfg.autoscale_min_replicas,
        max_replicas=cfg.autoscale_max_replicas,
        target_utilization=cfg.autoscale_target_utilization,
        replica_max_concurrent_requests=cfg.replica_max_concurrent_requests,
        refresh_seconds=cfg.autoscale_refresh_seconds,
        scale_down_window_s=cfg.autoscale_scale_down_window_seconds,
        autoscale_enabled=cfg.autoscaling,
        num_replicas=cfg.num_replicas,
    )


class RouterCounts:
    """The autoscaler's view of the router: an in-process read of each pool's counters."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def counts(self, service: str) -> Counts:
        pool = self._router.services[service].pool
        return Counts(busy=pool.busy, queued=pool.queued, replicas=pool.ready)


class BrokerCounts:
    """With worker processes the requests are in the workers: read what they report."""

    def __init__(self, router: Router, broker: BrokerServer) -> None:
        self._router = router
        self._broker = broker

    def counts(self, service: str) -> Counts:
        totals = self._broker.totals(service)
        return Counts(busy=totals["busy"], queued=totals["queued"],
                      replicas=self._router.services[service].pool.ready)


class OneWorker:
    """The worker actuator of a router that runs as one process (it scales by pods only)."""

    async def set_workers(self, n: int) -> None:
        if n != 1:
            log.warning("router self-scaler asked for %d workers; this router runs one", n)


class Runtime:
    """The composition root. Three shapes, by config:
    - one process: router, admin API, local replicas, autoscaler (the default);
    - `router.workers` > 1: this process supervises worker processes that serve the scoring
      port, and runs the slot broker they share replicas through (deploy/workers.py);
    - `router.coordination`: one of several router instances sharing replicas (pods)."""

    def __init__(self, cfg: MlfeConfig, base_dir: Path, config_path: Path | None = None) -> None:
        self.cfg = cfg
        loop = asyncio.get_running_loop()
        workers = resolve_workers(cfg.router.workers)
        supervise = supervisor_mode(cfg)
        self.workers: WorkerPool | None = None
        self.self_scaler: RouterScaler | None = None
        self.broker: BrokerServer | None = None
        self.member: SlotMember | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.router = Router(cfg, loop, coordinated=supervise)
        coord = cfg.router.coordination
        if supervise:
            assert config_path is not None
            self.broker = BrokerServer(coord.grace_seconds if coord else DEFAULT_GRACE_S)
            self.workers = WorkerPool(config_path, workers, broker_address(cfg))
        elif coord is not None:
            if coord.listen is not None:
                self.broker = BrokerServer(coord.grace_seconds)
            self.member = SlotMember(
                self.router, coord.broker_address,
                coord.member_id or f"{socket.gethostname()}-{os.getpid()}")
            self.router.slot_member = self.member
        self.admin = AdminApi(self.router, admin_token(cfg.router.state_dir))
        self.target = LocalTarget(self.router.services, base_dir)
        counts: RouterCounts | BrokerCounts = RouterCounts(self.router)
        if self.workers is not None and self.broker is not None:
            counts = BrokerCounts(self.router, self.broker)
        self.autoscaler = AutoscalerLoop(counts=counts, actuator=self.target,
                                         clock=MonotonicClock())
        self.router.scaling_status = self._scaling_status
        self.cluster: Cluster | None = None
        if uses_kubernetes(cfg):
            self.cluster = Cluster(cfg, self.router, counts, admin_token(cfg.router.state_dir))

    def _build_self_scaler(self, pods: DeploymentPods | None) -> RouterScaler | None:
        """The router's self-scaler (off with cluster_purpose DevTest): worker processes when
        this process supervises them, pods when it runs in a cluster with max_pods > 1."""
        s = self.cfg.router.self_scaling
        if self.cfg.router.cluster_purpose == "DevTest":
            return None
        workers = self.workers
        broker = self.broker
        if workers is not None and broker is not None:
            max_workers = max(resolve_workers(s.max_workers), workers.count)

            def routing() -> tuple[float, int]:
                hists = [broker.metrics(name).routing for name in self.router.services]
                return sum(h.sum for h in hists), sum(h.count for h in hists)

            cpu: Callable[[], float] = workers.cpu_seconds
            count: Callable[[], int] = lambda: workers.count  # noqa: E731
            actuator: WorkerActuator = workers
        else:
            max_workers = 1

            def routing() -> tuple[float, int]:
                hists = [svc.metrics.routing for svc in self.router.services.values()]
                return sum(h.sum for h in hists), sum(h.count for h in hists)

            # The container's cgroup when the router has one to itself, else this process's.
            cpu = cpu_seconds_source(proc_cgroup=PROC_SELF_CGROUP)
            count, actuator = (lambda: 1), OneWorker()
        if max_workers <= 1 and pods is None:
            return None
        spec = RouterScalingSpec(
            max_workers=max_workers, max_pods=s.max_pods if pods else 1,
            routing_time_up_s=s.routing_time_up_ms / 1000,
            up_window_s=s.up_window_seconds, cpu_down_threshold=s.cpu_down_threshold,
            down_window_s=s.down_window_seconds, cooldown_s=s.cooldown_seconds,
            period_s=s.period_seconds)
        probe = DeltaProbe(routing=routing, cpu_seconds=cpu, workers=count,
                           pods=pods.current if pods else (lambda: 1))
        return RouterScaler(spec=spec, probe=probe, workers=actuator, pods=pods)

    def _scaling_status(self, name: str) -> dict[str, Any]:
        loop = self.autoscaler
        if self.cluster is not None and self.cluster.autoscaler is not None and (
                self.cfg.services[name].kubernetes is not None):
            loop = self.cluster.autoscaler
        st = loop.status().get(name)
        if st is None:
            return {}
        util = st.utilization
        return {"desired": st.desired, "current": st.current,
                "decidedUtilization": util if util != float("inf") else None}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.broker is not None:
            coord = self.cfg.router.coordination
            address = broker_address(self.cfg) if self.workers else (
                coord.listen if coord and coord.listen else "")
            await self.broker.start(address)
        await self.router.start(listen=self.workers is None)
        if self.workers is not None and self.broker is not None:
            self._supervise_workers(self.broker)
            await self.workers.start()
        if self.member is not None:
            self._tasks.append(loop.create_task(self.member.run(), name="slot member"))
        pods = None
        if self.cluster is not None:
            await self.cluster.start()
            if self.cfg.router.self_scaling.max_pods > 1:
                pods = self.cluster.router_pods()
        self.self_scaler = self._build_self_scaler(pods)
        if self.self_scaler is not None:
            self.self_scaler.start()
        await self.admin.start(*self.cfg.router.admin_addr)
        self.target.configure(self.router.services, self.cfg.services)
        self.autoscaler.set_services(
            {n: scaling_spec(c) for n, c in self.cfg.services.items() if is_local(c)}
        )
        self.autoscaler.start()

    def _supervise_workers(self, broker: BrokerServer) -> None:
        """The supervisor's services hold the replica sets; the workers get them pushed."""
        for name, svc in self.router.services.items():
            svc.remote_drained = lambda addr, name=name: broker.wait_drained(name, addr)
            svc.on_replicas_changed = lambda s: broker.push_replicas(
                s.name, [r.addr for r in s.pool.replicas])
            broker.push_replicas(name, [r.addr for r in svc.pool.replicas])
        self.router.on_change = broker.push_reload

        def counts(name: str) -> tuple[int, int]:
            totals = broker.totals(name)
            return totals["busy"], totals["queued"]

        self.router.counts_of = counts
        self.router.metrics_of = lambda svc: broker.metrics(svc.name)

    async def stop(self) -> None:
        log.info("draining (up to %.0f s)", self.cfg.router.drain_timeout_s)
        if self.self_scaler is not None:
            await self.self_scaler.stop()
        if self.workers is not None:
            self.router.handler.draining = True
            await self.workers.stop(self.cfg.router.drain_timeout_s)
        else:
            clean = await self.router.drain(self.cfg.router.drain_timeout_s)
            if not clean:
                log.warning("drain timeout: connections were cut off")
        await self.autoscaler.stop()
        if self.cluster is not None:
            await self.cluster.close()
        await self.target.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.router.close()
        await self.admin.close()
        if self.broker is not None:
            await self.broker.close()


async def wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(cfg: MlfeConfig, base_dir: Path, friendly: bool = False,
                config_path: Path | None = None) -> int:
    rt = Runtime(cfg, base_dir, config_path)
    await rt.start()
    settle_heap()
    print(f"mlfe: scoring on {rt.router.base_url}, admin on "
          f"http://{cfg.router.admin_addr[0]}:{rt.admin.port}", flush=True)
    status_task = None
    if friendly:
        from deploy.up import print_welcome, status_line_loop

        print_welcome(rt)
        status_task = asyncio.create_task(status_line_loop(rt), name="status line")
    try:
        await wait_for_signal()
    finally:
        if status_task is not None:
            status_task.cancel()
        await rt.stop()
    return 0


def run(config_path: str | Path, log_level: str = "INFO", friendly: bool = False) -> int:
    cfg = load_for_serving(config_path, log_level)
    if cfg is None:
        return 2
    # Relative paths in a config (entry scripts, model dirs) are relative to the config file.
    base_dir = Path(config_path).resolve().parent
    try:
        return uvloop.run(serve(cfg, base_dir, friendly, Path(config_path).resolve()))
    except ConfigError as e:  # found only at start (e.g. no Kubernetes API to talk to)
        print(f"mlfe: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mlfe: cannot listen: {e.strerror}", file=sys.stderr)
        return 1
