"""Differential tests: Azure ML entry scripts under `mlfe score-server`, under Microsoft's own
server (azureml-inference-server-http, `azmlinfsrv`) and behind `mlfe serve`'s router.

Every script in tests/azureml_corpus runs as real processes on loopback: once under mlfe, once
under azmlinfsrv. Each case sends the same request to both and asserts the same status, body
(JSON compared as values: json.dumps puts spaces where orjson does not) and the headers clients
read. Where mlfe differs on purpose, the case says so and asserts the difference.

azmlinfsrv runs from its own virtualenv (`.venv-azureml`, made by `make setup`): it pins
pydantic~=2.12 and opentelemetry==1.33, which would move mlfe's own dependencies back if both
shared one environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import REPO, Proc, _track, free_port, spawn, start_router

CORPUS = Path(__file__).parent / "azureml_corpus"
START_DEADLINE_S = 90.0  # azmlinfsrv (gunicorn + flask + pandas) starts slowly on a busy machine
SCORING_TIMEOUT_MS = 400
# Scripts served by every server (init_fails never comes up: tested on its own).
SCRIPTS = ["raw_str", "schema_numpy", "schema_pandas", "schema_standard", "rawhttp", "run_fails",
           "returns"]
ENV = {"SCORING_TIMEOUT_MS": str(SCORING_TIMEOUT_MS), "SERVICE_NAME": "corpus"}
# azmlinfsrv binds 0.0.0.0 unconditionally; the launcher points it at loopback instead.
AZ_LAUNCHER = (
    "import sys, azureml_inference_server_http.constants as c; c.DEFAULT_HOST = '127.0.0.1'; "
    "sys.argv[0] = 'azmlinfsrv'; "
    "from azureml_inference_server_http.amlserver import run; run()"
)
IDS = {"x-request-id": "req-0001", "x-ms-client-request-id": "client-0001"}
RUN_FAILED = "An unexpected error occurred in scoring script. Check the logs for more info."
INTERNAL = "An unexpected internal error occurred. Check the logs for more info."


# -- the servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def azmlinfsrv_python() -> Path:
    """The interpreter of the virtualenv `make setup` installs mlfe[azureml] into (or the one
    MLFE_AZMLINFSRV_PYTHON names)."""
    python = Path(os.environ.get("MLFE_AZMLINFSRV_PYTHON") or REPO / ".venv-azureml" / "bin" / "python")
    if not python.exists():
        pytest.skip(f"no {python} (make setup installs mlfe[azureml] there)")
    return python


def _healthy(p: Proc) -> bool:
    try:
        return httpx.get(p.url + "/", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


class GroupProc(Proc):
    """azmlinfsrv is gunicorn: a master and its workers, in a session of their own. Stopping
    kills the whole group: a killed master would leave its workers running."""

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def start_azmlinfsrv(python: Path, script: str, log_dir: Path, env: dict[str, str]) -> Proc:
    port = free_port()
    log_path = log_dir / f"azmlinfsrv-{script}-{port}.log"
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("WORKER_COUNT", "AML_APP_ROOT", "AZUREML_ENTRY_SCRIPT")}
    full_env.update({"PYTHONUNBUFFERED": "1", **env})
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [str(python), "-c", AZ_LAUNCHER, "--entry_script", f"{script}.py", "--port", str(port)],
            cwd=CORPUS, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, start_new_session=True,
        )
    return _track(GroupProc(proc, log_path, port))


def start_mlfe(script: str, log_dir: Path, env: dict[str, str]) -> Proc:
    port = free_port()
    return spawn(
        ["score-server", "--entry-script", str(CORPUS / f"{script}.py"), "--port", str(port)],
        log_dir / f"mlfe-{script}-{port}.log", port, env,
    )


@dataclass
class Servers:
    mlfe: dict[str, Proc] = field(default_factory=dict)
    az: dict[str, Proc] = field(default_factory=dict)
    router: Proc | None = None


def _wait_all(procs: list[Proc]) -> None:
    def wait(p: Proc) -> None:
        p.wait_for(lambda: _healthy(p), f"{p.log_path.name} healthy", timeout=START_DEADLINE_S)

    with ThreadPoolExecutor(max_workers=len(procs)) as pool:
        for future in [pool.submit(wait, p) for p in procs]:
            future.result()


@pytest.fixture(scope="module")
def servers(azmlinfsrv_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Every corpus script under mlfe and under azmlinfsrv, plus a router serving them (once)."""
    tmp = tmp_path_factory.mktemp("differential")
    out = Servers()
    try:
        for script in SCRIPTS:
            out.az[script] = start_azmlinfsrv(azmlinfsrv_python, script, tmp, ENV)
            out.mlfe[script] = start_mlfe(script, tmp, ENV)
        services = {
            service_name(script): {
                "entry_script": str(CORPUS / f"{script}.py"),
                "auth_enabled": False,
                "num_replicas": 1,
                "initial_delay_seconds": int(START_DEADLINE_S),
                "environment_variables": ENV,
            }
            for script in SCRIPTS
        }
        _wait_all([*out.az.values(), *out.mlfe.values()])
        out.router = start_router(tmp, {"services": services})
        out.router.wait_for(
            lambda: all(_router_ready(out.router, service_name(s)) for s in SCRIPTS),  # type: ignore[arg-type]
            "every service's replica", timeout=START_DEADLINE_S,
        )
        yield out
    finally:
        for p in [*out.az.values(), *out.mlfe.values(), *([out.router] if out.router else [])]:
            p.stop()


