"""`mlfe serve` and `mlfe up`: the router, its admin API, the local replicas and the co-located
autoscaler, started in order and stopped in reverse.

Shutdown on SIGTERM or Ctrl-C: the router turns unready and drains (accepted and queued requests
finish), the autoscaler stops, the local replicas stop, the admin API closes; exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from autoscaler.loop import AutoscalerLoop
from autoscaler.router_decider import RouterScalingSpec
from autoscaler.router_loop import DeltaProbe, DeploymentPods, RouterScaler, WorkerActuator
from deploy import logs
from deploy.bundled import (
    EXAMPLES_EXTRA_HINT,
    bundled_config,
    missing_example_modules,
)
from deploy.cgroup import PROC_SELF_CGROUP, cpu_seconds_source
from deploy.cluster import Cluster, connect_state, uses_kubernetes
from deploy.lifecycle import ProcessLife
from deploy.local_target import LocalTarget, check_replica_servers, is_local
from deploy.scaling import scaling_spec
from deploy.startup import load_for_serving, settle_heap
from deploy.up import print_welcome, status_line_loop
from deploy.workers import WorkerPool, broker_address, resolve_workers, supervisor_mode
from mlfe.clock import MonotonicClock
from mlfe.config import ConfigError, MlfeConfig, inert_settings
from router.admin import AdminApi, MetricsApi, admin_token
from router.metrics import RouterProcessCollector
from router.server import Membership, Router
from router.slots import DEFAULT_GRACE_S, BrokerServer

if TYPE_CHECKING:
    from deploy.kube.state import KubeStateStore

log = logging.getLogger(__name__)


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

    def __init__(self, cfg: MlfeConfig, base_dir: Path, life: ProcessLife,
                 config_path: Path | None = None, state: KubeStateStore | None = None) -> None:
        self.cfg = cfg
        self.state = state
        loop = asyncio.get_running_loop()
        self.supervisor = life.supervisor
        workers = resolve_workers(cfg.router.workers)
        supervise = supervisor_mode(cfg)
        self.workers: WorkerPool | None = None
        self.self_scaler: RouterScaler | None = None
        self.broker: BrokerServer | None = None
        coord = cfg.router.coordination
        membership: Membership | None = None
        # In a cluster the slot broker runs on the Lease holder, found through the Lease
        # (deploy/kube/broker.py), unless a fixed broker is configured.
        self._broker_listen: str | None = None
        if uses_kubernetes(cfg) and not supervise and (coord is None or coord.broker is None):
            from deploy.kube.broker import BROKER_PORT, HOLD_S

            self._broker_listen = coord.listen if coord and coord.listen else (
                f"0.0.0.0:{BROKER_PORT}")
            member_id = (coord.member_id if coord else None) or os.environ.get("POD_NAME") or (
                f"{socket.gethostname()}-{os.getpid()}")
            membership = Membership("", member_id, hold_s=HOLD_S)
        elif supervise:
            assert config_path is not None
            self.broker = BrokerServer(coord.grace_seconds if coord else DEFAULT_GRACE_S)
            self.workers = WorkerPool(config_path, workers, broker_address(cfg), self.supervisor)
        elif coord is not None:
            if coord.listen is not None:
                self.broker = BrokerServer(coord.grace_seconds)
            membership = Membership(coord.broker_address,
                                    coord.member_id or f"{socket.gethostname()}-{os.getpid()}")
        self.router = Router(cfg, loop, supervisor=self.supervisor,
                             workers=self.broker if supervise else None,
                             membership=membership, scaling=self._scaling_status, state=state)
        if self._broker_listen is not None:
            # A pod holds no slots before it has joined the Lease holder's broker: not ready
            # until then (afterwards it keeps its slots through a broker's absence).
            member = self.router.member
            self.router.handler.ready_check = lambda: member is None or member.joined
        self.admin = AdminApi(self.router, admin_token(cfg.router.state_dir))
        self.metrics_api = MetricsApi(self.router.metrics) if cfg.router.metrics_listen else None
        self.router.metrics.register(RouterProcessCollector(
            workers=self._worker_count, cpu_seconds=self._cpu_seconds,
            desired_workers=self._desired_workers))
        self.target = LocalTarget(self.router.services, base_dir, self.supervisor)
        self.autoscaler = AutoscalerLoop(counts=self.router, actuator=self.target,
                                         clock=MonotonicClock(), supervisor=self.supervisor)
        self.cluster: Cluster | None = None
        if uses_kubernetes(cfg):
            self.cluster = Cluster(cfg, self.router, self.router,
                                   admin_token(cfg.router.state_dir), self.supervisor,
                                   api=state.api if state is not None else None,
                                   broker_listen=self._broker_listen)

    def _build_self_scaler(self, pods: DeploymentPods | None) -> RouterScaler | None:
        """The router's self-scaler (off with cluster_purpose DevTest): worker processes when
        this process supervises them, pods when it runs in a cluster with max_pods > 1."""
        s = self.cfg.router.self_scaling
        if self.cfg.router.cluster_purpose == "DevTest":
            return None
        workers = self.workers
        router = self.router

        def routing() -> tuple[float, int]:
            # The router's counters: its own, or its workers' sums (Router.service_metrics).
            hists = [router.service_metrics(name).routing for name in router.services]
            return sum(h.sum for h in hists), sum(h.count for h in hists)

        if workers is not None:
            max_workers = max(resolve_workers(s.max_workers), workers.count)
            cpu: Callable[[], float] = workers.cpu_seconds
            count: Callable[[], int] = lambda: workers.count  # noqa: E731
            actuator: WorkerActuator = workers
        else:
            max_workers = 1
            # The container's cgroup when the router has one to itself, else this process's.
            cpu = cpu_seconds_source(proc_cgroup=PROC_SELF_CGROUP)
            count, actuator = (lambda: 1), OneWorker()
        if max_workers <= 1 and pods is None:
            return None
        spec = RouterScalingSpec(
            max_workers=max_workers, max_pods=s.max_pods if pods else 1,
            min_pods=s.min_pods if pods else 1, pod_cooldown_s=s.pod_cooldown_seconds,
            routing_time_up_s=s.routing_time_up_ms / 1000,
            up_window_s=s.up_window_seconds, cpu_down_threshold=s.cpu_down_threshold,
            down_window_s=s.down_window_seconds, cooldown_s=s.cooldown_seconds,
            period_s=s.period_seconds)
        probe = DeltaProbe(routing=routing, cpu_seconds=cpu, workers=count,
                           pods=pods.current if pods else (lambda: 1))
        return RouterScaler(spec=spec, probe=probe, workers=actuator, pods=pods,
                            supervisor=self.supervisor)

    def _worker_count(self) -> int:
        return self.workers.count if self.workers is not None else 1

    def _cpu_seconds(self) -> float:
        own = time.process_time()
        return own + self.workers.cpu_seconds() if self.workers is not None else own

    def _desired_workers(self) -> int | None:
        status = self.self_scaler.status() if self.self_scaler is not None else None
        return None if status is None else status.decision.workers

    def _scaling_status(self, name: str) -> dict[str, Any]:
        loop = self.autoscaler
        if self.cluster is not None and self.cluster.autoscaler is not None and (
                self.cfg.services[name].kubernetes is not None):
            loop = self.cluster.autoscaler
        out: dict[str, Any] = {}
        cfg = self.cfg.services.get(name)
        if cfg is not None and is_local(cfg):
            out.update(self.target.start_status(name))
        st = loop.status().get(name)
        if st is None:
            return out
        util = st.utilization
        out.update({"desired": st.desired, "current": st.current,
                    "decidedUtilization": util if util != float("inf") else None,
                    "scaledToZero": st.current == 0 and st.replicas == 0})
        if st.rate is not None:
            out["arrivalRate"] = round(st.rate, 3)
        if st.service_time is not None:
            out["serviceTimeMs"] = round(st.service_time * 1000, 3)
        return out

    def _state_changed(self) -> None:
        """Another router pod changed the shared state (now in the state dir): take it."""
        self.router.reload_state()
        if self.workers is not None and self.broker is not None:
            self.broker.push_reload()

    async def start(self) -> None:
        if self.state is not None:
            self.router.ensure_keys()  # stored in the shared state before this pod serves
            await self.state.start(self._state_changed)
        if self.broker is not None:
            coord = self.cfg.router.coordination
            address = broker_address(self.cfg) if self.workers else (
                coord.listen if coord and coord.listen else "")
            await self.broker.start(address)
        await self.router.start(listen=self.workers is None)
        if self.workers is not None and self.broker is not None:
            for name, svc in self.router.services.items():  # the workers' first replica sets
                self.broker.push_replicas(name, [r.addr for r in svc.pool.replicas])
            await self.workers.start()
        pods = None
        if self.cluster is not None:
            await self.cluster.start()
            if self.cfg.router.self_scaling.max_pods > 1:
                pods = self.cluster.router_pods()
        self.self_scaler = self._build_self_scaler(pods)
        if self.self_scaler is not None:
            self.self_scaler.start()
        await self.admin.start(*self.cfg.router.admin_addr)
        metrics_addr = self.cfg.router.metrics_addr
        if self.metrics_api is not None and metrics_addr is not None:
            await self.metrics_api.start(*metrics_addr)
        self.target.configure(self.router.services, self.cfg.services)
        self.autoscaler.set_services(
            {n: scaling_spec(c) for n, c in self.cfg.services.items() if is_local(c)}
        )
        self.autoscaler.start()

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
        if self.state is not None:
            await self.state.close()
        if self.cluster is not None:
            await self.cluster.close()
        await self.target.close()
        await self.router.close()
        await self.admin.close()
        if self.metrics_api is not None:
            await self.metrics_api.close()
        if self.broker is not None:
            await self.broker.close()


async def serve(cfg: MlfeConfig, base_dir: Path, friendly: bool = False,
                config_path: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT (0) or until a supervised task dies (1), then drain and stop."""
    life = ProcessLife()
    state = await connect_state(cfg, life.supervisor)
    rt = Runtime(cfg, base_dir, life, config_path, state)
    try:
        await rt.start()
        settle_heap()
        metrics = (f", metrics on http://{cfg.router.metrics_addr[0]}:{rt.metrics_api.port}"
                   "/metrics" if rt.metrics_api is not None and cfg.router.metrics_addr else "")
        print(f"mlfe: scoring on {rt.router.base_url}, admin on "
              f"http://{cfg.router.admin_addr[0]}:{rt.admin.port}{metrics}", flush=True)
        if friendly:
            print_welcome(rt.router)
            life.supervisor.spawn(status_line_loop(rt.router), name="status line")
        await life.wait()
    finally:
        await rt.stop()
        await life.supervisor.stop()
    return life.exit_code


