"""The Kubernetes actuator: it scales through deployments/{name}/scale only, and never fights a
human: a spec.replicas it did not set is logged and adopted as the current count."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from autoscaler.decider import Counts, Policy, ScalingSpec
from autoscaler.loop import AutoscalerLoop
from autoscaler.router_loop import DeploymentPods
from deploy.kube.api import KubeApi
from deploy.kube.scaler import DeploymentRef, KubeScaler, NotLeader, NotObserved
from deploy.kube.target import KubernetesTarget
from mlfe.clock import FakeClock
from mlfe.config import parse_config
from tests.fake_kube_api import (
    FakeKubeApi,
    Seen,
    WatchedClock,
    connect_in_cluster,
    ep,
    fake_cluster,
    until,
)

NS = "models"
SCALE_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/iris/scale"
DEPLOYMENT_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/iris"


# Every test here must leave no task running (the fixture is in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_tasks")


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeKubeApi]:
    async with fake_cluster(tmp_path) as f:
        f.put_deployment(NS, "iris", replicas=1)
        yield f
    # Whatever happened, the Deployment itself was never written.
    assert not [r for r in f.requests
                if r.method in ("PATCH", "PUT", "POST") and r.path == DEPLOYMENT_PATH]


@pytest.fixture
async def api(fake: FakeKubeApi) -> AsyncIterator[KubeApi]:
    a = await connect_in_cluster(fake)
    yield a
    await a.close()


@pytest.fixture
async def scaler(api: KubeApi) -> AsyncIterator[KubeScaler]:
    s = KubeScaler(api, clock=FakeClock())
    s.set_targets({"iris": DeploymentRef(NS, "iris")})
    yield s
    await s.close()


def writes(fake: FakeKubeApi) -> list[Seen]:
    return [r for r in fake.requests if r.method in ("PATCH", "PUT", "POST")]


async def test_scale_patches_the_scale_subresource(fake: FakeKubeApi, scaler: KubeScaler) -> None:
    with pytest.raises(NotObserved):
        scaler.current("iris")
    assert await scaler.refresh("iris") == 1
    rv = fake.deployment(NS, "iris")["metadata"]["resourceVersion"]
    await scaler.scale("iris", 3)
    assert scaler.current("iris") == 3
    assert fake.deployment(NS, "iris")["spec"]["replicas"] == 3
    [patch] = writes(fake)
    assert (patch.method, patch.path, patch.status) == ("PATCH", SCALE_PATH, 200)
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {"spec": {"replicas": 3}, "metadata": {"resourceVersion": rv}}
    await scaler.scale("iris", 3)  # already there: nothing to write
    assert len(writes(fake)) == 1
    with pytest.raises(KeyError):
        await scaler.scale("wine", 2)


async def test_a_human_change_is_logged_and_adopted(
    fake: FakeKubeApi, api: KubeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    external: list[tuple[str, int]] = []
    scaler = KubeScaler(api, clock=FakeClock(),
                        on_external_change=lambda s, n: external.append((s, n)))
    scaler.set_targets({"iris": DeploymentRef(NS, "iris")})
    try:
        await scaler.refresh("iris")
        await scaler.scale("iris", 3)
        fake.scale_by_hand(NS, "iris", 5)  # kubectl scale --replicas=5
        with caplog.at_level(logging.WARNING, logger="deploy.kube.scaler"):
            await scaler.scale("iris", 4)  # decided from a stale count: not applied
        assert len(writes(fake)) == 1
        assert fake.deployment(NS, "iris")["spec"]["replicas"] == 5
        assert scaler.current("iris") == 5
        assert external == [("iris", 5)]
        assert "deployment models/iris: spec.replicas is 5, not the 3 mlfe set" in caplog.text
        # Decided again from the real count, the next call applies.
        await scaler.scale("iris", 4)
        assert fake.deployment(NS, "iris")["spec"]["replicas"] == 4
    finally:
        await scaler.close()


async def test_a_change_between_read_and_patch_is_not_overwritten(
    fake: FakeKubeApi, scaler: KubeScaler, caplog: pytest.LogCaptureFixture,
) -> None:
    await scaler.refresh("iris")

    def human_first(r: Seen) -> None:
        if r.method == "PATCH":
            fake.before = None
            fake.scale_by_hand(NS, "iris", 6)

    fake.before = human_first
    with caplog.at_level(logging.WARNING, logger="deploy.kube.scaler"):
        await scaler.scale("iris", 2)
    [patch] = writes(fake)
    assert patch.status == 409  # conditional on the version it read
    assert fake.deployment(NS, "iris")["spec"]["replicas"] == 6
    assert scaler.current("iris") == 6
    assert "spec.replicas is 6, not the 1 mlfe last saw" in caplog.text


async def test_polling_notices_a_human_change(
    fake: FakeKubeApi, api: KubeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    clock = WatchedClock()
    scaler = KubeScaler(api, clock=clock, poll_s=5.0)
    scaler.set_targets({"iris": DeploymentRef(NS, "iris")})
    scaler.start()
    try:
        await asyncio.wait_for(scaler.wait_observed(), 10)
        assert await clock.wait_sleeps(1) == 5.0
        fake.scale_by_hand(NS, "iris", 7)
        with caplog.at_level(logging.WARNING, logger="deploy.kube.scaler"):
            clock.advance(5.0)
            await until(lambda: scaler.current("iris") == 7)
        assert "spec.replicas is 7" in caplog.text
        fake.fail("GET", "scale$", 500)  # a failed read keeps the count and tries again
        clock.advance(5.0)
        await clock.wait_sleeps(3)
        assert scaler.current("iris") == 7
    finally:
        await scaler.close()


async def test_only_the_leader_scales(fake: FakeKubeApi, api: KubeApi) -> None:
    leading = False
    scaler = KubeScaler(api, clock=FakeClock(), may_scale=lambda: leading)
    scaler.set_targets({"iris": DeploymentRef(NS, "iris")})
    try:
        await scaler.refresh("iris")
        with pytest.raises(NotLeader):
            await scaler.scale("iris", 3)
        assert writes(fake) == []
        leading = True
        await scaler.scale("iris", 3)
        assert fake.deployment(NS, "iris")["spec"]["replicas"] == 3
    finally:
        await scaler.close()


class Busy:
    def __init__(self, busy: int) -> None:
        self.busy = busy

    def counts(self, service: str) -> Counts:
        return Counts(busy=self.busy, queued=0, replicas=1)


async def test_the_autoscaler_drives_the_target(fake: FakeKubeApi, api: KubeApi) -> None:
    """The runtime's wiring: AutoscalerLoop -> KubernetesTarget -> PATCH .../scale."""
    cfg = parse_config({"services": {"iris": {
        "kubernetes": {"namespace": NS, "deployment": "iris"}, "auth_enabled": False}}})
    fake.put_slice(NS, "iris-a", "iris", [ep("192.0.2.1")])
    clock = FakeClock()
    target = KubernetesTarget({}, api, clock=clock)
    target.configure({}, cfg.services)
    loop = AutoscalerLoop(counts=Busy(5), actuator=target, clock=clock)
    loop.set_services({"iris": ScalingSpec(min_replicas=1, max_replicas=10, policy=Policy.AZUREML)})
    try:
        await asyncio.wait_for(target.wait_synced(), 10)
        loop.start()  # first tick at once: 5 busy at 70 % -> 8 replicas
        patch = await fake.wait_request(lambda r: r.method == "PATCH")
        assert re.fullmatch(SCALE_PATH, patch.path)
        assert patch.body["spec"] == {"replicas": 8}
        await until(lambda: target.current("iris") == 8)
    finally:
        await loop.stop()
        await target.close()


