"""The router's Role is least privilege, by test: what `mlfe serve` asks of the API server (the
fake's request log: verb, API group, resource, object name) is exactly what
deploy/kubernetes/role.yaml grants, both ways: nothing asked is refused, and nothing granted
goes unused."""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.fake_kube_api import Seen, allowed, manifest_rules
from tests.test_kube_shared_state import NS, SECRET, Pod, stored_keys, until

Grant = tuple[str, str, str, str | None]  # group, resource, verb, name (None: any)


def grants(rules: Iterable[Mapping[str, Any]]) -> set[Grant]:
    return {(g, r, v, n) for rule in rules for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]
            for n in (rule.get("resourceNames") or [None])}


def used(requests: Iterable[Seen], rules: Iterable[Mapping[str, Any]]) -> set[Grant]:
    """The grants the requests needed: each request maps to the narrowest grant that allows it
    (its name, when a rule names it)."""
    out: set[Grant] = set()
    for s in requests:
        if not s.verb:
            continue
        named = [g for g in grants(rules) if g[:3] == (s.group, s.resource, s.verb)
                 and g[3] is not None and g[3] == s.name]
        out.add(named[0] if named else (s.group, s.resource, s.verb, None))
    return out


async def test_the_role_grants_exactly_what_the_router_calls(tmp_path: Path) -> None:
    from tests.fake_kube_api import fake_cluster
    from tests.test_kube_shared_state import ADMIN, echo_replica

    async with fake_cluster(tmp_path) as fake, echo_replica() as replica_port:
        fake.put_deployment("models", "iris", replicas=2)  # the idle service scales to 1
        fake.put_secret(NS, SECRET, {"admin-token": ADMIN.encode()})
        pod = Pod(tmp_path, fake, "mlfe-router-0", replica_port)
        try:
            await until("ready", pod.ready, [pod], 60)
            r = await pod.admin("POST", "/v1/services/echo/regen-key",
                                json={"keyType": "Primary"})
            assert r.status_code == 200, r.text
            assert stored_keys(fake)["echo"]["primaryKey"] == r.json()["primaryKey"]

            async def scaled() -> bool:
                return bool(fake.deployment("models", "iris")["spec"]["replicas"] == 1)

            await until("the idle service scaled down", scaled, [pod], 30)
        finally:
            assert await pod.stop(signal.SIGTERM) == 0, pod.proc.log()[-3000:]
        rules = manifest_rules()
        refused = [(s.method, s.path, s.query) for s in fake.requests if s.status == 403]
        assert not refused  # everything the router asks is granted
        for s in fake.requests:
            if s.verb:
                assert allowed(rules, s.group, s.resource, s.verb, s.name), s
        # ... and everything granted is asked for: the Role is no wider than the code.
        assert used(fake.requests, rules) == grants(rules)
