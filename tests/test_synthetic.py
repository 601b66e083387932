"""Synthetic replicas (`mlfe score-server --synthetic SPEC`): the SPEC's forms and errors, the
seeded latency sampler (deterministic, percentiles as specified, checked on samples, never on
wall-clock time), the replica's own concurrency limit (checked from inside the replica), its
azureml-like responses, and a tiny locust run of examples/locustfile.py."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from statistics import quantiles
from typing import Any

import httpx
import pytest
import yaml

from deploy.cli import main
from deploy.score_server import NOT_FOUND_MESSAGE
from deploy.synthetic import Sampler, SyntheticModel, response_body
from mlfe.config import ConfigError, parse_config
from mlfe.synthetic_spec import MIN_RESPONSE_BYTES, LatencySpec, SyntheticSpec, parse_spec
from tests.support import EXAMPLES, REPO, Proc, free_port, post_many, spawn

RUN_FAILED = "An unexpected error occurred in scoring script. Check the logs for more info."


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def start_synthetic(tmp: Path, spec: str, procs: list[Proc], wait: bool = True,
                    env: dict[str, str] | None = None) -> Proc:
    port = free_port()
    p = spawn(["score-server", "--synthetic", spec, "--port", str(port)],
              tmp / f"synthetic-{port}.log", port, env)
    procs.append(p)
    if wait:
        p.wait_for(lambda: p.get_ok("/"), "synthetic replica healthy")
    return p


# ---- SPEC ---------------------------------------------------------------------------------------


def test_spec_forms_agree() -> None:
    as_kv = parse_spec("latency=lognormal:20:200, concurrency=2, error_rate=0.01, "
                       "error_status=503, response_bytes=512, init_ms=100, seed=7")
    as_json = parse_spec(json.dumps({
        "latency": {"distribution": "lognormal", "median_ms": 20, "p99_ms": 200},
        "concurrency": 2, "error_rate": 0.01, "error_status": 503, "response_bytes": 512,
        "init_ms": 100, "seed": 7,
    }))
    dotted = parse_spec("latency.distribution=lognormal,latency.median_ms=20,"
                        "latency.p99_ms=200,concurrency=2,error_rate=0.01,error_status=503,"
                        "response_bytes=512,init_ms=100,seed=7")
    assert as_kv == as_json == dotted
    assert parse_spec(as_kv.to_arg()) == as_kv  # what a supervisor passes to --synthetic


@pytest.mark.parametrize(("latency", "expected"), [
    (50, LatencySpec(distribution="fixed", ms=50)),
    ("50", LatencySpec(distribution="fixed", ms=50)),
    ("fixed:5.5", LatencySpec(distribution="fixed", ms=5.5)),
    ("uniform:10:30", LatencySpec(distribution="uniform", min_ms=10, max_ms=30)),
    ({"distribution": "uniform", "min_ms": 1, "max_ms": 2},
     LatencySpec(distribution="uniform", min_ms=1, max_ms=2)),
])
def test_latency_short_forms(latency: Any, expected: LatencySpec) -> None:
    assert SyntheticSpec.model_validate({"latency": latency}).latency == expected


def test_defaults() -> None:
    spec = parse_spec("")
    assert spec == SyntheticSpec()
    assert spec.latency.distribution == "fixed" and Sampler(spec).latency_s() == 0
    assert (spec.concurrency, spec.error_rate, spec.error_status, spec.seed) == (None, 0, 500, 0)


@pytest.mark.parametrize(("spec", "named"), [
    ("latency=lognormal:200:20", ["latency", "p99_ms (20) is less than median_ms (200)",
                                  "'lognormal:200:20'"]),
    ("latency=uniform:30:10", ["latency", "min_ms (30) is greater than max_ms (10)"]),
    ("latency=gamma:1:2", ["latency", "lognormal:MEDIAN_MS:P99_MS", "'gamma:1:2'"]),
    ("latency=-1", ["latency.ms", "greater than or equal to 0", "(got -1)"]),
    ('{"latency": {"distribution": "uniform", "ms": 3}}',
     ["latency", "min_ms and max_ms", "missing min_ms, max_ms", "not ms"]),
    ("error_rate=1.5", ["error_rate", "less than or equal to 1", "1.5"]),
    ("error_status=200", ["error_status", "greater than or equal to 400", "200"]),
    ("concurrency=0", ["concurrency", "greater than 0", "0"]),
    ("response_bytes=5", ["response_bytes", "13", "5"]),
    ("latncy=5", ["latncy", "Extra inputs are not permitted"]),  # a typo: its value not shown
    ("seed", ["KEY=VALUE"]),
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["KEY=VALUE"]),
])
def test_bad_spec_names_key_and_value(spec: str, named: list[str]) -> None:
    with pytest.raises(ValueError) as exc:
        parse_spec(spec)
    for part in named:
        assert part in str(exc.value), str(exc.value)


def test_synthetic_in_a_service_config() -> None:
    cfg = parse_config({"services": {
        "as-map": {"synthetic": {"latency": "uniform:1:2", "concurrency": 3}},
        "as-text": {"synthetic": "latency=uniform:1:2,concurrency=3"},
    }})
    a, b = cfg.services["as-map"].synthetic, cfg.services["as-text"].synthetic
    assert a is not None and a == b and a.concurrency == 3
    # A config survives the dump/parse round trip of admin changes (router.change_endpoints).
    again = parse_config(cfg.model_dump(mode="json", exclude_unset=True))
    assert again.services["as-map"].synthetic == a
    with pytest.raises(ConfigError) as exc:
        parse_config({"services": {"bad": {"synthetic": {"error_rate": -1}}}})
    assert "services.bad.synthetic.error_rate" in str(exc.value)
    assert "(got -1)" in str(exc.value)
    with pytest.raises(ConfigError, match="exactly one of entry_script, upstreams"):
        parse_config({"services": {"two": {"synthetic": {}, "upstreams": ["127.0.0.1:1"]}}})


def test_loadtest_example_is_valid() -> None:
    from deploy.config_file import load_config

    cfg = load_config(EXAMPLES / "loadtest.yaml")
    svc = cfg.services["loadtest"]
    assert svc.synthetic is not None and svc.synthetic.init_ms > 0  # cold starts
    assert svc.auth_enabled and svc.autoscaling and svc.autoscale_min_replicas == 1


# ---- the sampler: deterministic, and as specified ------------------------------------------------


def draws(spec: SyntheticSpec, n: int) -> list[tuple[float, bool]]:
    s = Sampler(spec)
    return [(d.latency_s, d.fails) for d in (s.draw() for _ in range(n))]


def test_sampler_is_deterministic_under_a_seed() -> None:
    spec = parse_spec("latency=lognormal:20:200,error_rate=0.3,seed=42")
    assert draws(spec, 2000) == draws(spec, 2000)
    other = spec.model_copy(update={"seed": 43})
    assert draws(other, 2000) != draws(spec, 2000)
    # The error stream is its own: a different error rate leaves the latencies as they were.
    fewer_errors = spec.model_copy(update={"error_rate": 0.01})
    assert ([lat for lat, _ in draws(fewer_errors, 500)]
            == [lat for lat, _ in draws(spec, 500)])


N_SAMPLES = 200_000


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def test_lognormal_percentiles_match_the_spec() -> None:
    s = Sampler(parse_spec("latency=lognormal:20:200,seed=1"))
    ms = sorted(s.latency_s() * 1000 for _ in range(N_SAMPLES))
    assert percentile(ms, 0.50) == pytest.approx(20, rel=0.02)
    assert percentile(ms, 0.99) == pytest.approx(200, rel=0.05)
    assert min(ms) > 0


def test_uniform_and_fixed_latency_match_the_spec() -> None:
    s = Sampler(parse_spec("latency=uniform:10:30,seed=1"))
    ms = [s.latency_s() * 1000 for _ in range(N_SAMPLES)]
    assert min(ms) >= 10 and max(ms) <= 30
    assert quantiles(ms, n=4) == pytest.approx([15, 20, 25], abs=0.2)
    fixed = Sampler(parse_spec("latency=7.5"))
    assert {fixed.latency_s() for _ in range(100)} == {0.0075}


def test_error_rate_matches_the_spec() -> None:
    s = Sampler(parse_spec("error_rate=0.05,seed=3"))
    failed = sum(s.fails() for _ in range(N_SAMPLES))
    # Binomial: sd = sqrt(n p (1-p)) ~ 97; 5 sd either way.
    assert abs(failed - 0.05 * N_SAMPLES) < 5 * math.sqrt(N_SAMPLES * 0.05 * 0.95)
    never = Sampler(parse_spec("error_rate=0"))
    assert not any(never.fails() for _ in range(1000))


@pytest.mark.parametrize("size", [MIN_RESPONSE_BYTES, 64, 10_000])
def test_response_body_is_json_of_the_given_size(size: int) -> None:
    body = response_body(size)
    assert len(body) == size
    assert json.loads(body)["result"] == "x" * (size - MIN_RESPONSE_BYTES)


# ---- the replica's own concurrency ----------------------------------------------------------------


async def test_concurrency_limit_holds_in_process() -> None:
    model = SyntheticModel(parse_spec("latency=5"), concurrency=3)
    results = await asyncio.gather(*(model.run() for _ in range(20)))
    stats = model.stats()
    assert stats["maxRunning"] == 3  # never more, and the limit was reached
    assert stats["maxWaiting"] == 17  # the rest waited inside the replica
    assert (stats["served"], stats["running"], stats["waiting"]) == (20, 0, 0)
    assert not any(failed for failed, _ in results)


def test_replica_concurrency_limit_holds(tmp_path: Path, procs: list[Proc]) -> None:
    p = start_synthetic(tmp_path, "latency=100,concurrency=3,seed=1", procs)
    statuses = asyncio.run(post_many(p.port, "/score", 24, {}, concurrency=24))
    assert statuses == [200] * 24
    stats = httpx.get(p.url + "/stats", timeout=5).json()
    assert stats["concurrency"] == 3
    assert stats["maxRunning"] == 3
    assert stats["maxWaiting"] > 0  # 24 at once: most of them queued inside the replica
    assert (stats["served"], stats["running"], stats["waiting"]) == (24, 0, 0)


def test_concurrency_defaults_to_worker_count(tmp_path: Path, procs: list[Proc]) -> None:
    p = start_synthetic(tmp_path, "latency=1", procs, env={"WORKER_COUNT": "4"})
    assert httpx.get(p.url + "/stats", timeout=5).json()["concurrency"] == 4


# ---- the replica server -----------------------------------------------------------------------------


def test_replica_answers_like_the_inference_server(tmp_path: Path, procs: list[Proc]) -> None:
    p = start_synthetic(tmp_path, "latency=1,response_bytes=100", procs)
    with httpx.Client(base_url=p.url, timeout=10) as c:
        assert c.get("/").text == "Healthy"
        r = c.post("/score", json={"data": [1]}, headers={"x-ms-client-request-id": "abc"})
        assert r.status_code == 200
        assert len(r.content) == 100 and r.json()["result"]
        assert float(r.headers["x-ms-run-fn-exec-ms"]) >= 1.0
        assert r.headers["x-ms-client-request-id"] == "abc" and r.headers["x-request-id"]
        assert c.get("/score", params={"a": "1"}).status_code == 200
        assert c.options("/score").status_code == 200
        r = c.post("/score", content=b"{}", headers={"content-type": "text/plain"})
        assert (r.status_code, r.json()) == (
            415, {"message": "Expects Content-Type to be application/json"})
        r = c.post("/score", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "could not be decoded as JSON" in r.json()["message"]
        assert c.get("/swagger.json").status_code == 404
        assert c.get("/nowhere").json() == {"message": NOT_FOUND_MESSAGE}
    stats = httpx.get(p.url + "/stats", timeout=5).json()
    assert stats["served"] == 2  # POST and GET; OPTIONS and the bad requests never ran


def test_errors_as_specified(tmp_path: Path, procs: list[Proc]) -> None:
    p = start_synthetic(tmp_path, "error_rate=1", procs)
    r = httpx.post(p.url + "/score", json={}, timeout=10)
    assert (r.status_code, r.json()) == (500, {"message": RUN_FAILED})
    assert r.headers["x-ms-run-function-failed"] == "True"
    p = start_synthetic(tmp_path, "error_rate=1,error_status=429", procs)
    r = httpx.post(p.url + "/score", json={}, timeout=10)
    # An error answer of azmlinfsrv's kind, not a run() failure.
    assert r.status_code == 429 and r.headers["x-ms-run-function-failed"] == "False"
    assert httpx.get(p.url + "/stats", timeout=5).json()["failed"] == 1


def _log_time(log: str, marker: str) -> datetime:
    m = re.search(r"^(\S+ \S+) \S+ deploy\.synthetic: " + re.escape(marker), log, re.M)
    assert m, log
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")


def test_cold_start_comes_before_listening(tmp_path: Path, procs: list[Proc]) -> None:
    p = start_synthetic(tmp_path, "init_ms=800", procs)
    log = p.log()
    # The replica's own record of its cold start (not a measurement by the test).
    gap = _log_time(log, "Listening on") - _log_time(log, "Synthetic init")
    assert gap.total_seconds() >= 0.79


def test_sigterm_during_cold_start_exits_cleanly(tmp_path: Path, procs: list[Proc]) -> None:
    p = start_synthetic(tmp_path, "init_ms=60000", procs, wait=False)
    p.wait_for(lambda: "Synthetic init" in p.log(), "cold start begun")
    p.signal()
    assert p.wait_exit() == 0


def test_cli_takes_exactly_one_model(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["score-server"],
                 ["score-server", "--entry-script", "x.py", "--synthetic", "latency=1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "--entry-script" in capsys.readouterr().err


def test_bad_spec_on_the_command_line_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "score-server", "--synthetic", "error_rate=7"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "error_rate" in result.stderr and "(got 7)" in result.stderr


# ---- a load test: examples/locustfile.py, tiny ------------------------------------------------------


def locust_json(stdout: str) -> list[dict[str, Any]]:
    start = stdout.index("[")
    stats: list[dict[str, Any]] = json.loads(stdout[start:stdout.rindex("]") + 1])
    return stats


def _start_up_loadtest(tmp: Path, procs: list[Proc]) -> tuple[str, str]:
    """`mlfe up --config examples/loadtest.yaml` (on free ports); its printed URI and key."""
    cfg = yaml.safe_load((EXAMPLES / "loadtest.yaml").read_text())
    port = free_port()
    cfg["router"].update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{free_port()}",
                         state_dir=str(tmp / "state"))
    path = tmp / "loadtest.yaml"
    path.write_text(yaml.safe_dump(cfg))
    up = spawn(["up", "--config", str(path)], tmp / "up.log", port)
    procs.append(up)
    up.wait_for(lambda: "key:" in up.log(), "mlfe up to print the scoring URI and key")
    uri = re.search(r"scoring URI: (\S+)", up.log())
    key = re.search(r"key:\s+(\S+)", up.log())
    assert uri and key
    # The first replica's cold start: wait until it serves.
    up.wait_for(lambda: httpx.post(uri.group(1), json={}, timeout=10, headers={
        "Authorization": f"Bearer {key.group(1)}"}).status_code == 200, "a ready replica")
    return uri.group(1), key.group(1)


def test_locustfile_tiny_run(tmp_path: Path, procs: list[Proc]) -> None:
    locust = Path(sys.executable).with_name("locust")  # the dev extra installs it
    uri, key = _start_up_loadtest(tmp_path, procs)
    result = subprocess.run(
        [str(locust), "-f", str(EXAMPLES / "locustfile.py"), "--headless", "-u", "5", "-r", "5",
         "-t", "3s", "--stop-timeout", "5", "--only-summary", "--json", "--skip-log",
         "--exit-code-on-error", "0", "--csv", str(tmp_path / "locust")],
        cwd=tmp_path, capture_output=True, text=True, timeout=90, check=False,
        env={"PATH": str(locust.parent), "HOME": str(tmp_path),
             "SCORING_URI": uri, "SCORING_KEY": key},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (score,) = [s for s in locust_json(result.stdout) if s["name"] == "score"]
    assert score["num_requests"] > 20, score
    # Every failure is one that the spec or the load explains: a retried or refused 503
    # (overloaded), or one of the synthetic model's own 500s.
    with (tmp_path / "locust_failures.csv").open() as f:
        errors = {row["Error"]: int(row["Occurrences"]) for row in csv.DictReader(f)}
    assert all(re.search(r"\('(503 \(|500: )", e) for e in errors), errors
    assert score["num_failures"] <= score["num_requests"] // 2, score
    assert "mlfe load test:" in result.stdout + result.stderr