def service_name(script: str) -> str:
    return script.replace("_", "-")  # service names take no "_"


def _router_ready(router: Proc, service: str) -> bool:
    try:
        response = httpx.options(f"{router.url}/api/v1/service/{service}/score", timeout=5)
    except httpx.TransportError:
        return False
    return response.status_code != 503


# -- one request, both servers -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    script: str
    method: str
    path: str = "/score"
    headers: dict[str, str] | list[tuple[str, str]] = field(default_factory=dict)
    body: bytes | None = None
    json_body: Any = None
    # Response headers (besides the fixed set) to compare, e.g. a script's own.
    read_headers: tuple[str, ...] = ()
    id: str = ""

    def send(self, base: str) -> httpx.Response:
        pairs = list(self.headers.items() if isinstance(self.headers, dict) else self.headers)
        headers = [*IDS.items(), *pairs]
        content = self.body
        if self.json_body is not None:
            content = json.dumps(self.json_body).encode()
            if not any(k.lower() == "content-type" for k, _ in pairs):
                headers.append(("content-type", "application/json"))
        return httpx.request(self.method, base + self.path, headers=headers, content=content,
                             timeout=30)


def body_of(response: httpx.Response) -> Any:
    if response.headers.get("content-type", "").startswith("application/json") and response.content:
        return response.json()
    return response.content


