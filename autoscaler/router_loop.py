"""The router's self-scaler's loop: every period, sample the router (:class:`DeltaProbe`),
decide (:func:`autoscaler.router_decider.decide`) and set workers and pods through the
actuators. Ticks come from :func:`autoscaler.ticker.tick_every`: ``now`` is the scheduled time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from autoscaler.router_decider import (
    RouterDecision,
    RouterSample,
    RouterScalerState,
    RouterScalingSpec,
    decide,
)
from autoscaler.ticker import tick_every
from mlfe.clock import Clock, MonotonicClock
from mlfe.supervise import Supervisor, TaskFailure

log = logging.getLogger(__name__)


class RouterProbe(Protocol):
    def sample(self, now: float) -> RouterSample | None:
        """The period that ends at ``now`` (the loop's clock), or None when there is nothing
        to report yet (the first call only takes a baseline). In-process; must not block."""
        ...


class WorkerActuator(Protocol):
    async def set_workers(self, n: int) -> None:
        """Run ``n`` router workers. Idempotent: the loop may ask for the same count again
        (it retries each period while the count it asked for is not the sample's)."""
        ...


class PodActuator(Protocol):
    def may_scale(self) -> bool:
        """Whether this pod sets the router Deployment's replicas now (the leader's job)."""
        ...

    async def set_pods(self, n: int) -> None:
        """Set the router Deployment's replicas to ``n``. Idempotent, like set_workers."""
        ...


class DeploymentActuator(Protocol):
    """The replica autoscaler's actuator (autoscaler.loop.Actuator; deploy.kube.scaler)."""

    def current(self, service: str) -> int: ...

    async def scale(self, service: str, desired: int) -> None: ...


class DeploymentPods:
    """A :class:`PodActuator` over the replica autoscaler's Kubernetes actuator, with the
    router's own Deployment registered in it under ``name``."""

    def __init__(
        self,
        actuator: DeploymentActuator,
        name: str,
        *,
        may_scale: Callable[[], bool] = lambda: True,
    ) -> None:
        self._actuator = actuator
        self._name = name
        self._may_scale = may_scale

    def current(self) -> int:
        """The Deployment's replicas as the actuator last observed or set them."""
        return self._actuator.current(self._name)

    def may_scale(self) -> bool:
        return self._may_scale()

    async def set_pods(self, n: int) -> None:
        await self._actuator.scale(self._name, n)


class DeltaProbe:
    """A :class:`RouterProbe` from cumulative counters, read once per period.

    ``routing`` returns the routing-time histogram's (sum of seconds, count) over all services
    and workers; ``cpu_seconds`` the CPU time all workers used so far (the worker processes',
    or ``deploy.cgroup.cpu_seconds_source``); ``workers`` and ``pods`` the counts asked for now.
    Counters that go backwards (a service removed) count as a period without requests.
    """

    def __init__(
        self,
        *,
        routing: Callable[[], tuple[float, int]],
        cpu_seconds: Callable[[], float],
        workers: Callable[[], int],
        pods: Callable[[], int] = lambda: 1,
    ) -> None:
        self._routing = routing
        self._cpu_seconds = cpu_seconds
        self._workers = workers
        self._pods = pods
        self._last: tuple[float, float, int, float] | None = None  # at, sum, count, cpu

    def sample(self, now: float) -> RouterSample | None:
        routing_sum, count = self._routing()
        cpu = self._cpu_seconds()
        workers, pods = self._workers(), self._pods()
        last, self._last = self._last, (now, routing_sum, count, cpu)
        if last is None or now <= last[0]:
            return None
        at, last_sum, last_count, last_cpu = last
        requests, spent = count - last_count, routing_sum - last_sum
        if requests < 0 or spent < 0:
            requests, spent = 0, 0.0
        return RouterSample(
            at=now,
            routing_time_s=spent / requests if requests else 0.0,
            requests=requests,
            cpu_fraction=max(cpu - last_cpu, 0.0) / ((now - at) * workers),
            workers=workers,
            pods=pods,
        )


@dataclass(frozen=True, slots=True)
class RouterStatus:
    """The last tick, for metrics and ``GET /v1/stats``."""

    at: float
    sample: RouterSample
    decision: RouterDecision


class RouterScaler:
    """Every ``spec.period_s``: sample the router, decide, and set workers and pods.

    Pods are managed only when the spec allows more than one, there is a pod actuator, and it
    says this pod may scale (the leader); otherwise the pods count is left as it is. Nothing a
    tick does ends the loop: a failed sample skips the tick, a failed set is logged and asked
    again next period (the decision repeats its target during the cooldown).
    """

    def __init__(
        self,
        *,
        spec: RouterScalingSpec,
        probe: RouterProbe,
        workers: WorkerActuator,
        pods: PodActuator | None = None,
        clock: Clock | None = None,
        on_failure: Callable[[TaskFailure], None] | None = None,
        supervisor: Supervisor | None = None,
        stop_grace_s: float = 5.0,
    ) -> None:
        self._probe = probe
        self._workers = workers
        self._pods = pods
        self._clock = clock or MonotonicClock()
        self._stop_grace_s = stop_grace_s
        # The process's one supervisor when given (mlfe serve); on_failure only hears of bugs in
        # the loop itself: tick errors are handled in place.
        self._supervisor = supervisor or Supervisor(on_failure=on_failure, clock=self._clock)
        self._task: asyncio.Task[None] | None = None
        self._state = RouterScalerState()
        self._status: RouterStatus | None = None
        self._running = False
        self._tick_failing = False  # in an episode of failed ticks (warned once)
        self.set_spec(spec)

    @property
    def spec(self) -> RouterScalingSpec:
        return self._spec

    def set_spec(self, spec: RouterScalingSpec) -> None:
        """Use ``spec`` from the next tick on (config reload)."""
        if spec.manages_pods and self._pods is None:
            log.warning("Router pods may scale to %d, but there is no pod actuator", spec.max_pods)
        self._spec = spec

    def status(self) -> RouterStatus | None:
        return self._status

    def start(self) -> None:
        """Start ticking; needs a running event loop."""
        if self._running:
            raise RuntimeError("router scaler already started")
        self._running = True
        self._task = self._supervisor.spawn(self._run(), name="router-scaler")

    async def stop(self) -> None:
        """Cancel the loop, waiting at most ``stop_grace_s`` seconds."""
        self._running = False
        if self._task is not None:
            await self._supervisor.stop_tasks([self._task], grace_s=self._stop_grace_s)

    async def _run(self) -> None:
        await tick_every(self._clock, lambda: self._spec.period_s, self._tick)

    async def _tick(self, now: float) -> None:
        spec = self._spec
        pods = self._pods
        try:
            manage_pods = spec.manages_pods and pods is not None and pods.may_scale()
            if not manage_pods:
                spec = dataclasses.replace(spec, min_pods=1, max_pods=1)
            sample = self._probe.sample(now)
            if sample is None:
                return
            decision, state = decide(spec, sample, state=self._state, now=now)
        except Exception as e:
            # One concise warning per episode (a rotated token fails every tick), the details
            # at DEBUG.
            if not self._tick_failing:
                log.warning("Router scaler skipped a tick: %s: %s (said once until a tick "
                            "works again)", type(e).__name__, e)
            log.debug("Router scaler skipped a tick", exc_info=True)
            self._tick_failing = True
            return
        self._tick_failing = False
        self._state = state
        self._status = RouterStatus(now, sample, decision)
        if decision.workers != sample.workers:
            log.info(
                "Router workers %d -> %d (%s; routing %.2f ms over %d requests, CPU %.0f%%)",
                sample.workers,
                decision.workers,
                decision.reason,
                sample.routing_time_s * 1000,
                sample.requests,
                sample.cpu_fraction * 100,
            )
            try:
                await self._workers.set_workers(decision.workers)
            except Exception:
                log.warning(
                    "Setting %d router workers failed; retrying next period",
                    decision.workers,
                    exc_info=True,
                )
        if manage_pods and decision.pods != sample.pods:
            assert pods is not None
            log.info(
                "Router pods %d -> %d (%s; routing %.2f ms over %d requests, CPU %.0f%%)",
                sample.pods,
                decision.pods,
                decision.reason,
                sample.routing_time_s * 1000,
                sample.requests,
                sample.cpu_fraction * 100,
            )
            try:
                await pods.set_pods(decision.pods)
            except Exception:
                log.warning(
                    "Setting %d router pods failed; retrying next period",
                    decision.pods,
                    exc_info=True,
                )
