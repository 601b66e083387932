"""`mlfe keys|regen-key|token|services|stats|endpoint ...` as a subprocess against a real router:
what it prints, what it changes, and how it fails (one line on stderr, exit 1, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.support import (
    DEADLINE_S,
    EXAMPLES,
    REPO,
    Proc,
    free_port,
    keys_of,
    start_replica,
    start_router,
)

ADMIN = "admin-token-for-cli-tests"
EP_KEY = "endpoint-key-" + "e" * 32
SVC_KEY = "service-key-" + "s" * 32
ENV_VARS = ("MLFE_ADMIN_TOKEN", "MLFE_ADMIN_URL")


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cluster:
    router: Proc
    admin_url: str

    def mlfe(self, *args: str, token: str | None = ADMIN, url: str | None = None,
             env: dict[str, str] | None = None, cwd: Path = REPO) -> Result:
        """`python -m deploy.cli ARGS` with the admin URL and token (from the environment)."""
        full_env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        full_env["MLFE_ADMIN_URL"] = url or self.admin_url
        if token is not None:
            full_env["MLFE_ADMIN_TOKEN"] = token
        full_env.update(env or {})
        return run_cli(list(args), full_env, cwd)

    def score(self, path: str, key: str) -> httpx.Response:
        return httpx.post(f"{self.router.url}/api/v1/{path}/score", json={"data": [1]},
                          headers={"Authorization": f"Bearer {key}"}, timeout=10)


def run_cli(args: list[str], env: dict[str, str], cwd: Path = REPO) -> Result:
    p = subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=60)
    r = Result(p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in r.err, r.err
    assert ADMIN not in r.out + r.err  # the admin token is never printed
    return r


def ok(r: Result) -> str:
    assert (r.code, r.err) == (0, ""), r
    return r.out


def failed(r: Result) -> str:
    """What a failure prints on stderr (exit 1, nothing on stdout): one line, or the server's
    message as it is (a config error names each problem on a line of its own)."""
    assert r.code == 1 and r.out == "", r
    assert r.err.startswith("mlfe: ") and r.err.endswith("\n"), r
    return r.err.strip()


def fields(out: str) -> dict[str, str]:
    """`key: value` lines."""
    pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def table(out: str) -> dict[str, list[str]]:
    """The rows of the table after the blank line (`endpoint show`), by their first cell."""
    rows = out.split("\n\n", 1)[1].splitlines()
    return {r.split()[0]: r.split() for r in rows}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    rep = start_replica(tmp_path_factory.mktemp("replica"), EXAMPLES / "echo" / "score.py")
    yield rep
    rep.stop()


def start(tmp: Path, replica: Proc, env: dict[str, str] | None = None) -> Cluster:
    admin_port = free_port()
    up = [f"127.0.0.1:{replica.port}"]
    cfg = {
        "router": {"admin_listen": f"127.0.0.1:{admin_port}", "state_dir": str(tmp / "state")},
        "services": {
            "blue": {"upstreams": up, "primary_key": SVC_KEY},
            "green": {"upstreams": up},
            "red": {"upstreams": up},
            "tok": {"upstreams": up, "auth_enabled": False, "token_auth_enabled": True},
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
    router = start_router(tmp, cfg, env={"MLFE_ADMIN_TOKEN": ADMIN} if env is None else env)
    return Cluster(router, f"http://127.0.0.1:{admin_port}")


@pytest.fixture
def cluster(tmp_path: Path, replica: Proc) -> Iterator[Cluster]:
    c = start(tmp_path, replica)
    yield c
    c.router.stop()


def version_of(c: Cluster, version: str) -> dict[str, object]:
    ep = json.loads(ok(c.mlfe("endpoint", "show", "myep", "--json")))
    versions: dict[str, dict[str, object]] = ep["versions"]
    return versions[version]


def test_keys_match_the_router(cluster: Cluster) -> None:
    primary, secondary = keys_of(cluster.router, "green")
    assert fields(ok(cluster.mlfe("keys", "green"))) == {
        "primaryKey": primary, "secondaryKey": secondary}
    assert json.loads(ok(cluster.mlfe("keys", "green", "--json"))) == {
        "primaryKey": primary, "secondaryKey": secondary}
    assert fields(ok(cluster.mlfe("keys", "blue")))["primaryKey"] == SVC_KEY
    # --endpoint: the endpoint's own keys.
    assert fields(ok(cluster.mlfe("keys", "myep", "--endpoint")))["primaryKey"] == EP_KEY
    assert fields(ok(cluster.mlfe("keys", "myep", "--endpoint"))) == dict(
        zip(["primaryKey", "secondaryKey"], keys_of(cluster.router, "myep"), strict=True))
    # The server's messages, one line each.
    assert failed(cluster.mlfe("keys", "nope")) == "mlfe: Service nope not found (HTTP 404)"
    assert "Endpoint blue not found" in failed(cluster.mlfe("keys", "blue", "--endpoint"))
    assert "tok has no keys" in failed(cluster.mlfe("keys", "tok"))


def test_regen_key_changes_the_key(cluster: Cluster) -> None:
    old_primary, secondary = keys_of(cluster.router, "green")
    assert cluster.score("service/green", old_primary).status_code == 200
    out = fields(ok(cluster.mlfe("regen-key", "green", "--key-type", "Primary")))
    new_primary = out["primaryKey"]
    assert new_primary != old_primary and out["secondaryKey"] == secondary
    assert keys_of(cluster.router, "green") == (new_primary, secondary)  # persisted
    assert cluster.score("service/green", old_primary).status_code == 401
    assert cluster.score("service/green", new_primary).status_code == 200
    assert cluster.score("service/green", secondary).status_code == 200

    # An endpoint's secondary key, in lower case (either spelling is obvious).
    _, old_secondary = keys_of(cluster.router, "myep")
    out = fields(ok(cluster.mlfe("regen-key", "myep", "--endpoint", "--key-type", "secondary")))
    assert out["primaryKey"] == EP_KEY and out["secondaryKey"] != old_secondary
    assert cluster.score("endpoint/myep", old_secondary).status_code == 401
    assert cluster.score("endpoint/myep", out["secondaryKey"]).status_code == 200

    r = cluster.mlfe("regen-key", "green", "--key-type", "Tertiary")
    assert r.code == 2 and "invalid choice" in r.err  # argparse: a usage error
    assert keys_of(cluster.router, "green") == (new_primary, secondary)


def test_token_is_a_working_bearer_token(cluster: Cluster) -> None:
    data = json.loads(ok(cluster.mlfe("token", "tok", "--json")))
    assert set(data) == {"accessToken", "tokenType", "refreshAfter", "expiryOn"}
    assert data["tokenType"] == "Bearer"
    assert data["refreshAfter"] < data["expiryOn"]
    assert cluster.score("service/tok", data["accessToken"]).status_code == 200
    assert cluster.score("service/tok", "not-a-token").status_code == 401

    out = fields(ok(cluster.mlfe("token", "tok")))
    assert out["tokenType"] == "Bearer"
    # Epoch seconds, then the same instant in UTC (a second token: a little later).
    epoch, when = out["expiryOn"].split(" ", 1)
    assert data["expiryOn"] <= int(epoch) <= data["expiryOn"] + DEADLINE_S
    assert when == datetime.fromtimestamp(int(epoch), UTC).strftime("(%Y-%m-%dT%H:%M:%SZ)")
    assert cluster.score("service/tok", out["accessToken"]).status_code == 200
    # A key-auth service has no tokens: the server says so.
    assert "token auth is not enabled for blue" in failed(cluster.mlfe("token", "blue"))


def test_endpoint_show_list_and_set_version(cluster: Cluster) -> None:
    out = ok(cluster.mlfe("endpoint", "show", "myep"))
    assert fields(out)["defaultVersion"] == "v1"
    rows = table(out)
    assert rows["VERSION"] == ["VERSION", "SERVICE", "TRAFFIC", "EFFECTIVE", "DEFAULT", "CONTROL"]
    assert rows["v1"] == ["v1", "blue", "20", "70", "no", "no"]
    assert rows["v2"] == ["v2", "green", "30", "30", "no", "no"]
    listed = ok(cluster.mlfe("endpoint", "list"))
    assert "myep" in listed and "v1=70% v2=30%" in listed

    # An existing version: only the given fields change (PATCH).
    out = ok(cluster.mlfe("endpoint", "set-version", "myep", "v2", "--traffic-percentile", "50"))
    assert table(out)["v2"] == ["v2", "green", "50", "50", "no", "no"]
    assert version_of(cluster, "v2") == {
        "service": "green", "trafficPercentile": 50, "isDefault": False,
        "isControlVersion": False, "effectiveTrafficPercentile": 50}
    assert version_of(cluster, "v1")["effectiveTrafficPercentile"] == 50

    # A new version (PUT), made the default: the old default is unmarked.
    ok(cluster.mlfe("endpoint", "set-version", "myep", "v3", "--service", "red",
                    "--traffic-percentile", "10", "--default"))
    v3 = version_of(cluster, "v3")
    assert (v3["service"], v3["isDefault"], v3["effectiveTrafficPercentile"]) == ("red", True, 30)
    assert version_of(cluster, "v1")["isDefault"] is False
    assert version_of(cluster, "v1")["effectiveTrafficPercentile"] == 20
    seen = {cluster.score("endpoint/myep/v3", EP_KEY).headers["azureml-model-deployment"]}
    assert seen == {"v3"}

    # update-version is PATCH; --control / --no-control set and clear the flag.
    ok(cluster.mlfe("endpoint", "update-version", "myep", "v1", "--control"))
    assert version_of(cluster, "v1")["isControlVersion"] is True
    ok(cluster.mlfe("endpoint", "update-version", "myep", "v1", "--no-control"))
    assert version_of(cluster, "v1")["isControlVersion"] is False

    # create-version refuses an existing version; update-version an unknown one.
    msg = failed(cluster.mlfe("endpoint", "create-version", "myep", "v1", "--service", "red"))
    assert "version v1 of endpoint myep already exists" in msg
    assert version_of(cluster, "v1")["service"] == "blue"
    msg = failed(cluster.mlfe("endpoint", "update-version", "myep", "v9", "--traffic-percentile", "1"))
    assert msg == "mlfe: Version v9 of endpoint myep not found (HTTP 404)"
    msg = failed(cluster.mlfe("endpoint", "set-version", "myep", "v9", "--traffic-percentile", "1"))
    assert "a new version needs --service" in msg
    assert "nothing to change" in failed(cluster.mlfe("endpoint", "set-version", "myep", "v1"))
    ok(cluster.mlfe("endpoint", "create-version", "myep", "v4", "--service", "green"))
    assert version_of(cluster, "v4")["trafficPercentile"] == 0


def test_a_bad_change_is_refused_with_the_servers_message(cluster: Cluster) -> None:
    msg = failed(cluster.mlfe("endpoint", "set-version", "myep", "v2", "--traffic-percentile", "95"))
    assert "traffic percentiles sum to 115, over 100" in msg and msg.endswith("(HTTP 400)")
    assert len(msg.splitlines()) == 2  # "change: invalid configuration:" and the reason
    assert version_of(cluster, "v2")["trafficPercentile"] == 30  # nothing changed
    msg = failed(cluster.mlfe("endpoint", "set-version", "myep", "v5", "--service", "nope"))
    assert "unknown service 'nope'" in msg
    msg = failed(cluster.mlfe("endpoint", "show", "nope"))
    assert msg == "mlfe: Endpoint nope not found (HTTP 404)"


def test_delete_version(cluster: Cluster) -> None:
    out = ok(cluster.mlfe("endpoint", "delete-version", "myep", "v1"))
    assert out == "deleted version v1 of endpoint myep\n"
    ep = json.loads(ok(cluster.mlfe("endpoint", "show", "myep", "--json")))
    assert set(ep["versions"]) == {"v2"} and ep["defaultVersion"] == "v2"
    assert cluster.score("endpoint/myep/v1", EP_KEY).status_code == 404
    msg = failed(cluster.mlfe("endpoint", "delete-version", "myep", "v1"))
    assert msg == "mlfe: Version v1 of endpoint myep not found (HTTP 404)"


def test_services_and_stats(cluster: Cluster) -> None:
    out = ok(cluster.mlfe("services"))
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert out.split()[:4] == ["NAME", "REPLICAS", "AUTH", "SCORING"]
    assert set(rows) == {"blue", "green", "red", "tok"}
    assert rows["blue"][1:3] == ["1/1", "key"] and rows["tok"][2] == "token"
    assert rows["blue"][3] == f"{cluster.router.url}/api/v1/service/blue/score"
    shown = fields(ok(cluster.mlfe("services", "blue")))
    assert shown["scoringUri"] == f"{cluster.router.url}/api/v1/service/blue/score"

    for _ in range(3):
        assert cluster.score("service/blue", SVC_KEY).status_code == 200

    def settled() -> bool:  # the router counts a request done as it finishes, maybe just after
        stats = json.loads(ok(cluster.mlfe("stats", "--json")))["services"]["blue"]
        return bool(stats["completed"] == 3 and stats["busy"] == 0)

    cluster.router.wait_for(settled, "3 requests completed")
    out = ok(cluster.mlfe("stats"))
    header, *lines = out.splitlines()
    assert header.split() == ["SERVICE", "REPLICAS", "BUSY", "QUEUED", "UTILIZATION",
                              "COMPLETED", "DESIRED"]
    stats = {line.split()[0]: line.split() for line in lines}
    assert stats["blue"] == ["blue", "1", "0", "0", "0%", "3", "-"]  # not autoscaled: no DESIRED
    assert stats["red"] == ["red", "1", "0", "0", "0%", "0", "-"]


def test_wrong_token_is_a_401(cluster: Cluster) -> None:
    msg = failed(cluster.mlfe("keys", "blue", token="wrong-token"))
    assert msg.startswith("mlfe: Unauthorized (HTTP 401)")
    assert "wrong-token" not in msg
    # --token wins over the environment.
    assert "(HTTP 401)" in failed(cluster.mlfe("stats", "--token", "wrong-token"))
    ok(cluster.mlfe("stats", "--token", ADMIN, token="wrong-token"))


def test_token_from_the_state_dir(tmp_path: Path, replica: Proc) -> None:
    """With no MLFE_ADMIN_TOKEN, the router generates one in its state dir and the CLI reads it
    from --state-dir (default .mlfe, relative to the working directory)."""
    c = start(tmp_path, replica, env={})
    try:
        state = c.router.extra["state_dir"]
        assert (state / "admin-token").exists()
        ok(c.mlfe("stats", "--state-dir", str(state), token=None))
        # The default: ./.mlfe
        (tmp_path / ".mlfe").symlink_to(state)
        ok(c.mlfe("stats", token=None, cwd=tmp_path, env={"PYTHONPATH": str(REPO)}))
        msg = failed(c.mlfe("stats", "--state-dir", str(tmp_path / "none"), token=None))
        assert msg.startswith("mlfe: no admin token: pass --token, set MLFE_ADMIN_TOKEN")
    finally:
        c.router.stop()


def test_no_router_listening(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    for args in (["keys", "blue"], ["endpoint", "list"], ["stats"]):
        r = run_cli([*args, "--admin-url", f"127.0.0.1:{port}", "--token", ADMIN], env)
        msg = failed(r)
        assert f"cannot reach the mlfe admin API at http://127.0.0.1:{port}" in msg
        assert "connection refused" in msg and "Is `mlfe serve`" in msg
    # The default URL comes from MLFE_ADMIN_URL.
    r = run_cli(["stats"], {**env, "MLFE_ADMIN_URL": f"http://127.0.0.1:{port}/",
                            "MLFE_ADMIN_TOKEN": ADMIN})
    assert f"at http://127.0.0.1:{port} (connection refused)" in failed(r)
