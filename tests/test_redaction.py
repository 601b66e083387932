"""Secrets never in errors or logs: a canary placed wherever a secret could hide in a config (a
key, an environment variable, tags, a misspelt key, a URL's userinfo or query, a YAML line) must
appear in no error message and no log line, while values that cannot be secrets (numbers,
choices, addresses) are still shown. Checked on the parsers and on real `mlfe serve` and
`mlfe sidecar` processes (their stderr and the router's own log)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.config_file import load_config
from deploy.sidecar import SidecarConfigError, settings_from_env
from mlfe.config import ConfigError, parse_config
from mlfe.redact import redact_url, redact_urls_in
from mlfe.synthetic_spec import parse_spec
from router.tokens import ExternalJwks
from tests.support import REPO, start_router

CANARY = "s3cr3t-canary"
LONG_CANARY = CANARY + "-0123456789abcdef"  # as long as a key
NUMERIC_CANARY = 73317331  # a PIN: a number is a secret too, under a user's own key
URL = f"https://user:{CANARY}@idp.example:8443/keys/jwks?token={CANARY}#{CANARY}"
UP = {"upstreams": ["127.0.0.1:5001"]}


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return str(e.value)


# ---- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    (URL, "https://idp.example:8443/keys/jwks?…"),
    ("https://login.example/tenant/discovery/v2.0/keys",
     "https://login.example/tenant/discovery/v2.0/keys"),
    (f"http://{CANARY}@[::1]:80/jwks", "http://[::1]:80/jwks"),
    (f"ftp://u:{CANARY}@h/", "ftp://h/"),
    (CANARY, "<not a URL>"),  # not a URL at all: still not shown
    (f"http://h:{CANARY}/", "<unparsable URL>"),
])
def test_a_url_loses_its_userinfo_and_query(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_urls_inside_a_message_are_redacted() -> None:
    text = f"Client error '404 Not Found' for url '{URL}'\nsee https://docs.example/404"
    out = redact_urls_in(text)
    assert CANARY not in out
    assert "for url 'https://idp.example:8443/keys/jwks?…'" in out
    assert "https://docs.example/404" in out


def test_jwks_url_is_redacted_in_the_plain_http_warning_and_errors(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="router.tokens"):
        ExternalJwks("https://idp.example", "aud",
                     jwks_url=f"http://user:{CANARY}@idp.example/jwks?token={CANARY}")
    assert "plain http" in caplog.text and "http://idp.example/jwks?…" in caplog.text
    assert CANARY not in caplog.text
    with pytest.raises(ValueError) as exc:
        ExternalJwks("https://idp.example", "aud", jwks_url=f"ftp://u:{CANARY}@h/jwks")
    assert "jwks_url ftp://h/jwks is not http(s)" in str(exc.value)
    assert CANARY not in str(exc.value)


# ---- config errors: what is hidden, what is shown ---------------------------------------------


def service(**keys: Any) -> dict[str, Any]:
    return {"services": {"svc": {**UP, **keys}}}


# Each: a config with the canary in one place, and the key path its error must still name.
HIDDEN: dict[str, tuple[dict[str, Any], str]] = {
    "a key too short": (service(primary_key=CANARY), "services.svc.primary_key: String should"),
    "a key of the wrong type": (service(secondary_key=[CANARY]), "services.svc.secondary_key"),
    "a misspelt key": (service(primary_kye=CANARY), "services.svc.primary_kye: Extra inputs"),
    "a misspelt key, long value": (service(primary_kye=LONG_CANARY), "services.svc.primary_kye"),
    "a misspelt section": ({"routr": {"primary_key": CANARY}}, "routr: Extra inputs"),
    "a misspelt nested key": (service(kubernetes={"namespace": "n", "deployment": "d",
                                                  "token": CANARY}),
                              "services.svc.kubernetes.token"),
    "an environment variable": (service(environment_variables={"DB_PASSWORD": [CANARY]}),
                                "services.svc.environment_variables.DB_PASSWORD"),
    # A user's key named like a setting whose values are shown: still the user's value.
    "an environment variable named listen": (
        service(environment_variables={"listen": NUMERIC_CANARY}),
        "services.svc.environment_variables.listen"),
    "a number as a tag": (service(tags={"pin": NUMERIC_CANARY}), "services.svc.tags.pin"),
    "a tag": (service(tags={"owner": {"name": CANARY}}), "services.svc.tags.owner"),
    "a property": (service(properties={"p": [CANARY]}), "services.svc.properties.p"),
    "a description": (service(description=[CANARY]), "services.svc.description"),
    "a sample input": (service(sample_input={"data": CANARY}), "services.svc.sample_input"),
    "an endpoint's key": ({**service(), "endpoints": {"ep-one": {
        "primary_key": CANARY, "versions": {"v1": {"service": "svc"}}}}},
        "endpoints.ep-one.primary_key"),
    "a version's tags": ({**service(), "endpoints": {"ep-one": {
        "versions": {"v1": {"service": "svc", "tags": {"t": 1}}}}}},
        "endpoints.ep-one.versions.v1.tags.t"),
    "a jwks_url in a refused issuer": ({"router": {"token_issuers": [
        {"issuer": "i", "audience": "a", "jwks_url": URL, "jwks_file": "x.json"}]}},
        "router.token_issuers.0: exactly one of jwks_file or jwks_url is required"),
    "a jwks_url of the wrong type": ({"router": {"token_issuers": [
        {"issuer": "i", "audience": "a", "jwks_url": [URL]}]}},
        "router.token_issuers.0.jwks_url"),
    "an upstream with a password": (service(upstreams=[f"http://u:{CANARY}@h:5001"]),
                                    "services.svc.upstreams.0"),
    "a listen address with a password": ({"router": {"listen": f"u:{CANARY}@h:80"}},
                                         "router.listen"),
    "a key pasted into a number": (service(scoring_timeout_ms=LONG_CANARY),
                                   "services.svc.scoring_timeout_ms: Input should be"),
    "a key pasted into a choice": ({"router": {"log_format": LONG_CANARY}},
                                   "router.log_format: Input should be"),
    "a password pasted into a boolean": (service(auth_enabled=f"{CANARY}!"),
                                         "services.svc.auth_enabled"),
    "a misspelt key in a synthetic spec": ({"services": {"svc": {
        "synthetic": f"latncy={CANARY}"}}}, "services.svc.synthetic.latncy"),
}


@pytest.mark.parametrize("case", sorted(HIDDEN))
def test_a_secret_is_never_in_a_config_error(case: str) -> None:
    data, named = HIDDEN[case]
    msg = refused(data)
    assert named in msg, msg
    assert CANARY not in msg and str(NUMERIC_CANARY) not in msg, msg


@pytest.mark.parametrize(("data", "shown"), [
    (service(scoring_timeout_ms=-5),
     "services.svc.scoring_timeout_ms: Input should be greater than 0 (got -5)"),
    (service(replica_max_concurrent_requests="lots"), "(got 'lots')"),
    (service(auth_enabled="maybe"), "services.svc.auth_enabled: Input should be a valid "
                                    "boolean, unable to interpret input (got 'maybe')"),
    (service(autoscale_target_utilization=150), "(got 150)"),
    (service(upstreams=["127.0.0.1:5001", "localhost"]),
     "services.svc.upstreams.1: expected HOST:PORT (got 'localhost')"),
    (service(upstreams=["my-model.prod.svc.cluster.local"]),
     "(got 'my-model.prod.svc.cluster.local')"),  # an address may be long
    ({"router": {"listen": "8080"}}, "router.listen: expected HOST:PORT (got '8080')"),
    ({"router": {"log_format": "xml"}}, "router.log_format: Input should be 'json' or 'text' "
                                        "(got 'xml')"),
    ({"router": {"workers": "many"}}, "(got 'many')"),
    ({"router": {"max_body_bytes": None}}, "(got None)"),
    (service(namespace="Bad_NS"), "services.svc.namespace: not a Kubernetes namespace name "),
    (service(namespace="Bad_NS"), "(got 'Bad_NS')"),
])
def test_values_that_cannot_be_secrets_are_still_shown(data: dict[str, Any], shown: str) -> None:
    assert shown in refused(data)


def test_a_synthetic_spec_shows_numbers_not_typos() -> None:
    with pytest.raises(ValueError) as exc:
        parse_spec(f"error_rate=7,latncy={CANARY}")
    assert "error_rate: Input should be less than or equal to 1 (got 7)" in str(exc.value)
    assert "latncy: Extra inputs are not permitted" in str(exc.value)
    assert CANARY not in str(exc.value)


# ---- YAML syntax errors: where, not the line --------------------------------------------------


@pytest.mark.parametrize(("text", "where"), [
    (f"router:\n  listen: 127.0.0.1:8080\nprimary_key {CANARY}\nservices: {{}}\n",
     "line 3, column 1: while scanning a simple key; line 4, column 1: could not find expected "
     "':'"),
    (f'router:\n  listen: "{CANARY}\n', "line 2, column 11: while scanning a quoted scalar"),
    (f"a: *{CANARY}\n", "line 1, column 4: found undefined alias '…'"),
    (f"a: !{CANARY} x\n", "line 1, column 4: could not determine a constructor"),
    (f'a: "\\q{CANARY}"\n', "found unknown escape character 'q'"),
    (f"a: b: {CANARY}\n", "line 1, column 5: mapping values are not allowed here"),
    (f"a: \x01{CANARY}\n", "character 3: special characters are not allowed"),
])
def test_a_yaml_error_names_line_and_column_not_the_text(
        tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "mlfe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert f"{path}: not valid YAML: " in str(exc.value)
    assert where in str(exc.value), str(exc.value)
    assert CANARY not in str(exc.value)


def test_a_config_that_is_not_utf8_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "mlfe.yaml"
    path.write_bytes(b"a: 1\nb: \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 8\)"):
        load_config(path)


# ---- the sidecar's environment ------------------------------------------------------------------


SIDECAR_HIDDEN: dict[str, tuple[dict[str, str], str]] = {
    "a key too short": ({"MLFE_PRIMARY_KEY": CANARY}, "MLFE_PRIMARY_KEY: String should"),
    "a misspelt variable": ({"MLFE_PRIMARY_KYE": CANARY}, "MLFE_PRIMARY_KYE: unknown variable"),
    "tags not JSON": ({"MLFE_TAGS": f'{{"owner": "{CANARY}"'}, "MLFE_TAGS: not valid JSON"),
    "a tag of the wrong type": ({"MLFE_TAGS": f'{{"owner": ["{CANARY}"]}}'}, "MLFE_TAGS.owner"),
    "issuers not JSON": ({"MLFE_TOKEN_ISSUERS": f'[{{"jwks_url": "{URL}"'},
                         "MLFE_TOKEN_ISSUERS: not valid JSON"),
    "a refused issuer": ({"MLFE_TOKEN_ISSUERS":
                          f'[{{"issuer": "i", "audience": "a", "jwks_url": "{URL}", '
                          '"jwks_file": "x"}]'}, "MLFE_TOKEN_ISSUERS[0]: exactly one of"),
    "a misspelt issuer key": ({"MLFE_TOKEN_ISSUERS":
                               f'[{{"issuer": "i", "audience": "a", "jwks_url": "https://h/", '
                               f'"secret": "{CANARY}"}}]'}, "MLFE_TOKEN_ISSUERS[0].secret"),
    "a key beside a rule across settings": (
        {"MLFE_TOKEN_AUTH_ENABLED": "true", "MLFE_PRIMARY_KEY": LONG_CANARY},
        "MLFE_AUTH_ENABLED and MLFE_TOKEN_AUTH_ENABLED cannot both be true"),
    "a key pasted into a number": ({"MLFE_SCORING_TIMEOUT_MS": LONG_CANARY},
                                   "MLFE_SCORING_TIMEOUT_MS: Input should be"),
    "an upstream with a password": ({"MLFE_UPSTREAM": f"http://u:{CANARY}@h:5001"},
                                    "MLFE_UPSTREAM:"),
}


@pytest.mark.parametrize("case", sorted(SIDECAR_HIDDEN))
def test_a_secret_is_never_in_a_sidecar_error(case: str) -> None:
    env, named = SIDECAR_HIDDEN[case]
    with pytest.raises(SidecarConfigError) as exc:
        settings_from_env(env)
    assert named in str(exc.value), str(exc.value)
    assert CANARY not in str(exc.value), str(exc.value)


# ---- real processes: stderr of a refused config, the log of a running router ------------------


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


def test_mlfe_serve_refuses_a_bad_yaml_without_showing_it(tmp_path: Path) -> None:
    path = tmp_path / "mlfe.yaml"
    path.write_text(f"services:\n  svc:\n    upstreams: [127.0.0.1:5001]\n"
                    f"    primary_key {CANARY}\n")
    result = run_cli(["serve", "--config", str(path)])
    assert result.returncode == 2, result.stderr
    assert "not valid YAML: line 4, column 5" in result.stderr
    assert CANARY not in result.stderr + result.stdout


def test_mlfe_serve_refuses_a_bad_config_without_showing_any_secret(tmp_path: Path) -> None:
    # Every place at once: the whole message is checked, as the user sees it.
    services: dict[str, Any] = {}
    for i, case in enumerate(sorted(HIDDEN)):
        data, _ = HIDDEN[case]
        for name, svc in data.get("services", {}).items():
            services[f"{name}-{i}"] = svc
    path = tmp_path / "mlfe.yaml"
    path.write_text(yaml.safe_dump({
        "router": {"listen": f"u:{CANARY}@h:80", "log_format": LONG_CANARY,
                   "token_issuers": [{"issuer": "i", "audience": "a", "jwks_url": [URL]}]},
        "services": services,
        "routr": {"primary_key": CANARY},
    }))
    result = run_cli(["serve", "--config", str(path)])
    assert result.returncode == 2, result.stderr
    for named in ("services.svc-0.", "router.listen", "router.log_format", "routr",
                  "router.token_issuers.0.jwks_url", "primary_kye", "environment_variables"):
        assert named in result.stderr, result.stderr
    assert CANARY not in result.stderr + result.stdout
    assert str(NUMERIC_CANARY) not in result.stderr + result.stdout


def test_mlfe_serve_refuses_a_bad_jwks_url_without_its_credentials(tmp_path: Path) -> None:
    path = tmp_path / "mlfe.yaml"
    path.write_text(yaml.safe_dump({
        "router": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                   "state_dir": str(tmp_path / "state"),
                   "token_issuers": [{"issuer": "https://idp.example", "audience": "a",
                                      "jwks_url": f"ftp://u:{CANARY}@h/jwks?t={CANARY}"}]},
        "services": {"svc": UP},
    }))
    result = run_cli(["serve", "--config", str(path)])
    assert result.returncode == 2, result.stderr
    assert "jwks_url ftp://h/jwks?… is not http(s)" in result.stderr
    assert CANARY not in result.stderr + result.stdout


def test_mlfe_sidecar_refuses_its_environment_without_showing_a_secret() -> None:
    env = {k: v for case in SIDECAR_HIDDEN.values() for k, v in case[0].items()
           if k != "MLFE_TOKEN_AUTH_ENABLED"}
    result = run_cli(["sidecar"], env=env)
    assert result.returncode == 2, result.stderr
    assert "MLFE_PRIMARY_KYE: unknown variable" in result.stderr
    assert CANARY not in result.stderr + result.stdout


class NotFound:
    """A JWKS URL that answers 404 to everything (a raw socket server in a thread), so that the
    router logs its failed refresh; it records the request lines it got."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data.split(b"\r\n", 1)[0])
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def not_found() -> Iterator[NotFound]:
    server = NotFound()
    try:
        yield server
    finally:
        server.close()


