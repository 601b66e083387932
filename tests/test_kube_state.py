"""The Kubernetes state store (deploy/kube/state.py) against the fake API server, in process:
mirror, compare-and-swap, watch (with bookmarks and resumes), and the fake's list/watch
behaviours it relies on."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from deploy.kube.api import Backoff, KubeApi
from deploy.kube.state import KubeStateStore
from mlfe.supervise import Supervisor
from router.state import StateConflict, StateUnavailable
from tests.fake_kube_api import FakeKubeApi, connect_in_cluster, ep, fake_cluster, until

NS = "mlfe"
SECRET = "mlfe-keys"


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeKubeApi]:
    async with fake_cluster(tmp_path) as f:
        yield f


@pytest.fixture
async def api(fake: FakeKubeApi) -> AsyncIterator[KubeApi]:
    a = await connect_in_cluster(fake)
    yield a
    await a.close()


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    s = Supervisor()
    yield s
    await s.stop()


def store(api: KubeApi, tmp_path: Path, supervisor: Supervisor) -> KubeStateStore:
    return KubeStateStore(api, tmp_path / "state", supervisor=supervisor,
                          backoff=Backoff(initial_s=0.01, max_s=0.05, jitter=0))


async def test_load_mirrors_the_secret_and_drops_stale_files(
        fake: FakeKubeApi, api: KubeApi, tmp_path: Path, supervisor: Supervisor) -> None:
    fake.put_secret(NS, SECRET, {"keys.json": b'{"a": 1}', "admin-token": b"t"})
    s = store(api, tmp_path, supervisor)
    s.state_dir.mkdir()
    (s.state_dir / "endpoints.json").write_bytes(b"{}")  # left from before a restart
    await s.load()
    assert (s.state_dir / "keys.json").read_bytes() == b'{"a": 1}'
    assert not (s.state_dir / "endpoints.json").exists()
    assert not (s.state_dir / "admin-token").exists()  # not a state file
    assert oct((s.state_dir / "keys.json").stat().st_mode & 0o777) == "0o600"


async def test_commit_is_compare_and_swap(
        fake: FakeKubeApi, api: KubeApi, tmp_path: Path, supervisor: Supervisor) -> None:
    fake.put_secret(NS, SECRET, {"keys.json": b"1", "admin-token": b"t"})
    s = store(api, tmp_path, supervisor)
    await s.load()
    await s.commit({"keys.json": b"2"})
    assert fake.secret(NS, SECRET) == {"keys.json": b"2", "admin-token": b"t"}
    assert (s.state_dir / "keys.json").read_bytes() == b"2"
    fake.put_secret(NS, SECRET, {"keys.json": b"3", "admin-token": b"t"})  # another writer
    with pytest.raises(StateConflict):
        await s.commit({"keys.json": b"4"})
    assert fake.secret(NS, SECRET)["keys.json"] == b"3"  # not overwritten
    assert (s.state_dir / "keys.json").read_bytes() == b"3"  # and taken
    await s.commit({"keys.json": b"5"})  # from the fresh read, it works
    assert fake.secret(NS, SECRET)["keys.json"] == b"5"
    fake.fail("PUT", "/secrets/", 500)
    with pytest.raises(StateUnavailable):
        await s.commit({"keys.json": b"6"})
    assert fake.secret(NS, SECRET)["keys.json"] == b"5"


async def test_the_watch_applies_changes_and_resumes_from_a_bookmark(
        fake: FakeKubeApi, api: KubeApi, tmp_path: Path, supervisor: Supervisor) -> None:
    fake.put_secret(NS, SECRET, {"keys.json": b"1"})
    s = store(api, tmp_path, supervisor)
    await s.load()
    changes: list[bytes] = []
    changed = asyncio.Event()

    def on_change() -> None:
        changes.append((s.state_dir / "keys.json").read_bytes())
        changed.set()

    await s.start(on_change)
    await fake.wait_watching(1)
    fake.put_secret(NS, SECRET, {"keys.json": b"2"})
    await until(lambda: changes == [b"2"], changed)
    gets = len(fake.seen("GET", "/secrets/mlfe-keys$"))
    # Other objects move the version on; a bookmark tells the watch, so after the log is
    # compacted it resumes from the bookmark rather than reading the Secret again (410).
    fake.put_lease(NS, "other", {"holderIdentity": "x"})
    assert fake.bookmark() == 1
    await until(lambda: s._watch_rv == str(fake.rv))
    fake.compact()
    fake.drop_watches()
    await fake.wait_watching(2)
    assert len(fake.seen("GET", "/secrets/mlfe-keys$")) == gets
    fake.put_secret(NS, SECRET, {"keys.json": b"3"})
    await until(lambda: changes == [b"2", b"3"], changed)
    await s.close()


async def test_lists_page_and_an_object_leaving_a_selector_is_deleted(
        fake: FakeKubeApi, api: KubeApi) -> None:
    for i in range(3):
        fake.put_slice("models", f"iris-{i}", "iris", [ep(f"192.0.2.{10 + i}")])
    base = f"{fake.url}/apis/discovery.k8s.io/v1/namespaces/models/endpointslices"
    headers = {"Authorization": f"Bearer {fake.token}"}
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=fake.ca_file),
                                 headers=headers) as http:
        names: list[str] = []
        token = ""
        for _ in range(3):
            r = (await http.get(base, params={"limit": "2", "continue": token})).json()
            names += [i["metadata"]["name"] for i in r["items"]]
            token = r["metadata"].get("continue", "")
            if not token:
                break
        assert names == ["iris-0", "iris-1", "iris-2"]
    rv = (await api.list_endpoint_slices("models", "iris")).resource_version
    stream = api.watch_endpoint_slices("models", "iris", rv, 5)
    first = asyncio.ensure_future(anext(stream))
    await fake.wait_watching(1)
    fake.relabel("endpointslices", "models", "iris-1",
                 {"kubernetes.io/service-name": "other"})
    event = await asyncio.wait_for(first, 5)
    assert (event.type, event.name) == ("DELETED", "iris-1")
    await stream.aclose()


async def test_a_role_is_namespaced(fake: FakeKubeApi, api: KubeApi) -> None:
    """With Roles per namespace, a request where mlfe has none is 403, as RBAC has it."""
    fake.put_deployment("models", "iris", replicas=2)
    fake.roles = {NS: fake.rules}
    from deploy.kube.api import KubeError
    with pytest.raises(KubeError) as err:
        await api.get_scale("models", "iris")
    assert err.value.status == 403
    fake.roles = {NS: fake.rules, "models": fake.rules}
    assert (await api.get_scale("models", "iris")).replicas == 2
