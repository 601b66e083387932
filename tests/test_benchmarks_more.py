"""The workers, autoscale and overload benchmarks run end to end in their --quick modes (seconds
each): real nginx, wrk, `mlfe serve` / `mlfe up` and `mlfe score-server` on loopback.

Each prints markdown tables; these tests read the rows they must have and check the numbers are
there and sane. nginx and wrk are installed by CI (`apt-get install nginx-light wrk`).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.autoscale import direction_changes
from benchmarks.common import percentile

REPO = Path(__file__).resolve().parents[1]


def run_quick(module: str, results: Path, timeout_s: float = 85) -> str:
    """`python -m benchmarks.<module> --quick`; on a timeout it gets SIGTERM first, so that it
    stops the processes it started (they run in sessions of their own) before pytest's own
    120 s timeout."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--results-dir", str(results)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise AssertionError(f"benchmarks.{module} --quick took over {timeout_s:g} s\n"
                             f"stdout:\n{stdout}\nstderr:\n{stderr[-6000:]}") from None
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr[-6000:]}"
    return stdout


def table_rows(stdout: str) -> dict[str, list[str]]:
    """First cell -> the row's cells, for every markdown table row printed."""
    rows: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def table_rows_all(stdout: str) -> list[list[str]]:
    """Every markdown table row printed, as cells (for tables whose first cell repeats)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in stdout.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_direction_changes_counts_reversals_only() -> None:
    assert direction_changes([1, 1, 4, 4, 4, 3, 3, 1, 4]) == (2, 2, 2)
    assert direction_changes([1, 2, 3, 4]) == (0, 3, 0)
    assert direction_changes([]) == (0, 0, 0)


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(range(101), 99) == pytest.approx(99.0)


def test_workers_quick(tmp_path: Path) -> None:
    out = run_quick("workers", tmp_path)
    rows = table_rows(out)
    for name, procs in (("1 worker", 1), ("1 worker + broker", 1), ("2 workers", 3)):
        assert name in rows, out
        cells = rows[name]
        assert number(cells[1]) == procs, out  # supervisor + 2 workers
        assert number(cells[2]) > 0, out  # req/s
        assert number(cells[4]) > 0, out  # x 1 worker
        assert number(cells[7]) > 0, out  # router CPU µs/req
        assert cells[-1] == "-", out  # no errors
        assert (cells[8] == "-") == (procs == 1), out  # supervisor share: workers only
    assert number(rows["1 worker"][4]) == 1.0
    assert "Coordination cost" in out
    data = json.loads(next(tmp_path.glob("workers-*.json")).read_text())
    assert all(r["valid"] for r in data["runs"])
    assert {r["config"] for r in data["runs"]} >= {"1 worker", "1 worker + broker", "2 workers"}


def test_autoscale_quick(tmp_path: Path) -> None:
    out = run_quick("autoscale", tmp_path, timeout_s=110)
    rows = table_rows(out)
    for col, policy in ((1, "demand"), (2, "azureml")):
        def cell(name: str, col: int = col) -> float:
            return number(rows[name][col])

        decision = cell("step -> scale decision (desired rises)")
        assert 0 <= decision <= 2.5, out  # within a 1 s refresh (plus a sample)
        assert cell("desired at its highest in the step") >= 3, out
        assert cell("step -> first added replica serving (ready rises)") >= decision, out
        # A 2 s scale-down window in --quick: down to the minimum well inside the 5 s drop.
        assert 0 < cell("drop -> desired at the minimum (1)") <= 5, out
        assert cell("requests neither 200 nor 503") == 0, (policy, out)
    # 3 replicas needed: the demand policy asks for 3 or 4, never the maximum's overshoot.
    assert number(rows["desired at its highest in the step"][1]) <= 4, out
    phases = [r for r in table_rows_all(out) if r[1] in ("idle", "step", "drop", "square")]
    assert {(r[0], r[1]) for r in phases} == {
        (p, ph) for p in ("demand", "azureml") for ph in ("idle", "step", "drop", "square")}
    for r in phases:
        if r[1] == "step":
            assert number(r[3]) > 0 and number(r[4]) > 0, out  # offered, served
    # Scale to zero: back at no replica about a window after the last request, and the
    # request after idle served after a cold start (it waited in the queue, no 503).
    assert number(rows["first request after idle: status"][1]) == 200, out
    assert number(rows["first request after idle: queueMs (access log)"][1]) > 0, out
    assert number(rows["503s in the scale-to-zero run"][1]) == 0, out
    assert 1 <= number(rows["last request -> no replica"][1]) <= 10, out
    # The goals, as verdicts on the demand policy's numbers above.
    goals = {line[2:line.index(": ")]: line[line.index(": ") + 2:]
             for line in out.splitlines() if line.startswith("- ") and (
                 ": met: " in line or ": NOT met: " in line)}
    def demand(name: str) -> float:
        return number(rows[name][1])

    assert len(goals) == 8, out
    assert goals["peak desired <= 4 (the step needs 3)"].startswith("met"), out
    assert goals["decision <= 1 s after the step"].startswith(
        "met" if demand("step -> scale decision (desired rises)") <= 1 else "NOT met"), out
    serving = rows["step -> 3 replicas serving"][1]
    assert goals["3 replicas serving <= 2 s after the step"].startswith(
        "met" if serving != "-" and number(serving) <= 2 else "NOT met"), out
    assert goals["503s only while the first added replicas start"].startswith(
        "met" if rows["503s in the step after the first decision's replicas all served"][1]
        == "0" else "NOT met"), out
    reversals = demand("square wave: direction changes of desired")
    assert goals["no flapping in the square wave"].startswith(
        "met" if reversals == 0 else "NOT met"), out
    assert goals["the first request after idle served 200 after one cold start, its wait in "
                 "the access log, no 503"].startswith("met"), out
    assert len(list(tmp_path.glob("autoscale-*.png"))) == 1
    data = json.loads(next(tmp_path.glob("autoscale-*.json")).read_text())
    assert [g["name"] for g in data["goals"]] == list(goals)
    phases_at = {p["name"]: (p["start"], p["end"]) for p in data["phases"]}
    for col, policy in ((1, "demand"), (2, "azureml")):
        run = data["runs"][policy]
        samples = run["samples"]
        assert len(samples) > 50  # every 100 ms
        assert {"replicas", "desired", "current", "busy", "queued"} <= set(samples[0])
        # The 503 share of the step, as the raw records have it: one replica at first, for
        # load that needs three, so some are refused (and not all).
        start, end = phases_at["step"]
        step = [r[2] for r in run["records"]["rows"] if start <= r[0] < end]
        share = 100 * step.count(503) / len(step)
        # (abs=1: the JSON's times are rounded, so a request at the step's very end may move out)
        assert number(rows["503 share in the step"][col]) == pytest.approx(share, abs=1.0), out
        assert 0 <= share < 100, out
        # The square wave's reversals of desired, from the samples.
        start, end = phases_at["square"]
        wave = [x["desired"] for x in samples if start <= x["t"] < end and "desired" in x]
        reversals, _, _ = direction_changes(wave)
        assert number(rows["square wave: direction changes of desired"][col]) == reversals, out
    assert data["scale_to_zero"]["status"] == 200


def test_overload_quick(tmp_path: Path) -> None:
    out = run_quick("overload", tmp_path)
    rows = table_rows(out)
    for name in ("deadline", "queue-full"):
        cells = rows[name]
        ok, refused, other = number(cells[5]), number(cells[6]), number(cells[7])
        assert ok > 20 and refused > 20, out  # 2x capacity: about half each
        assert other == 0, out
        assert number(cells[14]) == 100, out  # every 503 carries Retry-After
        # The router's RSS in MiB before / at most / after: a Python router's size (a wrong
        # process or a unit slip would not be), the most at least each end.
        before, most, after = (float(x) for x in cells[15].split("/"))
        assert 10 < before <= most < 1024 and after <= most, out
    deadline, full = rows["deadline"], rows["queue-full"]
    # Refused at the queue deadline (max_request_wait_time 500 ms) ...
    assert 450 <= number(deadline[8]) <= 800, out
    # ... or at once with a full queue, which never grows past its limit.
    assert number(full[8]) < 100, out
    assert number(full[13]) <= number(full[1]), out
    assert "Verdicts:" in out


async def test_open_loop_load_keeps_its_schedule_and_survives_closed_keepalive() -> None:
    """An open-loop run against a server that closes idle keep-alive connections after 0.3 s:
    every request is answered (a stale connection is retried on a new one), on schedule."""
    import asyncio

    from benchmarks.common import LoadRecord, open_loop_load

    in_flight = most = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, most
        try:
            while True:
                async with asyncio.timeout(0.3):
                    head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                in_flight += 1
                most = max(most, in_flight)
                try:
                    await asyncio.sleep(0.1)  # the service time: 5 requests overlap at 50/s
                finally:
                    in_flight -= 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    records: list[LoadRecord] = []
    try:
        scheduled = await open_loop_load(
            port, "/score", rate_at=lambda t: 50.0 if t < 0.2 or t >= 0.8 else 0.0,
            duration_s=1.0, records=records, timeout_s=5.0, idle_close_s=60.0)
    finally:
        server.close()
        await server.wait_closed()
    assert scheduled == len(records)
    assert 19 <= scheduled <= 22  # 50 req/s for 2 x 0.2 s
    assert [r[2] for r in records] == [200] * scheduled
    # Open loop: the next request goes on its schedule without waiting for the answers before
    # it, so requests overlap at the server (a closed loop would show one at a time).
    assert most >= 3, most
    assert max(r[1] for r in records) < 0.5
    starts = sorted(r[0] for r in records)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert starts[0] == 0.0
    assert sorted(gaps)[-1] > 0.55  # the pause, long enough for the server to close them
    assert all(abs(g - 0.02) < 1e-6 for g in sorted(gaps)[:-1])  # scheduled 20 ms apart


def test_sidecar_quick(tmp_path: Path) -> None:
    stdout = run_quick("sidecar", tmp_path)
    rows = [line for line in stdout.splitlines() if line.startswith(("| on", "| off"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        rss, rps, cpu = float(cells[1]), float(cells[2].replace(",", "")), float(cells[3])
        assert rss > 0 and rps > 0 and cpu > 0 and cells[4] == "0"
    assert list(tmp_path.glob("sidecar-*.json"))


def test_soak_quick(tmp_path: Path) -> None:
    """A few seconds of the soak: every kind of answer happens, the samples and the plot are
    there. (The verdicts are printed, not held against a run this short.)"""
    out = run_quick("soak", tmp_path)
    data = json.loads(next(tmp_path.glob("soak-*.json")).read_text())
    statuses: dict[str, int] = {}
    for chunk in data["chunks"]:
        for status, n in chunk["statuses"].items():
            statuses[status] = statuses.get(status, 0) + n
        assert not any(chunk["socket_errors"].values()), out
    assert {"200", "401", "413"} <= set(statuses), out
    assert statuses["200"] > statuses["401"] > statuses["413"] > 0, out
    slow = [status for _, _, status in data["slow"]]
    assert slow and 504 in slow and 0 not in slow, out  # the slow model: timed out, answered
    assert data["aborts"]["mid_body"] > 0 and data["aborts"]["awaiting_answer"] > 0, out
    assert len(data["samples"]) >= 10, out
    assert all(s["rss_kib"] > 0 and s["fds"] > 0 and s["tasks"] > 0 for s in data["samples"])
    assert data["replica_stats"]["maxRunning"] >= 1, out
    names = {v["name"] for v in data["verdicts"]}
    assert {"RSS flat", "fds flat", "Tasks flat", "slow model answered by its deadline",
            "replica concurrency within its cap"} <= names, out
    assert "replica concurrency within its cap" in out and "Verdicts (--quick" in out
    assert len(list(tmp_path.glob("soak-*.png"))) == 1
