"""Leader election on a ``coordination.k8s.io/v1`` Lease: with several router pods, exactly one
runs the replica autoscaler (and the router self-scaler).

The algorithm is client-go's. Every ``retry_period_s`` each candidate reads the Lease. The
holder renews it (``renewTime``); a candidate takes it over when it is free (no holder) or
expired, and writes it conditionally on the resourceVersion it read, so that of two candidates
racing for it exactly one wins (the other gets 409). Expiry is judged on the candidate's own
monotonic clock, never on the timestamps in the Lease (pods' wall clocks may disagree): a Lease
is expired when its record has not changed for ``leaseDurationSeconds`` since this candidate
first saw it in that state.

The leader considers itself leader only until ``renew_deadline_s`` after the start of its last
successful renewal, which is shorter than the lease duration: so it has stopped scaling before
anyone else may take over, even if its API calls hang. A leader that finds the Lease held by
someone else steps down at that read, so losing the lease stops its scaling within one
``retry_period_s``. All timing is on an injected :class:`~mlfe.clock.Clock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime

from deploy.kube.api import KubeApi, KubeError, Lease
from mlfe.clock import Clock, MonotonicClock
from mlfe.supervise import Supervisor

log = logging.getLogger(__name__)

LEASE_NAME = "mlfe-autoscaler"
LEASE_DURATION_S = 15.0
RENEW_DEADLINE_S = 10.0
RETRY_PERIOD_S = 2.0


def default_identity() -> str:
    """The pod's name (its hostname) plus a random suffix: unique even across restarts."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{host}_{uuid.uuid4().hex[:8]}"