def test_a_running_router_logs_no_secret(tmp_path: Path, not_found: NotFound) -> None:
    jwks_url = f"http://user:{CANARY}@127.0.0.1:{not_found.port}/jwks?token={CANARY}"
    router = start_router(tmp_path, {
        "router": {"token_issuers": [{"issuer": "https://idp.example", "audience": "mlfe",
                                      "jwks_url": jwks_url}]},
        "services": {"svc": {
            **UP, "primary_key": LONG_CANARY, "secondary_key": LONG_CANARY + "-2",
            "environment_variables": {"DB_PASSWORD": CANARY}, "tags": {"t": CANARY},
            "properties": {"p": CANARY}, "description": CANARY, "sample_input": CANARY,
            # accepted and logged as without effect here: by name only
            "compute_target_name": CANARY,
        }},
    })
    try:
        router.wait_for(lambda: "could not refresh keys" in router.log(), "the failed refresh")
        assert not_found.requests, "the router never fetched the JWKS"
        assert CANARY.encode() in not_found.requests[0]  # the real URL was used...
    finally:
        router.signal(signal.SIGTERM)
        router.wait_exit()
    log = router.log()
    # ... and only its redacted form was logged.
    assert f"127.0.0.1:{not_found.port}/jwks" in log and "HTTP 404" in log
    assert "services.svc.compute_target_name" in log
    assert CANARY not in log
