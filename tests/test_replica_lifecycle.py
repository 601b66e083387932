"""Local replicas end to end (`mlfe up`): scale to zero and back on the next request, probing as
Kubernetes does it (a slow start is not killed early), and failed starts retried with a backoff
that `GET /v1/stats` shows."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deploy import local_target
from mlfe.config import parse_config
from mlfe.supervise import Supervisor
from router.auth import NoAuth
from router.services import Service, ServiceLinks
from tests.support import Proc, free_port, spawn

ADMIN = "admin-token-for-tests"
KEY = "lifecycle-test-key-" + "x" * 32


def start_up(tmp: Path, service: dict[str, Any], access_log: bool = False) -> tuple[Proc, str]:
    port, admin_port = free_port(), free_port()
    cfg = {
        "router": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}",
                   "state_dir": str(tmp / "state"), "access_log": access_log},
        "services": {"svc": {"primary_key": KEY, **service}},
    }
    path = tmp / "up.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = spawn(["up", "--config", str(path)], tmp / "up.log", port, {"MLFE_ADMIN_TOKEN": ADMIN})
    return p, f"http://127.0.0.1:{admin_port}"


def stats(admin: str) -> dict[str, Any]:
    r = httpx.get(admin + "/v1/stats", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
    r.raise_for_status()
    s: dict[str, Any] = r.json()["services"]["svc"]
    return s


def stop(up: Proc) -> None:
    up.signal(signal.SIGTERM)
    code = up.wait_exit(timeout=60)
    assert code == 0, up.log()[-3000:]


def access_lines(up: Proc) -> list[dict[str, Any]]:
    out = []
    for line in up.log().splitlines():
        if line.startswith("{") and '"requestId"' in line:
            out.append(json.loads(line))
    return out


def test_scales_to_zero_and_the_next_request_waits_for_a_cold_start(tmp_path: Path) -> None:
    up, admin = start_up(tmp_path, {
        "synthetic": {"latency": "fixed:5", "init_ms": 300},
        "autoscale_min_replicas": 0,
        "autoscale_refresh_seconds": 0.5,
        "autoscale_scale_down_window_seconds": 2,
        "autoscale_cold_start_seconds": 30,
        "max_request_wait_time": 500,
    }, access_log=True)
    try:
        up.wait_for(lambda: up.get_ok("/-/healthy"), "router up")
        # Starts at the minimum, 0, and says so.
        up.wait_for(lambda: stats(admin).get("scaledToZero") is True, "scaled to zero")
        assert stats(admin)["replicas"] == 0
        metrics = httpx.get(admin + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"},
                            timeout=5).text
        assert 'mlfe_scaled_to_zero{service="svc"} 1.0' in metrics

        r = httpx.post(f"{up.url}/api/v1/service/svc/score", json={"data": [1]},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200, r.text
        up.wait_for(lambda: any(a["service"] == "svc" for a in access_lines(up)), "access log")
        (line,) = [a for a in access_lines(up) if a["service"] == "svc"]
        # It waited for the replica to start (its init alone is 300 ms), longer than
        # max_request_wait_time, and was served, not refused.
        assert line["status"] == 200 and line["queueMs"] > 500, line
        st = stats(admin)
        assert st["replicas"] == 1
        # What the demand policy reads: one arrival, served, its replica time counted.
        assert (st["arrivals"], st["served"]) == (1, 1) and st["serviceSeconds"] > 0.004
        # Idle again: back to zero after the window.
        up.wait_for(lambda: stats(admin).get("scaledToZero") is True, "scaled to zero again",
                    timeout=30)
    finally:
        stop(up)


async def test_the_queue_timer_follows_the_first_replica_into_rotation() -> None:
    """Two requests wait at zero (cold-start bound 30 s, the timer armed for it); the first
    replica comes in and serves one: the other's max_request_wait_time (200 ms) runs from
    then, and the timer is re-armed for it (not left at the cold-start bound)."""
    cfg = parse_config({"services": {"svc": {
        "synthetic": {"latency": "fixed:5"}, "auth_enabled": False,
        "autoscale_min_replicas": 0, "autoscale_cold_start_seconds": 30,
        "max_request_wait_time": 200, "replica_max_concurrent_requests": 1}}}).services["svc"]
    svc = Service("svc", cfg, NoAuth(), ServiceLinks(Supervisor()))
    loop = asyncio.get_running_loop()
    granted: list[str] = []
    expired: asyncio.Future[float] = loop.create_future()
    try:
        svc.pool.admit(loop.time(), lambda r: granted.append("first"), lambda: None)
        svc.pool.admit(loop.time(), lambda r: granted.append("second"),
                       lambda: expired.set_result(loop.time()))
        svc.schedule_expiry()
        assert svc.expiry is not None and svc.expiry.when() > loop.time() + 29
        ready_at = loop.time()
        svc.add_replica("127.0.0.1:9")  # never connected to: the grant is all this checks
        assert granted == ["first"]
        expired_at = await asyncio.wait_for(expired, timeout=20)
        assert expired_at >= ready_at + 0.2 and granted == ["first"]
    finally:
        svc.close()


def test_a_replica_slower_to_start_than_initial_delay_is_not_killed(tmp_path: Path) -> None:
    """initial_delay_seconds 1, period 1: the replica listens only after ~2.5 s (an init of
    2 s); Kubernetes would fail 1-2 probes and wait for failure_threshold (5), so it lives."""
    up, admin = start_up(tmp_path, {
        "synthetic": {"latency": "fixed:5", "init_ms": 2000},
        "num_replicas": 1,
        "initial_delay_seconds": 1,
        "period_seconds": 1,
        "failure_threshold": 5,
    })
    try:
        up.wait_for(lambda: up.get_ok("/-/healthy"), "router up")
        up.wait_for(lambda: stats(admin)["replicas"] == 1, "the replica ready", timeout=60)
        st = stats(admin)
        assert st["startFailures"] == 0, up.log()[-3000:]
        assert "failed" not in up.log()
    finally:
        stop(up)


def test_a_failing_start_is_retried_with_a_backoff_shown_in_stats(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("def init():\n    raise RuntimeError('no model here')\n\n"
                      "def run(data):\n    return data\n")
    up, admin = start_up(tmp_path, {
        "entry_script": str(script),
        "num_replicas": 1,
        "initial_delay_seconds": 1,
        "period_seconds": 1,
    })
    try:
        up.wait_for(lambda: up.get_ok("/-/healthy"), "router up")
        up.wait_for(lambda: stats(admin).get("startFailures", 0) >= 2
                    and "retryInSeconds" in stats(admin), "failed starts and a backoff",
                    timeout=60)
        assert stats(admin)["replicas"] == 0
    finally:
        stop(up)


async def test_replicas_start_at_most_start_slots_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three replicas asked for at once, one start slot: each process is spawned only once the
    one before it is ready, and none is counted ready before it is."""
    monkeypatch.setattr(local_target, "start_slots", lambda: 1)
    cfg = parse_config({"services": {"svc": {
        "synthetic": {"latency": "fixed:5", "init_ms": 400}, "num_replicas": 3,
        "auth_enabled": False}}}).services["svc"]
    supervisor = Supervisor()
    svc = Service("svc", cfg, NoAuth(), ServiceLinks(supervisor))
    target = local_target.LocalTarget({"svc": svc}, tmp_path, supervisor)
    target.configure({"svc": svc}, {"svc": cfg})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    try:
        while loop.time() < deadline:
            reps = target.replicas("svc")
            spawned = [r for r in reps
                       if r.state is local_target.State.STARTING and r.proc is not None]
            assert len(spawned) <= 1, [(r.state, r.port) for r in reps]
            ready = [r for r in reps if r.state is local_target.State.READY]
            assert svc.pool.ready == len(ready)  # in the pool exactly when ready
            if len(ready) == 3:
                break
            await asyncio.sleep(0.02)  # the poll interval
        assert svc.pool.ready == 3
    finally:
        await target.close()
        svc.close()