def mimetype(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip()


def assert_same(ours: httpx.Response, theirs: httpx.Response, case: Case,
                *, request_ids: bool = True) -> None:
    """What clients read: status, body, content type, the azureml headers, the script's own."""
    assert (ours.status_code, body_of(ours)) == (theirs.status_code, body_of(theirs))
    assert mimetype(ours) == mimetype(theirs)
    assert ours.headers.get("x-ms-run-function-failed") == theirs.headers.get(
        "x-ms-run-function-failed")
    assert ("x-ms-run-fn-exec-ms" in ours.headers) == ("x-ms-run-fn-exec-ms" in theirs.headers)
    if request_ids:
        for name in ("x-request-id", "x-ms-request-id", "x-ms-client-request-id"):
            assert ours.headers.get(name) == theirs.headers.get(name), name
    for name in case.read_headers:
        assert ours.headers.get_list(name) == theirs.headers.get_list(name), name


def both(servers: Servers, case: Case) -> tuple[httpx.Response, httpx.Response]:
    return case.send(servers.mlfe[case.script].url), case.send(servers.az[case.script].url)


BINARY = bytes(range(256)) * 4
MULTIPART_BOUNDARY = "corpusboundary"
MULTIPART = (
    f"--{MULTIPART_BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="field"\r\n\r\n'
    "value 1\r\n"
    f"--{MULTIPART_BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="image"; filename="pixel.png"\r\n'
    "Content-Type: image/png\r\n\r\n"
).encode() + BINARY + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode()

CASES = [
    # Undecorated run(raw_data): the body as a str, whatever its content type.
    Case("raw_str", "POST", json_body={"data": [1, 2, 3]}, id="raw-json-documented"),
    Case("raw_str", "POST", body=b"hello", headers={"content-type": "text/plain",
                                                   "x-custom-header": "v1"}, id="raw-text"),
    Case("raw_str", "POST", body=b"no content type", id="raw-no-content-type"),
    Case("raw_str", "POST", body="h\u00e9llo".encode(), id="raw-utf8"),
    Case("raw_str", "POST", body=b"", id="raw-empty"),
    Case("raw_str", "POST", body=b"\xff\xfe", id="raw-not-utf8-400"),
    Case("raw_str", "GET", path="/score?a=1&b=[1,2]&c=x&c=y&d=null", id="raw-get-query"),
    Case("raw_str", "POST", body=b"dup", headers=[("x-custom-header", "a"), ("x-custom-header", "b")],
         id="raw-repeated-header"),
    Case("raw_str", "OPTIONS", id="raw-options"),
    Case("raw_str", "HEAD", id="raw-head-405"),
    Case("raw_str", "GET", path="/", id="health"),
    Case("raw_str", "GET", path="/swagger.json", id="swagger-undecorated"),
    Case("raw_str", "GET", path="/swagger.json?version=3", id="swagger-undecorated-v3"),
    Case("raw_str", "GET", path="/swagger.json?version=4", id="swagger-bad-version"),
    Case("raw_str", "POST", body=b"x", headers={"x-ms-request-id": "legacy-1"}, id="legacy-request-id"),
    Case("raw_str", "POST", body=b"x", headers={"x-ms-request-id": "m" * 101},
         id="legacy-request-id-too-long-431"),
    # A second client request id: joined with the first (and then too long).
    Case("raw_str", "POST", body=b"x", headers={"x-ms-client-request-id": "c" * 101},
         id="repeated-client-request-id-431"),
    Case("raw_str", "POST", body=b"x", headers={"x-ms-client-request-id": "c2"},
         id="repeated-client-request-id"),
    # inference-schema: numpy.
    Case("schema_numpy", "POST", json_body={"data": [[1, 2, 3], [4, 5, 6]]}, id="numpy"),
    Case("schema_numpy", "GET", path="/score?data=[[1,2,3]]", id="numpy-get"),
    Case("schema_numpy", "POST", json_body={"data": [[1, 2]]}, id="numpy-wrong-shape-500"),
    Case("schema_numpy", "POST", json_body={"other": 1}, id="numpy-missing-param-400"),
    Case("schema_numpy", "POST", json_body=[1, 2], id="numpy-not-an-object-400"),
    Case("schema_numpy", "POST", body=b'{"data": [[1,2,3]]}', headers={"content-type": "text/plain"},
         id="numpy-not-json-415"),
    Case("schema_numpy", "POST", body=b"", headers={"content-type": "application/json"},
         id="numpy-empty-400"),
    Case("schema_numpy", "POST", body=b'{"data": [[1,2,3]]', headers={"content-type": "application/json"},
         id="numpy-bad-json-400"),
    Case("schema_numpy", "GET", path="/swagger.json", id="numpy-swagger-2"),
    Case("schema_numpy", "GET", path="/swagger.json?version=3", id="numpy-swagger-3"),
    Case("schema_numpy", "GET", path="/swagger.json?version=3.1", id="numpy-swagger-3.1"),
    Case("schema_numpy", "GET", path="/swagger.json?version=2.0", id="numpy-swagger-2.0"),
    # inference-schema: pandas.
    Case("schema_pandas", "POST", json_body={"frame": [
        {"sepal_length": 5.0, "sepal_width": 3.0, "species": "setosa"},
        {"sepal_length": 6.5, "sepal_width": 2.8, "species": "virginica"}]}, id="pandas"),
    Case("schema_pandas", "POST", json_body={"frame": "not records"}, id="pandas-bad-500"),
    Case("schema_pandas", "GET", path="/swagger.json?version=3", id="pandas-swagger-3"),
    # inference-schema: standard types, a default and request_headers.
    Case("schema_standard", "POST", json_body={"text": "ab", "repeat": 3},
         headers={"x-custom-header": "seen"}, id="standard"),
    Case("schema_standard", "POST", json_body={"text": "ab"}, id="standard-default"),
    Case("schema_standard", "POST", json_body={"repeat": 3}, id="standard-missing-400"),
    Case("schema_standard", "GET", path="/swagger.json", id="standard-swagger"),
    # @rawhttp.
    Case("rawhttp", "POST", path="/score?a=1&a=2&b=", body=BINARY,
         headers={"content-type": "application/octet-stream", "x-custom-header": "raw"},
         id="rawhttp-echo-binary"),
    Case("rawhttp", "GET", id="rawhttp-get"),
    Case("rawhttp", "OPTIONS", id="rawhttp-options-reaches-run"),
    Case("rawhttp", "POST", path="/score?mode=binary", body=BINARY,
         read_headers=("x-model", "x-multi"), id="rawhttp-binary-201"),
    Case("rawhttp", "POST", path="/score?mode=json", json_body={"k": [1, 2]}, id="rawhttp-json-202"),
    Case("rawhttp", "GET", path="/score?mode=fail", id="rawhttp-503-marks-failed"),
    Case("rawhttp", "GET", path="/score?mode=none", id="rawhttp-none"),
    Case("rawhttp", "GET", path="/score?mode=plain", id="rawhttp-plain-value"),
    Case("rawhttp", "POST", path="/score?mode=files", body=MULTIPART,
         headers={"content-type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"},
         id="rawhttp-multipart"),
    Case("rawhttp", "POST", path="/score", body=b"a=1&b=two",
         headers={"content-type": "application/x-www-form-urlencoded"}, id="rawhttp-form"),
    # run() raises; and outlives SCORING_TIMEOUT_MS.
    Case("run_fails", "POST", json_body={"x": 1}, id="run-raises-500"),
    Case("run_fails", "POST", body=b"not json", id="run-raises-on-bad-input-500"),
    Case("run_fails", "POST", json_body={"sleep": 1.5}, id="run-timeout-500"),
    # Return values.
    *[Case("returns", "POST", json_body={"what": what}, id=f"returns-{what}")
      for what in ("none", "str", "list", "float64", "int_keys", "bytes", "set", "tolist")],
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_answer_as_azmlinfsrv(servers: Servers, case: Case) -> None:
    ours, theirs = both(servers, case)
    assert_same(ours, theirs, case)


# Through the router: the same answers, what the router itself does aside (it answers with its
# own request ids, as azureml-fe does, and bounds scoring time with its own timeout).
ROUTED = [c for c in CASES if c.path.startswith(("/score", "/swagger.json")) and c.method != "HEAD"
          and "timeout" not in c.id and "request-id" not in c.id]


@pytest.mark.parametrize("case", ROUTED, ids=[c.id for c in ROUTED])
def test_same_answer_through_the_router(servers: Servers, case: Case) -> None:
    assert servers.router is not None
    ours = case.send(f"{servers.router.url}/api/v1/service/{service_name(case.script)}")
    theirs = case.send(servers.az[case.script].url)
    # The router answers with its own request ids (azureml-fe's): compared in its own tests.
    assert_same(ours, theirs, case, request_ids=False)


# -- where mlfe differs on purpose ---------------------------------------------------------------


@pytest.mark.parametrize("what", ["array", "int64"])
def test_numpy_results_are_json_under_mlfe_but_500_under_azmlinfsrv(servers: Servers,
                                                                    what: str) -> None:
    # azmlinfsrv's json.dumps cannot encode numpy arrays or numpy ints: a 500. mlfe encodes
    # them (an mlfe-native script may rely on it); a script that works there works here.
    case = Case("returns", "POST", json_body={"what": what})
    ours, theirs = both(servers, case)
    assert (theirs.status_code, theirs.json()) == (500, {"message": INTERNAL})
    assert ours.status_code == 200
    assert ours.json() == {"x": [0, 1, 2] if what == "array" else 3}


def test_nan_result_is_null_under_mlfe_but_bare_nan_under_azmlinfsrv(servers: Servers) -> None:
    # Both read NaN in the input (the stdlib parser accepts it). On the way out, json.dumps
    # writes a bare NaN, which is not JSON (browsers' JSON.parse refuses it); mlfe writes null.
    case = Case("schema_numpy", "POST", body=b'{"data": [[NaN, 2, 3]]}',
                headers={"content-type": "application/json"})
    ours, theirs = both(servers, case)
    assert b'"sums": [NaN]' in theirs.content
    assert ours.status_code == theirs.status_code == 200
    assert ours.json()["sums"] == [None]


def test_unknown_path_and_method(servers: Servers) -> None:
    # Same status and message. azmlinfsrv answers these before its request hooks run, so
    # without request ids and (405) without Allow; mlfe keeps both, as HTTP asks of a 405.
    for case in (Case("raw_str", "GET", path="/nope"), Case("raw_str", "PUT")):
        ours, theirs = both(servers, case)
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json())
        assert ours.headers["x-ms-run-function-failed"] == theirs.headers["x-ms-run-function-failed"]
        assert "x-request-id" not in theirs.headers
        assert ours.headers["x-request-id"] == IDS["x-request-id"]
    assert ours.headers["allow"] and "allow" not in theirs.headers


def test_timed_out_run_keeps_its_worker_under_mlfe(servers: Servers) -> None:
    # azmlinfsrv interrupts run() with SIGALRM; mlfe cannot interrupt a thread, so the answer
    # is the same 500 at the deadline but the run() goes on in the background until it returns.
    case = Case("run_fails", "POST", json_body={"sleep": 1.0})
    start = time.monotonic()
    ours = case.send(servers.mlfe["run_fails"].url)
    assert time.monotonic() - start < 1.0
    assert (ours.status_code, ours.json()) == (500, {"message": f"Scoring timeout after {SCORING_TIMEOUT_MS} ms"})
    assert ours.headers["x-ms-run-function-failed"] == "True"


def test_scripts_importing_azmlinfsrv_itself(azmlinfsrv_python: Path, tmp_path: Path) -> None:
    """Where azmlinfsrv is installed too, a script may import its modules directly: mlfe honours
    that @rawhttp and sends back its flask responses. (azmlinfsrv's packages are appended to the
    path, after mlfe's own, as a second installation would be.)"""
    site = next((azmlinfsrv_python.parent.parent / "lib").glob("python3.*/site-packages"))
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                              str(site)]))}
    script = "rawhttp_azmlinfsrv_api"
    az, ours = start_azmlinfsrv(azmlinfsrv_python, script, tmp_path, ENV), start_mlfe(script, tmp_path, env)
    try:
        _wait_all([az, ours])
        for case in (Case(script, "POST", body=b"\x00\x01abc", read_headers=("x-reversed",)),
                     Case(script, "GET", path="/score?mode=fail")):
            assert_same(case.send(ours.url), case.send(az.url), case)
    finally:
        az.stop()
        ours.stop()