def one_process_per_pod(cfg: MlfeConfig) -> MlfeConfig:
    """With `kubernetes:` services, one router process per pod: worker processes would share
    replicas through their supervisor's own broker, so the per-replica caps would hold per pod,
    not across the pods (the Lease holder's broker). The router scales by pods instead."""
    if not uses_kubernetes(cfg) or not supervisor_mode(cfg):
        return cfg
    log.warning("router.workers and self_scaling.max_workers are 1 with kubernetes services: "
                "one router process per pod, so that the per-replica caps hold across the "
                "pods; the router scales by pods (self_scaling.max_pods)")
    scaling = cfg.router.self_scaling.model_copy(update={"max_workers": 1})
    return cfg.model_copy(update={"router": cfg.router.model_copy(
        update={"workers": 1, "self_scaling": scaling})})


def run(config_path: str | Path | None, log_level: str = "INFO", friendly: bool = False,
        router_overrides: Mapping[str, str] | None = None) -> int:
    """Serve ``config_path``; with None (`mlfe up` alone), the bundled example from the package
    (deploy/bundled.py). ``router_overrides``: router keys given on the command line (listen
    addresses), already validated."""
    if config_path is None:
        loaded = _load_bundled(log_level)
    else:
        cfg = load_for_serving(config_path, log_level)
        loaded = None if cfg is None else (cfg, Path(config_path))
    if loaded is None:
        return 2
    cfg, path = loaded
    problem = check_replica_servers(cfg.services)
    if problem is not None:
        print(f"mlfe: {problem}", file=sys.stderr)
        return 2
    inert = inert_settings(cfg)
    if inert:  # accepted (azureml's deploy configuration), but nothing here acts on them
        log.warning("accepted, without effect in this run: %s (README: Coming from Azure ML)",
                    ", ".join(inert))
    cfg = one_process_per_pod(cfg)
    if router_overrides:
        if supervisor_mode(cfg):  # worker processes read the file itself
            print("mlfe: --listen, --admin-listen and --metrics-listen cannot be used with "
                  "router.workers or self_scaling.max_workers > 1: set them in the config file",
                  file=sys.stderr)
            return 2
        cfg = cfg.model_copy(
            update={"router": cfg.router.model_copy(update=dict(router_overrides))})
    # Relative paths in a config (entry scripts, model dirs) are relative to the config file.
    base_dir = path.resolve().parent
    try:
        return uvloop.run(serve(cfg, base_dir, friendly, path.resolve()))
    except ConfigError as e:  # found only at start (e.g. no Kubernetes API to talk to)
        print(f"mlfe: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mlfe: cannot listen: {e.strerror}", file=sys.stderr)
        return 1


def _load_bundled(log_level: str) -> tuple[MlfeConfig, Path] | None:
    """The bundled example, or None after saying why it cannot run here."""
    missing = missing_example_modules()
    if missing:
        print(f"mlfe: the bundled example model needs {', '.join(missing)} (not installed "
              f"here): {EXAMPLES_EXTRA_HINT}, or serve your own: mlfe up --config FILE",
              file=sys.stderr)
        return None
    logs.configure(log_level)
    try:
        cfg, path = bundled_config()
    except (ConfigError, OSError) as e:
        print(f"mlfe: cannot set up the bundled example: {e}", file=sys.stderr)
        return None
    logs.configure(log_level, cfg.router.log_format)
    print(f"mlfe: serving the bundled example {path}; state in {cfg.router.state_dir}",
          flush=True)
    return cfg, path