async def test_the_router_deployment_for_the_self_scaler(fake: FakeKubeApi, api: KubeApi) -> None:
    """The router's own Deployment is scaled through the same actuator, under its own name,
    and stays tracked across config reloads."""
    cfg = parse_config({"services": {"iris": {
        "kubernetes": {"namespace": NS, "deployment": "iris"}, "auth_enabled": False}}})
    fake.put_deployment("mlfe", "mlfe-router", replicas=2)
    leading = True
    target = KubernetesTarget({}, api, clock=FakeClock(), may_scale=lambda: leading)
    target.add_deployment("router/mlfe-router", "mlfe", "mlfe-router")
    target.configure({}, cfg.services)
    pods = DeploymentPods(target, "router/mlfe-router", may_scale=lambda: leading)
    try:
        await asyncio.wait_for(target.wait_synced(), 10)
        assert pods.current() == 2
        target.configure({}, {})  # a reload without any kubernetes service
        await pods.set_pods(3)
        assert fake.deployment("mlfe", "mlfe-router")["spec"]["replicas"] == 3
        assert writes(fake)[-1].path == "/apis/apps/v1/namespaces/mlfe/deployments/mlfe-router/scale"
        leading = False
        assert not pods.may_scale()
        with pytest.raises(NotLeader):
            await pods.set_pods(4)
    finally:
        await target.close()


async def test_a_follower_sees_the_leaders_scaling_without_a_warning(
    fake: FakeKubeApi, api: KubeApi, caplog: pytest.LogCaptureFixture,
) -> None:
    """On a pod that does not lead, every decision of the leader is a change it did not make:
    that is expected, so it is taken in quietly (and still adopted)."""
    follower = KubeScaler(api, clock=FakeClock(), may_scale=lambda: False)
    follower.set_targets({"iris": DeploymentRef(NS, "iris")})
    try:
        await follower.refresh("iris")
        fake.scale_by_hand(NS, "iris", 4)  # the leader's decision
        with caplog.at_level(logging.WARNING, logger="deploy.kube.scaler"):
            assert await follower.refresh("iris") == 4
        assert follower.current("iris") == 4
        assert "changed outside mlfe" not in caplog.text
    finally:
        await follower.close()


async def test_a_deployment_scales_to_zero_and_back(fake: FakeKubeApi, scaler: KubeScaler
                                                     ) -> None:
    """autoscale_min_replicas 0: replicas 0 through /scale, then 1 again for the next request."""
    await scaler.refresh("iris")
    await scaler.scale("iris", 0)
    assert fake.deployment(NS, "iris")["spec"]["replicas"] == 0
    assert scaler.current("iris") == 0
    assert await scaler.refresh("iris") == 0  # a Deployment at zero reads back as 0
    await scaler.scale("iris", 1)
    assert fake.deployment(NS, "iris")["spec"]["replicas"] == 1
    assert [w.body["spec"]["replicas"] for w in writes(fake)] == [0, 1]
