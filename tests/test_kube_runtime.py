"""`mlfe serve` with a `kubernetes:` service against the fake API server: the replica pool
follows the EndpointSlices, the pod takes the Lease, and its autoscaler patches only the
`/scale` subresource (here: down to the minimum of an idle service)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fake_kube_api import FakeKubeApi, ep, fake_cluster
from tests.support import Proc, free_port, spawn

ADMIN = "admin-token-for-tests"


def start_pod(tmp_path: Path, fake: FakeKubeApi, cfg: dict[str, Any], port: int) -> Proc:
    """`mlfe serve` with `cfg` as router pod mlfe-router-0 of the fake cluster."""
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return spawn(["serve", "--config", str(path)], tmp_path / "router.log", port,
                 {"MLFE_ADMIN_TOKEN": ADMIN, "KUBECONFIG": str(fake.kubeconfig()),
                  "POD_NAME": "mlfe-router-0"})


async def poll(what: str, condition: Any, router: Proc, within_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        assert router.alive(), router.log()[-3000:]
        await asyncio.to_thread(router.pause, 0.05)  # waits on the process: the poll interval


async def test_serve_follows_endpoint_slices_and_scales_through_the_subresource(
        tmp_path: Path) -> None:
    async with fake_cluster(tmp_path) as fake:
        fake.put_deployment("models", "iris", replicas=3)
        fake.put_secret("mlfe", "mlfe-keys", {})  # the router pods' shared state
        fake.put_slice("models", "iris-abc", "iris", [ep("192.0.2.10"), ep("192.0.2.11")])
        port, admin_port = free_port(), free_port()
        cfg = {
            "router": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}",
                       "state_dir": str(tmp_path / "state"),
                       "coordination": {"listen": "127.0.0.1:0"}},
            "services": {"iris": {
                "kubernetes": {"namespace": "models", "deployment": "iris"},
                "autoscale_min_replicas": 1, "autoscale_max_replicas": 4,
                "autoscale_refresh_seconds": 0.2, "autoscale_scale_down_window_seconds": 1,
            }},
        }
        router = start_pod(tmp_path, fake, cfg, port)
        try:
            async with httpx.AsyncClient(timeout=5) as c:
                async def replicas() -> int | None:
                    try:
                        r = await c.get(f"http://127.0.0.1:{admin_port}/v1/services/iris",
                                        headers={"Authorization": f"Bearer {ADMIN}"})
                    except httpx.TransportError:
                        assert router.alive(), router.log()
                        return None
                    return len(r.json()["replicas"]) if r.status_code == 200 else None

                async def has(n: int) -> bool:
                    return await replicas() == n

                await poll("two replicas from the slice", lambda: has(2), router)
                fake.put_slice("models", "iris-abc", "iris",
                               [ep("192.0.2.10"), ep("192.0.2.11", ready=False), ep("192.0.2.12")])
                fake.put_slice("models", "iris-def", "iris", [ep("192.0.2.13")])
                await poll("ready endpoints of both slices", lambda: has(3), router)

                async def scaled_down() -> bool:
                    return bool(fake.deployment("models", "iris")["spec"]["replicas"] == 1)

                await poll("the idle service scaled to its minimum", scaled_down, router)
                assert fake.lease("mlfe", "mlfe-autoscaler") is not None
                patches = fake.seen("PATCH")
                assert patches and all(s.path.endswith("/deployments/iris/scale")
                                       for s in patches)
                assert not fake.seen("PUT", "/apis/apps/v1/namespaces/models/deployments/iris")
        finally:
            router.signal()
            code = await asyncio.to_thread(router.wait_exit)
            assert code == 0, router.log()[-3000:]


async def test_router_scales_its_own_deployment_out_under_load(tmp_path: Path) -> None:
    from tests.support import EXAMPLES, post_many, start_replica

    rep = await asyncio.to_thread(start_replica, tmp_path, EXAMPLES / "echo" / "score.py")
    async with fake_cluster(tmp_path) as fake:
        fake.put_deployment("mlfe", "mlfe-router", replicas=1)
        fake.put_secret("mlfe", "mlfe-keys", {})
        fake.put_deployment("models", "iris", replicas=1)
        fake.put_slice("models", "iris-abc", "iris", [ep("192.0.2.10")])
        port, admin_port = free_port(), free_port()
        cfg = {
            "router": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}",
                       "state_dir": str(tmp_path / "state"),
                       "coordination": {"listen": "127.0.0.1:0"}, "access_log": False,
                       # Any load counts as slow routing: one more pod, up to 2.
                       "self_scaling": {"max_pods": 2, "routing_time_up_ms": 0.0001,
                                        "up_window_seconds": 2, "period_seconds": 0.5,
                                        "cpu_down_threshold": 0.01, "cooldown_seconds": 1}},
            "services": {
                "iris": {"kubernetes": {"namespace": "models", "deployment": "iris"}},
                "echo": {"upstreams": [f"127.0.0.1:{rep.port}"], "auth_enabled": False},
            },
        }
        router = start_pod(tmp_path, fake, cfg, port)
        try:
            async def leading_and_ready() -> bool:
                # Ready once its broker lends to it (after the Lease records it as a member).
                if fake.lease("mlfe", "mlfe-autoscaler") is None:
                    return False
                async with httpx.AsyncClient(timeout=5) as c:
                    try:
                        r = await c.get(f"http://127.0.0.1:{port}/-/ready")
                    except httpx.TransportError:
                        return False
                return r.status_code == 200

            await poll("the Lease taken and the pod ready", leading_and_ready, router)

            async def scaled_out() -> bool:
                if fake.deployment("mlfe", "mlfe-router")["spec"]["replicas"] == 2:
                    return True
                statuses = await post_many(port, "/api/v1/service/echo/score", 300, {},
                                           concurrency=8)
                assert set(statuses) == {200}
                return False

            await poll("the router's Deployment scaled out", scaled_out, router, within_s=60)
            patches = [s.path for s in fake.seen("PATCH")]
            assert "/apis/apps/v1/namespaces/mlfe/deployments/mlfe-router/scale" in patches
        finally:
            router.signal()
            code = await asyncio.to_thread(router.wait_exit)
            rep.stop()
            assert code == 0, router.log()[-3000:]


async def test_a_router_pod_runs_one_process_and_joins_the_lease_holders_broker(
        tmp_path: Path) -> None:
    """`router.workers` > 1 with a kubernetes service: one process per pod (a warning says why),
    so the pod's slot member joins the Lease holder's broker and caps hold across pods."""
    async with fake_cluster(tmp_path) as fake:
        fake.put_deployment("models", "iris", replicas=1)
        fake.put_secret("mlfe", "mlfe-keys", {})
        port, admin_port = free_port(), free_port()
        cfg = {
            "router": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}",
                       "state_dir": str(tmp_path / "state"), "workers": 2,
                       "self_scaling": {"max_workers": 4},
                       "coordination": {"listen": "127.0.0.1:0"}},
            "services": {"iris": {"kubernetes": {"namespace": "models", "deployment": "iris"}}},
        }
        router = start_pod(tmp_path, fake, cfg, port)
        try:
            async def broker_advertised() -> bool:
                lease = fake.lease("mlfe", "mlfe-autoscaler") or {}
                annotations = (lease.get("metadata") or {}).get("annotations") or {}
                return annotations.get("mlfe.io/slot-broker", "").startswith("mlfe-router-0_")

            await poll("the pod's broker in the Lease", broker_advertised, router)
            assert "one router process per pod" in router.log()
        finally:
            router.signal()
            code = await asyncio.to_thread(router.wait_exit)
            assert code == 0, router.log()[-3000:]
