"""Endpoints, keys and the admin API against a real router: traffic split (chi-square over
10,000 requests), live changes with no error, pinning, key rotation, and restart persistence."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlfe.config import parse_config
from router.traffic import build_split, pick_version
from tests.support import EXAMPLES, Proc, free_port, post_many, start_replica, start_router

ADMIN = "admin-token-for-tests"
EP_KEY = "endpoint-key-" + "e" * 32
SVC_KEY = "service-key-" + "s" * 32
# chi-square critical values at p = 0.001, by degrees of freedom.
CHI2_CRIT = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def chi_square(observed: dict[str, int], shares: dict[str, float]) -> float:
    n = sum(observed.values())
    return sum((observed.get(k, 0) - n * p / 100) ** 2 / (n * p / 100)
               for k, p in shares.items() if p > 0)


class Admin:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {ADMIN}"}

    def __call__(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(method, self.base + path, headers=self.headers, timeout=10, **kw)


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Proc]:
    rep = start_replica(tmp_path, EXAMPLES / "echo" / "score.py")
    yield rep
    rep.stop()


def start(tmp: Path, replica: Proc, state: str = "state") -> tuple[Proc, Admin]:
    admin_port = free_port()
    up = [f"127.0.0.1:{replica.port}"]
    cfg = {
        "router": {"admin_listen": f"127.0.0.1:{admin_port}", "state_dir": str(tmp / state)},
        "services": {
            "blue": {"upstreams": up, "primary_key": SVC_KEY},
            "green": {"upstreams": up},
            "red": {"upstreams": up},
        },
        "endpoints": {
            "myep": {
                "primary_key": EP_KEY,
                "versions": {
                    "v1": {"service": "blue", "traffic_percentile": 20},  # default: takes 70
                    "v2": {"service": "green", "traffic_percentile": 30},
                },
            }
        },
    }
    router = start_router(tmp, cfg, env={"MLFE_ADMIN_TOKEN": ADMIN})
    return router, Admin(admin_port)


async def count_versions(port: int, path: str, n: int,
                         key: str = EP_KEY) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    statuses = await post_many(
        port, path, n, {"Authorization": f"Bearer {key}"},
        on_response=lambda status, h: seen.update([h["azureml-model-deployment"]]),
    )
    assert set(statuses) == {200}, collections.Counter(statuses)
    return seen


def test_split_is_pure_and_default_takes_the_rest() -> None:
    cfg = parse_config({"services": {"blue": {"upstreams": ["h:1"]}, "green": {"upstreams": ["h:1"]}},
                        "endpoints": {"myep": {"versions": {
                            "v1": {"service": "blue", "traffic_percentile": 20},
                            "v2": {"service": "green", "traffic_percentile": 10}}}}})
    split = build_split(cfg.endpoints["myep"])
    assert split.shares() == {"v2": 10.0, "v1": 90.0}  # azureml's worked example
    assert pick_version(split, 0.0) == "v2"
    assert pick_version(split, 0.0999) == "v2"
    assert pick_version(split, 0.1) == "v1"
    assert pick_version(split, 0.999999) == "v1"


def test_traffic_split_matches_and_changes_live(tmp_path: Path, replica: Proc) -> None:
    router, admin = start(tmp_path, replica)
    try:
        path = "/api/v1/endpoint/myep/score"
        seen = asyncio.run(count_versions(router.port, path, 10_000))
        shares = {"v1": 70.0, "v2": 30.0}
        assert set(seen) == {"v1", "v2"}
        assert chi_square(dict(seen), shares) < CHI2_CRIT[1], seen

        # Change the split while traffic flows: every request still succeeds.
        async def change_under_load() -> collections.Counter[str]:
            load = asyncio.create_task(count_versions(router.port, path, 3_000))
            r = await asyncio.to_thread(admin, "PATCH", "/v1/endpoints/myep/versions/v2",
                                        json={"trafficPercentile": 70})
            assert r.status_code == 200, r.text
            r = await asyncio.to_thread(admin, "PUT", "/v1/endpoints/myep/versions/v3",
                                        json={"service": "red", "trafficPercentile": 10})
            assert r.status_code == 200, r.text
            return await load

        asyncio.run(change_under_load())
        seen = asyncio.run(count_versions(router.port, path, 10_000))
        shares = {"v1": 20.0, "v2": 70.0, "v3": 10.0}
        assert chi_square(dict(seen), shares) < CHI2_CRIT[2], seen
        r = admin("GET", "/v1/endpoints/myep")
        assert r.json()["versions"]["v1"]["effectiveTrafficPercentile"] == pytest.approx(20.0)
    finally:
        router.stop()


def test_pinning_auth_and_errors(tmp_path: Path, replica: Proc) -> None:
    router, admin = start(tmp_path, replica)
    try:
        ep = f"{router.url}/api/v1/endpoint/myep"
        auth = {"Authorization": f"Bearer {EP_KEY}"}
        for _ in range(20):
            r = httpx.post(f"{ep}/v2/score", json={}, headers=auth)
            assert r.status_code == 200 and r.headers["azureml-model-deployment"] == "v2"
            r = httpx.post(f"{ep}/score", json={}, headers={**auth, "azureml-model-deployment": "v1"})
            assert r.status_code == 200 and r.headers["azureml-model-deployment"] == "v1"
        r = httpx.post(f"{ep}/v9/score", json={}, headers=auth)
        assert (r.status_code, r.json()) == (404, {"message": "Version v9 of endpoint myep not found"})
        r = httpx.post(f"{ep}/score", json={}, headers={**auth, "azureml-model-deployment": "v9"})
        assert r.status_code == 404
        r = httpx.post(f"{router.url}/api/v1/endpoint/nope/score", json={}, headers=auth)
        assert (r.status_code, r.json()) == (404, {"message": "Endpoint nope not found"})
        # An endpoint takes its own keys, not its services'.
        r = httpx.post(f"{ep}/score", json={}, headers={"Authorization": f"Bearer {SVC_KEY}"})
        assert r.status_code == 401
        # Bad admin changes are refused with the reason, and nothing changes.
        r = admin("PATCH", "/v1/endpoints/myep/versions/v2", json={"trafficPercentile": 95})
        assert r.status_code == 400 and "sum to" in r.json()["message"]
        r = admin("PUT", "/v1/endpoints/myep/versions/v4", json={"service": "nope"})
        assert r.status_code == 400 and "unknown service 'nope'" in r.json()["message"]
        r = admin("PATCH", "/v1/endpoints/myep/versions/v2", json={"traffic": 5})
        assert r.status_code == 400 and "unknown fields: traffic" in r.json()["message"]
        r = admin("GET", "/v1/endpoints/myep/versions/v2")
        assert r.json()["trafficPercentile"] == 30
        # Making v2 the default unmarks v1 (azureml's rule).
        r = admin("PATCH", "/v1/endpoints/myep/versions/v2", json={"isDefault": True})
        assert r.status_code == 200 and r.json()["defaultVersion"] == "v2"
        r = admin("DELETE", "/v1/endpoints/myep/versions/v1")
        assert r.status_code == 204
        assert httpx.post(f"{ep}/v1/score", json={}, headers=auth).status_code == 404
        # The admin API wants its own token.
        r = httpx.get(f"{admin.base}/v1/stats", headers={"Authorization": f"Bearer {EP_KEY}"})
        assert r.status_code == 401
    finally:
        router.stop()


def test_key_rotation_and_restart_keep_state(tmp_path: Path, replica: Proc) -> None:
    router, admin = start(tmp_path, replica)
    svc_url = f"{router.url}/api/v1/service/green/score"
    try:
        keys = admin("GET", "/v1/services/green/keys").json()
        old_primary, secondary = keys["primaryKey"], keys["secondaryKey"]
        assert len(old_primary) >= 43 and old_primary != secondary

        def status(key: str, url: str = svc_url) -> int:
            return httpx.post(url, json={}, headers={"Authorization": f"Bearer {key}"}).status_code

        assert status(old_primary) == status(secondary) == 200
        r = admin("POST", "/v1/services/green/regen-key", json={"keyType": "Primary"})
        new_primary = r.json()["primaryKey"]
        assert new_primary != old_primary and r.json()["secondaryKey"] == secondary
        assert status(old_primary) == 401
        assert status(new_primary) == status(secondary) == 200
        assert admin("POST", "/v1/services/green/regen-key", json={"keyType": "x"}).status_code == 400

        ep_keys = admin("POST", "/v1/endpoints/myep/regen-key", json={"keyType": "Secondary"}).json()
        admin("PATCH", "/v1/endpoints/myep/versions/v2", json={"trafficPercentile": 55})
    finally:
        router.stop()

    # Same state dir, new process: keys, endpoints and versions are as they were left.
    router, admin = start(tmp_path, replica)
    try:
        svc_url = f"{router.url}/api/v1/service/green/score"
        ep_url = f"{router.url}/api/v1/endpoint/myep/score"
        assert status(new_primary, svc_url) == 200
        assert status(old_primary, svc_url) == 401
        assert status(ep_keys["secondaryKey"], ep_url) == 200
        assert admin("GET", "/v1/endpoints/myep/versions/v2").json()["trafficPercentile"] == 55
        # A key given in config and not changed there stays as regenerated... and the
        # config's own endpoint key still works.
        assert status(EP_KEY, ep_url) == 200
    finally:
        router.stop()
