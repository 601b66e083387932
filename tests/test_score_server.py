"""Integration tests of `mlfe score-server`: real processes on loopback, real HTTP.

No fixed sleeps: every wait polls a condition against a deadline, pacing itself by waiting
briefly for the server process to exit (which also catches a crash at once).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DEADLINE_S = 20.0
RUN_FAILED = "An unexpected error occurred in scoring script. Check the logs for more info."
INTERNAL = "An unexpected internal error occurred. Check the logs for more info."


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _pause(self) -> None:
        # The poll interval: wait a moment for the process to exit (it should not).
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=0.02)

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")
            self._pause()

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(script: Path, log_dir: Path, env: dict[str, str] | None = None) -> Replica:
    port = _free_port()
    log_path = log_dir / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if k not in ("WORKER_COUNT", "SLOW_RUN_MS")}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "deploy.cli", "score-server", "--entry-script", str(script)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    return Replica(proc, f"http://127.0.0.1:{port}", port, log_path)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    """Start a server; by default wait until `GET /` answers. All are killed at teardown."""
    replicas: list[Replica] = []

    def start(script: Path, env: dict[str, str] | None = None, wait: bool = True) -> Replica:
        replica = _start(script, tmp_path, env)
        replicas.append(replica)
        if wait:
            replica.wait_for(replica.healthy, "GET / to answer")
        return replica

    yield start
    for replica in replicas:
        replica.stop()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


FEATURES = """
import json

from aiohttp import web

swagger = {"swagger": "2.0", "info": {"title": "features", "version": "1"}}
INIT_CALLS = 0


def init():
    global INIT_CALLS
    INIT_CALLS += 1


def run(raw_data):
    try:
        data = json.loads(raw_data)
    except ValueError:
        data = raw_data
    if isinstance(data, dict):
        if "boom" in data:
            raise RuntimeError("secret-detail-" + str(data["boom"]))
        if "status" in data:
            return web.Response(status=data["status"], text="custom", headers={"x-custom": "1"})
        if "numpy" in data:
            import numpy as np
            square = np.arange(4).reshape(2, 2)
            return {"array": square, "transposed": square.T, "scalar": np.float32(1.5)}
        if "unserialisable" in data:
            return {"x": object()}
    return {"echo": data, "init_calls": INIT_CALLS}
"""


@dataclass
class Served:
    replica: Replica
    client: httpx.Client


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server shared by the request/response tests."""
    tmp = tmp_path_factory.mktemp("features")
    replica = _start(_write(tmp / "score.py", FEATURES), tmp)
    try:
        replica.wait_for(replica.healthy, "GET / to answer")
        with httpx.Client(base_url=replica.url, timeout=10) as client:
            yield Served(replica, client)
    finally:
        replica.stop()


def _exec_ms(response: httpx.Response) -> float:
    return float(response.headers["x-ms-run-fn-exec-ms"])


# -- routes and bodies ---------------------------------------------------------------------------


def test_health(features: Served) -> None:
    response = features.client.get("/")
    assert response.status_code == 200
    assert response.text == "Healthy"


def test_score_post_json(features: Served) -> None:
    response = features.client.post("/score", json={"x": [1, 2]})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"echo": {"x": [1, 2]}, "init_calls": 1}
    assert _exec_ms(response) >= 0
    assert response.headers["x-ms-run-function-failed"] == "False"


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", None])
def test_undecorated_run_gets_the_body_as_str(features: Served, content_type: str | None) -> None:
    # Azure ML's contract: whatever the content type, run(raw_data) gets the body as a str.
    headers = {"content-type": content_type} if content_type else {}
    response = features.client.post("/score", content=b"not json {", headers=headers)
    assert response.status_code == 200
    assert response.json()["echo"] == "not json {"


def test_body_that_is_not_utf8_is_400(features: Served) -> None:
    response = features.client.post("/score", content=b"\xff")
    assert response.status_code == 400
    assert response.json()["message"].startswith("Input cannot be decoded as UTF-8")


def test_run_exception_is_500_without_leaking(features: Served) -> None:
    response = features.client.post(
        "/score", json={"boom": "xyz"}, headers={"x-request-id": "boom-request"}
    )
    assert response.status_code == 500
    assert response.json() == {"message": RUN_FAILED}
    assert "secret-detail" not in response.text
    assert response.headers["x-ms-run-function-failed"] == "True"
    assert "x-ms-run-fn-exec-ms" not in response.headers
    # The traceback goes to the log instead, with the request id to find it by.
    log = features.replica.log()
    assert "secret-detail-xyz" in log
    assert "boom-request" in log