# A replica that starts and then hangs: it says nothing and listens on nothing until the test
# creates the file named in argv[1]; then it listens, says so as `mlfe score-server` does, and
# answers every probe 200.
STUCK_REPLICA = """
import os, socket, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(16)
print(f"Listening on http://127.0.0.1:{s.getsockname()[1]}", flush=True)
while True:
    c, _ = s.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n")
    c.close()
"""


async def test_a_replica_stuck_starting_gives_its_start_slot_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One start slot, two replicas; the first never listens and liveness would give it 300 s
    (initial_delay_seconds). After START_SLOT_MAX_S the second starts and serves while the
    first is still starting (not killed, not in the pool); probed on outside the slot, the
    first joins the pool once it answers."""
    monkeypatch.setattr(local_target, "start_slots", lambda: 1)
    monkeypatch.setattr(local_target, "START_SLOT_MAX_S", 1.0)
    script, release = tmp_path / "stuck.py", tmp_path / "go"
    script.write_text(STUCK_REPLICA)
    real_argv = local_target.LocalTarget.replica_argv
    spawned: list[str] = []

    def argv(self: local_target.LocalTarget, cfg: Any) -> tuple[list[str], int | None]:
        spawned.append("stuck" if not spawned else "ok")
        if spawned[-1] == "stuck":
            return [sys.executable, str(script), str(release)], None
        return real_argv(self, cfg)

    monkeypatch.setattr(local_target.LocalTarget, "replica_argv", argv)
    cfg = parse_config({"services": {"svc": {
        "synthetic": {"latency": "fixed:5"}, "num_replicas": 2, "auth_enabled": False,
        "initial_delay_seconds": 300, "period_seconds": 1}}}).services["svc"]
    supervisor = Supervisor()
    svc = Service("svc", cfg, NoAuth(), ServiceLinks(supervisor))
    target = local_target.LocalTarget({"svc": svc}, tmp_path, supervisor)
    target.configure({"svc": svc}, {"svc": cfg})
    loop = asyncio.get_running_loop()

    async def until(what: str, cond: Any, within_s: float = 60) -> None:
        deadline = loop.time() + within_s
        while not cond():
            assert loop.time() < deadline, what
            await asyncio.sleep(0.05)  # the poll interval

    def states() -> list[local_target.State]:
        return [r.state for r in target.replicas("svc")]

    try:
        await until("the second replica ready beside the stuck one",
                    lambda: svc.pool.ready == 1, within_s=30)
        assert spawned == ["stuck", "ok"]
        assert sorted(s.value for s in states()) == ["ready", "starting"]
        assert target.start_status("svc")["startFailures"] == 0
        release.touch()
        await until("the stuck replica ready once it answers", lambda: svc.pool.ready == 2)
        assert states() == [local_target.State.READY] * 2
    finally:
        await target.close()
        svc.close()
