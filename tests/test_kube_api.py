"""The Kubernetes adapter (deploy/kube/api.py) against the fake API server, over HTTPS with a
bearer token, configured the way a pod is (service account) and the way a laptop is
(kubeconfig); and the fake itself held to the official schemas and to mlfe's Role."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from deploy.kube.api import (
    ROLE_RULES,
    Conflict,
    Gone,
    KubeApi,
    KubeError,
    Lease,
    NotFound,
    StreamDropped,
    WatchEvent,
)
from deploy.kube.leader import LEASE_NAME
from tests.fake_kube_api import (
    FakeKubeApi,
    allowed,
    connect_in_cluster,
    ep,
    fake_cluster,
    manifest_rules,
    schema_errors,
)

NS = "models"


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeKubeApi]:
    async with fake_cluster(tmp_path) as f:
        yield f


@pytest.fixture
async def api(fake: FakeKubeApi) -> AsyncIterator[KubeApi]:
    a = await connect_in_cluster(fake)
    yield a
    await a.close()


async def next_events(stream: AsyncIterator[WatchEvent], n: int) -> list[WatchEvent]:
    out = []
    async for e in stream:
        out.append(e)
        if len(out) == n:
            break
    return out


async def test_in_cluster_config_reads_the_service_account(fake: FakeKubeApi, api: KubeApi) -> None:
    assert api.namespace == "mlfe"
    fake.put_slice(NS, "iris-abc", "iris", [ep("192.0.2.10")])
    listed = await api.list_endpoint_slices(NS, "iris")
    assert [s["metadata"]["name"] for s in listed.items] == ["iris-abc"]
    assert listed.resource_version == str(fake.rv)
    seen = fake.seen("GET", "endpointslices")[-1]
    assert seen.query["labelSelector"] == "kubernetes.io/service-name=iris"


async def test_kubeconfig_outside_a_pod(fake: FakeKubeApi, tmp_path: Path) -> None:
    api = await KubeApi.connect(kubeconfig=str(fake.kubeconfig(namespace="dev")),
                                service_account_dir=tmp_path / "none", environ={})
    try:
        assert api.namespace == "dev"
        fake.put_deployment(NS, "iris", replicas=2)
        assert (await api.get_scale(NS, "iris")).replicas == 2
    finally:
        await api.close()


async def test_an_unknown_namespace_is_an_error_at_start(fake: FakeKubeApi,
                                                        tmp_path: Path) -> None:
    """A kubeconfig context without a namespace is not taken as `default` (where mlfe's
    Lease and Secret are not, so every call would be refused): a clear error, unless
    POD_NAMESPACE says it."""
    config = str(fake.kubeconfig(namespace=""))
    with pytest.raises(KubeError, match="namespace is unknown") as err:
        await KubeApi.connect(kubeconfig=config, service_account_dir=tmp_path / "none",
                              environ={})
    assert err.value.reason == "NoNamespace"
    api = await KubeApi.connect(kubeconfig=config, service_account_dir=tmp_path / "none",
                                environ={"POD_NAMESPACE": "dev"})
    assert api.namespace == "dev"
    await api.close()


async def test_no_cluster_config_is_a_kube_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-kubeconfig"
    missing.write_text("{}")
    with pytest.raises(KubeError, match="no usable kubeconfig") as err:
        await KubeApi.connect(kubeconfig=str(missing), environ={},
                              service_account_dir=tmp_path / "none")
    assert err.value.reason == "NoConfig"


async def test_a_wrong_token_is_refused(fake: FakeKubeApi) -> None:
    sa, env = fake.service_account()
    (sa / "token").write_text("stolen")
    api = await KubeApi.connect(service_account_dir=sa, environ=env)
    try:
        with pytest.raises(KubeError) as err:
            await api.list_endpoint_slices(NS, "iris")
        assert err.value.status == 401
    finally:
        await api.close()


async def test_list_selects_by_service(fake: FakeKubeApi, api: KubeApi) -> None:
    fake.put_slice(NS, "iris-1", "iris", [ep("192.0.2.1")])
    fake.put_slice(NS, "wine-1", "wine", [ep("192.0.2.2")])
    fake.put_slice("other", "iris-2", "iris", [ep("192.0.2.3")])
    listed = await api.list_endpoint_slices(NS, "iris")
    assert [s["metadata"]["name"] for s in listed.items] == ["iris-1"]


async def test_watch_from_a_version_sees_only_later_changes(fake: FakeKubeApi, api: KubeApi) -> None:
    fake.put_slice(NS, "iris-1", "iris", [ep("192.0.2.1")])
    rv = (await api.list_endpoint_slices(NS, "iris")).resource_version
    fake.put_slice(NS, "iris-1", "iris", [ep("192.0.2.1"), ep("192.0.2.2")])
    fake.put_slice(NS, "wine-1", "wine", [ep("192.0.2.9")])
    fake.delete_slice(NS, "iris-1")
    async with contextlib.aclosing(api.watch_endpoint_slices(NS, "iris", rv, 60)) as stream:
        events = await next_events(stream, 2)
    assert [(e.type, e.name) for e in events] == [("MODIFIED", "iris-1"), ("DELETED", "iris-1")]
    assert int(events[-1].resource_version or 0) == fake.rv
    watch = fake.seen("GET", "endpointslices", watch=True)[-1]
    assert watch.query["resourceVersion"] == rv
    assert watch.query["allowWatchBookmarks"].lower() == "true"
    assert watch.query["timeoutSeconds"] == "60"


async def test_an_expired_version_raises_gone(fake: FakeKubeApi, api: KubeApi) -> None:
    rv = (await api.list_endpoint_slices(NS, "iris")).resource_version
    fake.put_slice(NS, "iris-1", "iris", [ep("192.0.2.1")])
    fake.compact()
    with pytest.raises(Gone):  # the real server's way: 200, then an ERROR event with 410
        async with contextlib.aclosing(api.watch_endpoint_slices(NS, "iris", rv, 60)) as s:
            await next_events(s, 1)
    fake.fail("GET", "endpointslices", 410, watch=True)  # the other way: a 410 answer
    with pytest.raises(Gone):
        async with contextlib.aclosing(api.watch_endpoint_slices(NS, "iris", rv, 60)) as s:
            await next_events(s, 1)


async def test_a_cut_stream_raises_stream_dropped(fake: FakeKubeApi, api: KubeApi) -> None:
    rv = (await api.list_endpoint_slices(NS, "iris")).resource_version
    async with contextlib.aclosing(api.watch_endpoint_slices(NS, "iris", rv, 60)) as stream:
        fake.put_slice(NS, "iris-1", "iris", [ep("192.0.2.1")])
        assert [e.type for e in await next_events(stream, 1)] == ["ADDED"]
        await fake.wait_watching(1)
        fake.drop_watches()
        with pytest.raises(StreamDropped):
            await next_events(stream, 1)


async def test_a_clean_end_of_stream_just_ends(fake: FakeKubeApi, api: KubeApi) -> None:
    rv = (await api.list_endpoint_slices(NS, "iris")).resource_version
    async with contextlib.aclosing(api.watch_endpoint_slices(NS, "iris", rv, 60)) as stream:
        reading = asyncio.ensure_future(next_events(stream, 1))  # the request goes out now
        await fake.wait_watching(1)
        fake.drop_watches(clean=True)
        assert await reading == []


async def test_scale_get_and_patch(fake: FakeKubeApi, api: KubeApi) -> None:
    fake.put_deployment(NS, "iris", replicas=2)
    scale = await api.get_scale(NS, "iris")
    assert scale.replicas == 2
    new = await api.patch_scale(NS, "iris", 5, scale.resource_version)
    assert new.replicas == 5
    assert fake.deployment(NS, "iris")["spec"]["replicas"] == 5
    patch = fake.seen("PATCH")[-1]
    assert patch.path == f"/apis/apps/v1/namespaces/{NS}/deployments/iris/scale"
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body == {"spec": {"replicas": 5},
                          "metadata": {"resourceVersion": scale.resource_version}}
    with pytest.raises(Conflict):  # a stale version: someone else changed it meanwhile
        await api.patch_scale(NS, "iris", 3, scale.resource_version)
    with pytest.raises(NotFound):
        await api.get_scale(NS, "nope")
    with pytest.raises(KubeError) as err:
        await api.patch_scale(NS, "iris", -1)
    assert err.value.status == 422


async def test_errors_carry_status_and_retry_after(fake: FakeKubeApi, api: KubeApi) -> None:
    fake.put_deployment(NS, "iris")
    fake.fail("GET", "scale$", 429, retry_after=7)
    with pytest.raises(KubeError) as err:
        await api.get_scale(NS, "iris")
    assert (err.value.status, err.value.retry_after_s) == (429, 7.0)
    fake.fail("GET", "scale$", 500)
    with pytest.raises(KubeError) as err:
        await api.get_scale(NS, "iris")
    assert err.value.status == 500
    assert (await api.get_scale(NS, "iris")).replicas == 1


async def test_unreachable_is_a_kube_error(fake: FakeKubeApi, api: KubeApi) -> None:
    await fake.close()
    with pytest.raises(KubeError) as err:
        await api.get_scale(NS, "iris")
    assert err.value.status == 0


async def test_lease_create_get_replace(fake: FakeKubeApi, api: KubeApi) -> None:
    assert await api.get_lease("mlfe", "mlfe-autoscaler") is None
    created = await api.create_lease("mlfe", Lease("mlfe-autoscaler", holder="a", duration_s=15,
                                                   renew_time="2026-11-24T10:00:00.000000Z"))
    assert created.holder == "a" and created.resource_version
    with pytest.raises(Conflict):
        await api.create_lease("mlfe", Lease("mlfe-autoscaler", holder="b"))
    from dataclasses import replace
    renewed = await api.replace_lease("mlfe", replace(created, holder="b"))
    assert (await api.get_lease("mlfe", "mlfe-autoscaler")) == renewed
    with pytest.raises(Conflict):  # written from a stale read
        await api.replace_lease("mlfe", replace(created, holder="c"))


def test_the_role_manifest_grants_what_the_adapter_needs() -> None:
    """deploy/kubernetes/role.yaml grants every call of deploy/kube/api.py (ROLE_RULES), for
    the lease mlfe-autoscaler; and no write to a Deployment itself."""
    rules = manifest_rules()
    for rule in ROLE_RULES:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    name = LEASE_NAME if resource == "leases" and verb != "create" else (
                        "mlfe-keys" if resource == "secrets" else None)
                    assert allowed(rules, group, resource, verb, name), (group, resource, verb)
    for verb in ("update", "patch"):
        assert not allowed(rules, "apps", "deployments", verb, "iris")


async def test_the_role_allows_only_what_mlfe_needs(fake: FakeKubeApi) -> None:
    """The fake enforces the Role: the Deployment itself cannot be written nor read."""
    fake.put_deployment(NS, "iris")
    base = f"{fake.url}/apis/apps/v1/namespaces/{NS}/deployments/iris"
    headers = {"Authorization": f"Bearer {fake.token}",
               "Content-Type": "application/merge-patch+json"}
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=fake.ca_file),
                                 headers=headers) as http:
        r = await http.patch(base, content=b'{"spec":{"replicas":9}}')
        assert r.status_code == 403 and r.json()["reason"] == "Forbidden"
        r = await http.get(base)
        assert r.status_code == 403
        r = await http.get(f"{fake.url}/api/v1/namespaces/{NS}/secrets")
        assert r.status_code == 403  # only its own Secret, by name
        r = await http.patch(base + "/scale", content=b'{"spec":{"replicas":3}}')
        assert r.status_code == 200 and r.json()["spec"]["replicas"] == 3
    assert {v for rule in ROLE_RULES for v in rule["verbs"]} == {
        "list", "watch", "get", "patch", "create", "update"}


def test_the_fake_validates_what_it_emits() -> None:
    """The schema check is strict: a wrong type or an unknown field is caught."""
    good = {"apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": "x", "namespace": "n", "resourceVersion": "1"},
            "spec": {"replicas": 2}, "status": {"replicas": 2}}
    assert schema_errors(good) == []
    assert schema_errors({**good, "spec": {"replicas": "2"}})
    assert schema_errors({**good, "spec": {"replicas": 2, "replcas": 2}})


def test_loopback_endpoints_are_refused(tmp_path: Path) -> None:
    fake = FakeKubeApi(tmp_path)
    with pytest.raises(ValueError, match="loopback"):
        fake.put_slice(NS, "iris-1", "iris", [ep("127.0.0.1")])