def test_init_failure_exits_like_azmlinfsrv(azmlinfsrv_python: Path, tmp_path: Path) -> None:
    """A raising init(): neither server ever answers; both exit with gunicorn's boot error (3)."""
    az = start_azmlinfsrv(azmlinfsrv_python, "init_fails", tmp_path, ENV)
    ours = start_mlfe("init_fails", tmp_path, ENV)
    try:
        codes = [p.wait_exit(timeout=START_DEADLINE_S) for p in (ours, az)]
        assert codes == [3, 3], (ours.log(), az.log())
        assert "cannot load the model" in ours.log()
    finally:
        az.stop()
        ours.stop()


def test_shim_without_azmlinfsrv() -> None:
    """The mlfe venv has no azmlinfsrv: the score server's shim provides the documented imports."""
    with contextlib.suppress(ModuleNotFoundError):
        import azureml_inference_server_http  # noqa: F401

        pytest.fail("azmlinfsrv must not be installed next to mlfe (its pins would hold ours back)")
    code = (
        "from deploy.entry_script import load_entry_script, InputMode;"
        f"s = load_entry_script({str(CORPUS / 'rawhttp.py')!r});"
        "assert s.mode is InputMode.RAW, s.mode;"
        "from azureml.contrib.services.aml_response import AMLResponse; print(AMLResponse.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "mlfe_azureml.aml_response"