def test_unserialisable_result_is_500(features: Served) -> None:
    # azmlinfsrv's answer: an internal error, not a run() failure.
    response = features.client.post("/score", json={"unserialisable": True})
    assert response.status_code == 500
    assert response.json() == {"message": INTERNAL}
    assert response.headers["x-ms-run-function-failed"] == "False"


def test_numpy_results_serialise(features: Served) -> None:
    pytest.importorskip("numpy")
    response = features.client.post("/score", json={"numpy": True})
    assert response.status_code == 200
    assert response.json() == {
        "array": [[0, 1], [2, 3]],
        "transposed": [[0, 2], [1, 3]],
        "scalar": 1.5,
    }


@pytest.mark.parametrize(("status", "failed"), [(201, False), (503, True)])
def test_run_may_return_its_own_response(features: Served, status: int, failed: bool) -> None:
    response = features.client.post("/score", json={"status": status})
    assert response.status_code == status
    assert response.text == "custom"
    assert response.headers["x-custom"] == "1"
    assert _exec_ms(response) >= 0
    assert ("x-ms-run-function-failed" in response.headers) is failed


def test_get_takes_input_from_query(features: Served) -> None:
    response = features.client.get("/score", params={"a": "1", "b": "[1,2]", "c": ["x", "y"]})
    assert response.status_code == 200
    assert response.json()["echo"] == {"a": 1, "b": [1, 2], "c": ["x", "y"]}
    assert _exec_ms(response) >= 0


def test_options_is_empty_200(features: Served) -> None:
    response = features.client.options("/score")
    assert response.status_code == 200
    assert response.content == b""


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_405(features: Served, method: str) -> None:
    response = features.client.request(method, "/score", json={})
    assert response.status_code == 405
    assert response.json() == {"message": "The method is not allowed for the requested URL."}


def test_unknown_path_is_404_json(features: Served) -> None:
    response = features.client.get("/nope")
    assert response.status_code == 404
    assert "message" in response.json()


def test_swagger_from_module(features: Served) -> None:
    response = features.client.get("/swagger.json")
    assert response.status_code == 200
    assert response.json() == {"swagger": "2.0", "info": {"title": "features", "version": "1"}}


# -- request ids ---------------------------------------------------------------------------------


def test_request_ids_echoed(features: Served) -> None:
    headers = {"x-request-id": "abc-123", "x-ms-client-request-id": "client_1"}
    response = features.client.post("/score", json={}, headers=headers)
    assert response.headers["x-request-id"] == "abc-123"
    assert response.headers["x-ms-client-request-id"] == "client_1"
    assert response.headers["x-ms-request-id"] == "client_1"


def test_request_id_generated_when_absent(features: Served) -> None:
    response = features.client.post("/score", json={})
    assert uuid.UUID(response.headers["x-request-id"]).version == 4
    assert response.headers["x-ms-request-id"] == response.headers["x-request-id"]
    assert "x-ms-client-request-id" not in response.headers


def test_long_request_id_is_431(features: Served) -> None:
    ok = features.client.post("/score", json={}, headers={"x-request-id": "a" * 100})
    assert ok.status_code == 200
    response = features.client.post("/score", json={}, headers={"x-request-id": "a" * 101})
    assert response.status_code == 431
    assert response.json() == {"message": "x-request-id must not exceed 100 characters"}
    assert "x-request-id" not in response.headers


# -- examples ------------------------------------------------------------------------------------


def test_echo_example_and_generated_swagger(spawn: Callable[..., Replica]) -> None:
    replica = spawn(EXAMPLES / "echo" / "score.py", env={"SERVICE_NAME": "echo"})
    response = httpx.post(replica.url + "/score", json={"anything": 1})
    assert response.status_code == 200
    assert response.json() == {"result": [1]}
    # An undecorated run(): azmlinfsrv's template with empty object schemas, every version.
    swagger = httpx.get(replica.url + "/swagger.json").json()
    assert swagger["swagger"] == "2.0"
    assert swagger["info"]["title"] == "echo"
    assert swagger["definitions"]["ServiceInput"] == {"type": "object", "example": {}}
    v31 = httpx.get(replica.url + "/swagger.json", params={"version": "3.1"}).json()
    assert v31["openapi"] == "3.1.0"
    bad = httpx.get(replica.url + "/swagger.json", params={"version": "9"})
    assert bad.status_code == 404
    assert bad.json() == {"message": "Swagger version [9] is not valid. Supported versions: [2, 3, 3.1]."}


@pytest.mark.parametrize(("workers", "expected_max"), [(1, 1), (2, 2)])
def test_worker_count_sets_run_concurrency(
    spawn: Callable[..., Replica], workers: int, expected_max: int
) -> None:
    replica = spawn(EXAMPLES / "slow" / "score.py", env={"WORKER_COUNT": str(workers)})
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(httpx.post, replica.url + "/score", json={"ms": 400}, timeout=10)
            for _ in range(2)
        ]
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200, 200]
    assert max(r.json()["max_in_flight"] for r in responses) == expected_max
    # Time waiting for a free worker is not run() time.
    assert all(400 <= _exec_ms(r) < 800 for r in responses)


