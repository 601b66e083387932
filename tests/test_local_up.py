"""`mlfe up` end to end: local replica processes grow under load and shrink after it, with no
errors but queue-wait 503s, and no replica process outlives mlfe."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support import EXAMPLES, Proc, free_port, spawn

ADMIN = "admin-token-for-tests"
KEY = "up-test-key-" + "x" * 32


def child_pids(pid: int) -> set[int]:
    """Every descendant of `pid` (replicas run in their own session, so walk /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_up(tmp: Path, service: dict[str, Any]) -> tuple[Proc, str]:
    port, admin_port = free_port(), free_port()
    cfg = {
        "router": {"listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}",
                   "state_dir": str(tmp / "state")},
        "services": {"slow": service},
    }
    path = tmp / "up.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = spawn(["up", "--config", str(path)], tmp / "up.log", port, {"MLFE_ADMIN_TOKEN": ADMIN})
    return p, f"http://127.0.0.1:{admin_port}/v1/stats"


def stats(url: str) -> dict[str, Any]:
    r = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
    r.raise_for_status()
    s: dict[str, Any] = r.json()["services"]["slow"]
    return s


def test_up_scales_out_under_load_and_back_in(tmp_path: Path) -> None:
    up, stats_url = start_up(tmp_path, {
        "entry_script": str(EXAMPLES / "slow" / "score.py"),
        "primary_key": KEY,
        "environment_variables": {"SLOW_RUN_MS": "50"},
        "autoscale_min_replicas": 1,
        "autoscale_max_replicas": 4,
        "autoscale_refresh_seconds": 0.5,
        "autoscale_scale_down_window_seconds": 3,
        "max_request_wait_time": 5000,
        "initial_delay_seconds": 60,
    })
    try:
        up.wait_for(lambda: up.get_ok("/-/healthy"), "router up")
        up.wait_for(lambda: stats(stats_url)["replicas"] == 1, "first replica ready")
        assert "scoring URI: " + up.url + "/api/v1/service/slow/score" in up.log()
        curl = re.search(r"try: +(curl .*)", up.log())
        assert curl is not None and KEY in curl.group(1)

        url = f"{up.url}/api/v1/service/slow/score"
        statuses: list[int] = []
        peak = 0

        async def client(c: httpx.AsyncClient, stop: asyncio.Event) -> None:
            # Bounded: each client stops at the event or after 400 requests.
            for _ in range(400):
                if stop.is_set():
                    return
                r = await c.post(url, json={"ms": 50}, headers={"Authorization": f"Bearer {KEY}"})
                statuses.append(r.status_code)

        async def load() -> None:
            nonlocal peak
            stop = asyncio.Event()
            async with httpx.AsyncClient(timeout=30) as c:
                clients = [asyncio.create_task(client(c, stop)) for _ in range(8)]
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while loop.time() < deadline and peak < 3:
                    peak = max(peak, (await asyncio.to_thread(stats, stats_url))["replicas"])
                    await asyncio.wait(clients, timeout=0.2)  # the poll interval
                stop.set()
                await asyncio.gather(*clients)

        asyncio.run(load())
        assert peak >= 3, f"replicas peaked at {peak}"
        # Nothing but 200 and queue-wait 503 under load.
        assert set(statuses) <= {200, 503}
        assert statuses.count(200) >= 8
        pids = child_pids(up.proc.pid)
        assert len([p for p in pids if alive(p)]) >= 3
        # After the load: back to the minimum once the (shortened) window has passed.
        up.wait_for(lambda: stats(stats_url)["replicas"] == 1, "scaled back in", timeout=60)
    finally:
        pids = child_pids(up.proc.pid)
        up.signal(signal.SIGTERM)
        code = up.wait_exit(timeout=60)
    assert code == 0, up.log()[-3000:]
    leftovers = [p for p in pids if alive(p)]
    for p in leftovers:
        os.kill(p, signal.SIGKILL)
    assert not leftovers, f"orphan replica processes: {leftovers}"


def test_quickstart_serves_iris_and_its_curl_line_predicts(tmp_path: Path) -> None:
    """The bundled quickstart (README's first command), on free ports: the printed curl works."""
    import shlex
    import subprocess

    cfg = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    port, admin_port = free_port(), free_port()
    cfg["router"].update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}",
                         state_dir=str(tmp_path / "state"))
    iris = cfg["services"]["iris"]
    iris["entry_script"] = str(EXAMPLES / "iris" / "score.py")
    iris["model_dir"] = str(tmp_path / "model")  # trained at first start, here
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(cfg))
    up = spawn(["up", "--config", str(path)], tmp_path / "up.log", port)
    try:
        up.wait_for(lambda: "replica on port" in up.log() and "is ready" in up.log(),
                    "iris replica ready", timeout=120)
        m = re.search(r"try: +(curl .*)", up.log())
        assert m is not None
        out = subprocess.run(shlex.split(m.group(1)), capture_output=True, timeout=30, check=True)
        assert yaml.safe_load(out.stdout) == {"result": ["setosa", "virginica"]}
        assert (tmp_path / "model" / "model.joblib").exists()
    finally:
        up.signal(signal.SIGINT)  # Ctrl-C
        assert up.wait_exit(timeout=60) == 0