def micro_time(dt: datetime) -> str:
    """A Kubernetes MicroTime: RFC 3339, UTC, microseconds."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _wall() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    def __init__(
        self,
        api: KubeApi,
        *,
        identity: str,
        namespace: str | None = None,
        name: str = LEASE_NAME,
        clock: Clock | None = None,
        supervisor: Supervisor | None = None,
        lease_duration_s: float = LEASE_DURATION_S,
        renew_deadline_s: float = RENEW_DEADLINE_S,
        retry_period_s: float = RETRY_PERIOD_S,
        wall: Callable[[], datetime] = _wall,
    ) -> None:
        if not retry_period_s < renew_deadline_s < lease_duration_s:
            raise ValueError("need retry_period_s < renew_deadline_s < lease_duration_s, got "
                             f"{retry_period_s}, {renew_deadline_s}, {lease_duration_s}")
        self.api = api
        self.identity = identity
        self.namespace = namespace or api.namespace
        self.name = name
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._clock = clock or MonotonicClock()
        # The process's one supervisor in production; tests may leave it out.
        self._supervisor = supervisor or Supervisor(clock=self._clock)
        self._wall = wall
        self._leading = False
        self._refused = False  # in an episode of 401/403 answers (warned once)
        self._renewed_at = float("-inf")  # clock time when the last successful write began
        self._observed: Lease | None = None  # the Lease record as last read or written
        self._observed_at = float("-inf")  # clock time when that record was first seen
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Written into the Lease while this pod holds it (the slot broker's address).
        self.advertised: dict[str, str] = {}

    # ---- state ---------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this pod may act as the leader now (a pure function of state and time)."""
        return self._leading and self._clock.now() < self._renewed_at + self.renew_deadline_s

    @property
    def annotations(self) -> Mapping[str, str]:
        """The Lease's annotations as last read (what its holder advertises)."""
        return self._observed.annotations if self._observed is not None else {}

    @property
    def holder(self) -> str | None:
        """The holder as last read (None: unknown or free)."""
        return self._observed.holder if self._observed is not None else None

    async def wait_leading(self, leading: bool = True) -> None:
        """Until :attr:`is_leader` is ``leading``. Waiting to lose the lead also returns at the
        renewal deadline, even while a renewal is stuck in an API call."""
        while self.is_leader != leading:
            changed = self._changed
            if not self.is_leader:
                await changed.wait()
                continue
            deadline = self._renewed_at + self.renew_deadline_s - self._clock.now()
            waiters = [asyncio.ensure_future(changed.wait()),
                       asyncio.ensure_future(self._clock.sleep(deadline))]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)

    def _set_leading(self, leading: bool, why: str) -> None:
        if leading != self._leading:
            self._leading = leading
            log.info("lease %s/%s: %s %s (%s)", self.namespace, self.name, self.identity,
                     "became the leader" if leading else "is no longer the leader", why)
        # Wake waiters on every step: is_leader may have flipped by time alone.
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- one round -----------------------------------------------------------------------------

    async def step(self) -> bool:
        """Try once to acquire or renew the Lease; returns :attr:`is_leader` afterwards."""
        now = self._clock.now()
        try:
            await self._try_acquire_or_renew(now)
            if self._refused:
                self._refused = False
                log.info("lease %s/%s: the API server accepts this pod's requests again",
                         self.namespace, self.name)
        except KubeError as e:
            if e.status in (401, 403):
                # Refused credentials (a rotated token, a Role in another namespace): this pod
                # can never lead until that is fixed. Said once per episode, not every retry.
                if not self._refused:
                    log.warning("lease %s/%s: %s %s: this pod cannot lead until that is fixed "
                                "(%s)", self.namespace, self.name, e.status, e.reason, e)
                self._refused = True
            if self._leading and not self.is_leader:
                self._set_leading(False, f"could not renew within {self.renew_deadline_s:g} s: "
                                         f"{e}")
            else:
                level = logging.WARNING if self._leading and not self._refused else (
                    logging.DEBUG)
                log.log(level, "lease %s/%s: %s", self.namespace, self.name, e)
                self._set_leading(self._leading, "")
        return self.is_leader

    def _seen(self, lease: Lease, now: float) -> None:
        if self._observed is None or lease != self._observed:
            self._observed = lease
            self._observed_at = now

    async def _try_acquire_or_renew(self, now: float) -> None:
        stamp = micro_time(self._wall())
        duration = max(1, round(self.lease_duration_s))
        current = await self.api.get_lease(self.namespace, self.name)
        if current is None:
            mine = Lease(self.name, holder=self.identity, duration_s=duration,
                         acquire_time=stamp, renew_time=stamp, transitions=0,
                         annotations=dict(self.advertised))
            self._seen(await self.api.create_lease(self.namespace, mine), now)
            self._renewed_at = now
            self._set_leading(True, "created the lease")
            return
        self._seen(current, now)
        ours = current.holder == self.identity
        if not ours and current.holder:
            expires = self._observed_at + (current.duration_s or self.lease_duration_s)
            if now < expires:
                self._set_leading(False, f"held by {current.holder}")
                return
        mine = replace(
            current, holder=self.identity, duration_s=duration, renew_time=stamp,
            acquire_time=current.acquire_time if ours else stamp,
            transitions=current.transitions + (0 if ours else 1),
            annotations={**current.annotations, **self.advertised})
        self._seen(await self.api.replace_lease(self.namespace, mine), now)
        self._renewed_at = now
        if ours:
            self._set_leading(True, "renewed")
        else:
            why = f"took over from {current.holder} (expired)" if current.holder else "was free"
            self._set_leading(True, why)

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Step every ``retry_period_s``, forever."""
        while True:
            await self.step()
            await self._clock.sleep(self.retry_period_s)

    def start(self) -> None:
        if self._task is None:
            self._task = self._supervisor.spawn(
                self.run(), name=f"leader election {self.namespace}/{self.name}")

    async def close(self, *, release: bool = True) -> None:
        """Stop electing; as the leader, ``release`` frees the Lease so that another pod takes
        over at its next step instead of after the lease duration."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if release and self._leading:
            await self.release()

    async def release(self) -> None:
        was = self._leading
        self._set_leading(False, "released")
        if not was or self._observed is None or self._observed.holder != self.identity:
            return
        freed = replace(self._observed, holder=None, renew_time=micro_time(self._wall()),
                        duration_s=1)
        try:
            self._seen(await self.api.replace_lease(self.namespace, freed),
                       self._clock.now())
        except KubeError as e:
            log.warning("lease %s/%s: could not release: %s", self.namespace, self.name, e)


async def follow_leadership(elector: LeaderElector, start: Callable[[], Awaitable[None]],
                            stop: Callable[[], Awaitable[None]]) -> None:
    """Run ``start()`` each time this pod becomes the leader and ``stop()`` each time it stops
    being it (and on cancellation while leading). Runs until cancelled."""
    while True:
        await elector.wait_leading(True)
        await start()
        try:
            await elector.wait_leading(False)
        finally:
            await stop()