# -- lifecycle -----------------------------------------------------------------------------------

INIT_GATE = """
from pathlib import Path

HERE = Path(__file__).parent


def init():
    (HERE / "init-started").write_text("1")
    (HERE / "gate").read_text()  # a FIFO: blocks until the test writes to it
    with open(HERE / "init-calls", "a") as f:
        f.write("x\\n")


def run(data):
    return {"init_calls": len((HERE / "init-calls").read_text().splitlines())}
"""


def test_init_runs_once_before_healthy(spawn: Callable[..., Replica], tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "gate")
    _write(tmp_path / "swagger.json", '{"openapi": "3.0.0"}')
    replica = spawn(_write(tmp_path / "score.py", INIT_GATE), wait=False)
    replica.wait_for((tmp_path / "init-started").exists, "init() to start")
    # init() is blocked on the gate, so nothing may answer yet.
    assert not replica.healthy()
    (tmp_path / "gate").write_text("go")
    replica.wait_for(replica.healthy, "GET / to answer")
    for _ in range(3):
        assert httpx.post(replica.url + "/score", json={}).json() == {"init_calls": 1}
    swagger = httpx.get(replica.url + "/swagger.json")
    assert swagger.json() == {"openapi": "3.0.0"}


ASYNC_SCRIPT = """
import asyncio
import json

LOOP = None


async def init():
    global LOOP
    LOOP = asyncio.get_running_loop()


async def run(raw_data):
    await asyncio.sleep(0)
    data = json.loads(raw_data)
    if data.get("boom"):
        raise ValueError("async-secret")
    return {"same_loop": asyncio.get_running_loop() is LOOP, "data": data}
"""


def test_async_init_and_run(spawn: Callable[..., Replica], tmp_path: Path) -> None:
    replica = spawn(_write(tmp_path / "score.py", ASYNC_SCRIPT))
    response = httpx.post(replica.url + "/score", json={"k": 1})
    assert response.status_code == 200
    assert response.json() == {"same_loop": True, "data": {"k": 1}}
    assert _exec_ms(response) >= 0
    failed = httpx.post(replica.url + "/score", json={"boom": True})
    assert failed.status_code == 500
    assert "async-secret" not in failed.text
    assert failed.headers["x-ms-run-function-failed"] == "True"


RUN_GATE = """
from pathlib import Path

HERE = Path(__file__).parent


def run(data):
    (HERE / "run-started").write_text("1")
    (HERE / "gate").read_text()  # a FIFO: blocks until the test writes to it
    return {"finished": True}
"""


def test_sigterm_finishes_in_flight_then_exits_0(
    spawn: Callable[..., Replica], tmp_path: Path
) -> None:
    os.mkfifo(tmp_path / "gate")
    replica = spawn(_write(tmp_path / "score.py", RUN_GATE))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, replica.url + "/score", json={}, timeout=DEADLINE_S)
        replica.wait_for((tmp_path / "run-started").exists, "run() to start")
        replica.proc.send_signal(signal.SIGTERM)
        replica.wait_for(lambda: not replica.accepting(), "the listener to close")
        assert replica.proc.poll() is None  # still draining the in-flight request
        (tmp_path / "gate").write_text("go")
        response = pending.result(timeout=DEADLINE_S)
    assert response.status_code == 200
    assert response.json() == {"finished": True}
    assert replica.proc.wait(timeout=DEADLINE_S) == 0


INIT_RAISES = """
def init():
    raise RuntimeError("init-exploded")


def run(data):
    return 1
"""


@pytest.mark.parametrize(
    ("script", "env", "expected_in_log"),
    [
        (INIT_RAISES, {}, "init-exploded"),
        ("def init():\n    pass\n", {}, "does not define a run(data) function"),
        ("import no_such_module_xyz\n", {}, "no_such_module_xyz"),
        ("def run(data):\n    return 1\n", {"WORKER_COUNT": "zero"}, "WORKER_COUNT"),
    ],
    ids=["init-raises", "no-run", "import-fails", "bad-worker-count"],
)
def test_bad_startup_exits_non_zero(
    spawn: Callable[..., Replica],
    tmp_path: Path,
    script: str,
    env: dict[str, str],
    expected_in_log: str,
) -> None:
    replica = spawn(_write(tmp_path / "score.py", script), env=env, wait=False)
    assert replica.proc.wait(timeout=DEADLINE_S) != 0
    log = replica.log()
    assert expected_in_log in log
    assert "Listening on" not in log
