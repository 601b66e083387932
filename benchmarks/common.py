"""Helpers the benchmarks share: tools, processes, readiness polls, wrk, nginx, /proc, output.

Conventions, all on loopback:
- Every child runs in its own session and writes to a log file (never a pipe nobody reads);
  `Processes` ends each one (SIGTERM to its process group, SIGKILL after a deadline), newest
  first, also when the benchmark is interrupted.
- Nothing waits by sleeping a fixed time: `wait_until` polls a condition against a deadline and
  notices at once when a child exits.
- A wrk run with non-2xx responses or socket errors is kept in the raw results but is not a
  valid number (`WrkResult.valid`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
POST_LUA = BENCH_DIR / "wrk" / "post.lua"
RESULTS_DIR = BENCH_DIR / "results"
INSTALL_HINT = "apt-get install nginx-light wrk"
START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 10.0
POLL_S = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchmarkError(RuntimeError):
    """The benchmark cannot go on; the message says why (with the relevant log tails)."""


class MissingTool(BenchmarkError):
    """nginx or wrk is not installed."""


# --- tools -----------------------------------------------------------------------------------


def find_nginx() -> str:
    if os.access("/usr/sbin/nginx", os.X_OK):
        return "/usr/sbin/nginx"
    found = shutil.which("nginx")
    if found is None:
        raise MissingTool(
            f"nginx not found (looked at /usr/sbin/nginx and on PATH); install it: {INSTALL_HINT}"
        )
    return found


def find_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise MissingTool(f"wrk not found on PATH; install it: {INSTALL_HINT}")
    return found


def tool_version(argv: Sequence[str]) -> str:
    """The first line a `-v` style command prints (on stdout or stderr), or '' if it cannot run."""
    try:
        out = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout or out.stderr).strip()
    first = text.splitlines()[0] if text else ""
    # "nginx version: nginx/1.22.1", "wrk 4.1.0 [epoll] Copyright (C) 2012 Will Glozer"
    return first.removeprefix("nginx version: ").split(" [")[0].strip()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; a race with others is possible)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --- child processes -------------------------------------------------------------------------


@dataclass
class Child:
    """A started process, its own process group, with its output in a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def describe(self) -> str:
        state = "running" if self.alive() else f"exited with status {self.proc.returncode}"
        tail = self.log_tail().rstrip()
        return f"--- {self.name} ({state}), {self.log_path}:\n{tail or '(no output)'}"


class Processes:
    """The children a benchmark started. Leaving the `with` block ends all of them, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
        stdout_path: Path | None = None,
    ) -> Child:
        """Start `argv`; its stdout and stderr go to `<name>.log`, or its stdout alone to
        `stdout_path` when given (e.g. mlfe's access log, kept out of the readable log)."""
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log, open(stdout_path or log_path, "ab") as out:
            try:
                proc = self._popen(argv, log, env, cwd, out)
            except OSError as e:
                raise BenchmarkError(f"cannot start {name} ({' '.join(argv)}): {e}") from e
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    @staticmethod
    def _popen(
        argv: Sequence[str], log: IO[bytes], env: Mapping[str, str] | None, cwd: Path,
        out: IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out or log,
            stderr=log,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            # Its own process group: a terminal's Ctrl-C reaches only us, and we end the
            # child (and any workers it forked, like nginx's) in an order we choose.
            start_new_session=True,
        )

    def stop(self, child: Child, deadline_s: float = STOP_DEADLINE_S) -> None:
        """SIGTERM to the child's process group, SIGKILL if it is not gone by the deadline."""
        if child.proc.poll() is None:
            # The leader is not reaped yet, so its pid (= the group id) cannot have been reused.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.proc.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.proc.wait()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        """Stop every child, newest first; a second Ctrl-C meanwhile does not cut this short."""
        shielded = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if shielded else None
        try:
            while self.children:
                self.stop(self.children[-1])
        finally:
            if shielded:
                signal.signal(signal.SIGINT, previous)

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def interrupt_on_signals() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so every `finally` runs and
    every child is stopped. (SIGINT too: a shell starts background jobs with it ignored.)"""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def wait_until(
    condition: Callable[[], bool],
    what: str,
    children: Sequence[Child],
    deadline_s: float = START_DEADLINE_S,
) -> None:
    """Poll `condition` until it holds; fail at once if a child exits, or at the deadline."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        for child in children:
            if not child.alive():
                raise BenchmarkError(
                    f"{child.name} exited while waiting for {what}\n{child.describe()}"
                )
        if time.monotonic() > deadline:
            logs = "\n".join(c.describe() for c in children)
            raise BenchmarkError(f"timed out after {deadline_s:.0f} s waiting for {what}\n{logs}")
        # The poll interval: wait on a child, which returns at once if it exits.
        if children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                children[0].proc.wait(timeout=POLL_S)
        else:
            time.sleep(POLL_S)


# --- HTTP probes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes


def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    timeout_s: float = 2.0,
) -> HttpReply | None:
    """One request on a fresh connection; None if the connection or the exchange failed."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return HttpReply(resp.status, resp.read())
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def accepts_connections(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    """A readiness condition: something accepts TCP connections on the port."""

    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            return False

    return check


def answers_200(port: int, path: str) -> Callable[[], bool]:
    """A readiness condition: `GET path` answers 200."""

    def check() -> bool:
        reply = http_request(port, "GET", path)
        return reply is not None and reply.status == 200

    return check


# --- CPU time from /proc ---------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may contain spaces and parentheses):
    index 0 is field 3 (state), so field n is at index n - 3."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included (utime + stime)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds_total(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def reaped_children_cpu_s() -> float:
    """CPU time of this process's children that have exited and been waited for (e.g. a
    finished wrk run: take the difference around it)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat: the difference of two
    readings says how busy the whole machine was in between (others' load included)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def wait_for_quiet(max_load_cores: float, max_wait_s: float, window_s: float = 0.5) -> float:
    """Sample how busy the whole machine is over short windows until it is at most
    `max_load_cores` or `max_wait_s` has passed; the last sample, in cores. (Call it while the
    benchmark's own processes are idle, so what it sees is everyone else.)"""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy_before, _ = machine_busy()
        start = time.monotonic()
        time.sleep(window_s)  # the sampling window, not a wait for readiness
        busy_after, _ = machine_busy()
        load = (busy_after - busy_before) / CLK_TCK / (time.monotonic() - start)
        if load <= max_load_cores or time.monotonic() >= deadline:
            return load


def child_pids(parent: int) -> list[int]:
    """Live processes whose parent is `parent` (e.g. an nginx master's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == parent:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return sorted(found)


# --- nginx -----------------------------------------------------------------------------------


def render_nginx_conf(
    prefix: Path, *, listen_port: int, location: str, http_extra: str = ""
) -> str:
    """A complete one-worker nginx.conf whose every path (pid, error log, temp dirs) lies under
    `prefix`, so it runs as any user. `location` is the body of `location /`, which serves
    every URL; `http_extra` goes into the http block (e.g. an `upstream`)."""
    p = prefix
    return f"""\
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {p}/client_body_temp;
    proxy_temp_path {p}/proxy_temp;
    fastcgi_temp_path {p}/fastcgi_temp;
    uwsgi_temp_path {p}/uwsgi_temp;
    scgi_temp_path {p}/scgi_temp;
    # Keep client connections open for the whole run (nginx closes one after 1000 requests by
    # default, which would charge nginx with reconnects mlfe does not make).
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{_indent(http_extra, 4)}
    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        location / {{
{_indent(location, 12)}
        }}
    }}
}}
"""


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line.strip() else "" for line in text.strip().splitlines())


def nginx_return_location(body: str) -> str:
    """The fastest possible replica: answer every request with `body` as JSON."""
    if "'" in body or "\\" in body:
        raise ValueError("body must not contain quotes or backslashes")
    return f"default_type application/json;\nreturn 200 '{body}';"


def nginx_proxy(upstream: str, rewrite_to: str | None = None) -> tuple[str, str]:
    """(http_extra, location) for nginx `proxy_pass` to `upstream` (HOST:PORT) over kept-alive
    HTTP/1.1 connections; with `rewrite_to`, every URL is sent upstream as that path."""
    http_extra = f"""\
upstream bench_upstream {{
    server {upstream};
    keepalive 256;
    keepalive_requests 1000000;
}}"""
    rewrite = f"rewrite ^ {rewrite_to} break;\n" if rewrite_to else ""
    location = (
        f"{rewrite}proxy_http_version 1.1;\n"
        'proxy_set_header Connection "";\n'
        "proxy_pass http://bench_upstream;"
    )
    return http_extra, location


def _make_traversable(path: Path) -> None:
    """As root, nginx's workers run as an unprivileged user: let them reach the temp dirs
    (`path` and each parent below the system temp dir, e.g. the 0700 one mkdtemp made)."""
    if os.geteuid() != 0:
        return
    stop = Path(tempfile.gettempdir()).resolve()
    for p in (path.resolve(), *path.resolve().parents):
        if p in (stop, Path("/")):
            break
        mode = p.stat().st_mode
        if mode & 0o001 == 0:
            p.chmod(mode | 0o711)


def start_nginx(
    procs: Processes,
    name: str,
    nginx: str,
    prefix: Path,
    conf: str,
) -> Child:
    """Write `conf` to `prefix`/nginx.conf, check it with `nginx -t`, start nginx in the
    foreground. The caller waits for readiness."""
    prefix.mkdir(parents=True, exist_ok=True)
    _make_traversable(prefix)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    argv = [nginx, "-p", f"{prefix}/", "-c", str(conf_path), "-e", str(prefix / "error.log")]
    check = subprocess.run(
        [*argv, "-t", "-q", "-g", "daemon off;"], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise BenchmarkError(
            f"nginx refused the generated {conf_path}:\n{check.stderr.strip()}\n{conf}"
        )
    return procs.start(name, [*argv, "-g", "daemon off;"])


def nginx_worker_pids(master: Child) -> list[int]:
    """The master's workers (it forks them after it starts listening: wait for them)."""
    try:
        wait_until(lambda: bool(child_pids(master.pid)), f"{master.name}'s workers", [master],
                   deadline_s=5.0)
    except BenchmarkError as e:
        raise BenchmarkError(f"{master.name}: no worker processes found\n{e}") from None
    return child_pids(master.pid)


# --- wrk ---------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    latency_avg_ms: float
    latency_max_ms: float
    percentiles_ms: dict[str, float]  # "50", "75", "90", "99" (with --latency)
    non_2xx: int
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect, read, write, timeout

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    @property
    def valid(self) -> bool:
        """A number worth reporting: requests were made and none failed."""
        return self.requests > 0 and self.errors == 0

    def error_summary(self) -> str:
        parts = []
        if self.non_2xx:
            parts.append(f"{self.non_2xx} non-2xx")
        parts += [f"{n} {kind}" for kind, n in self.socket_errors.items() if n]
        if self.requests == 0:
            parts.append("no requests")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "duration_s": self.duration_s,
            "rps": self.rps,
            "latency_avg_ms": self.latency_avg_ms,
            "latency_max_ms": self.latency_max_ms,
            "percentiles_ms": self.percentiles_ms,
            "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors,
            "valid": self.valid,
        }


_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Read wrk 4's text report (run with --latency for the percentiles)."""
    done = re.search(rf"^\s*(\d+) requests in {_NUM}(us|ms|s|m|h)", text, re.M)
    rps = re.search(rf"^Requests/sec:\s+{_NUM}", text, re.M)
    if done is None or rps is None:
        raise BenchmarkError(f"cannot read wrk's report:\n{text}")
    latency = re.search(
        rf"^\s*Latency\s+{_NUM}(us|ms|s|m|h)\s+\S+\s+{_NUM}(us|ms|s|m|h)", text, re.M
    )
    percentiles = {
        m.group(1): _ms(m.group(2), m.group(3))
        for m in re.finditer(rf"^\s*(\d+(?:\.\d+)?)%\s+{_NUM}(us|ms|s|m|h)\s*$", text, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    sock = re.search(
        r"Socket errors:\s*connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
        if sock
        else {}
    )
    return WrkResult(
        requests=int(done.group(1)),
        duration_s=_ms(done.group(2), done.group(3)) / 1e3,
        rps=float(rps.group(1)),
        latency_avg_ms=_ms(latency.group(1), latency.group(2)) if latency else float("nan"),
        latency_max_ms=_ms(latency.group(3), latency.group(4)) if latency else float("nan"),
        percentiles_ms=percentiles,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
    )


def run_wrk(
    wrk: str,
    url: str,
    *,
    connections: int,
    threads: int,
    duration_s: int,
    script: Path = POST_LUA,
    headers: Sequence[str] = (),
    timeout_s: int = 5,
    latency: bool = True,
) -> tuple[WrkResult, str]:
    """Run wrk to completion; (parsed report, raw report). wrk's own process is ended if we are
    interrupted."""
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
    ]
    for header in headers:
        argv += ["-H", header]
    if latency:
        argv.append("--latency")
    argv.append(url)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=duration_s + timeout_s + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchmarkError(f"wrk exited with status {proc.returncode}: {' '.join(argv)}\n{out}")
    return parse_wrk(out), out


def lua_body(script: Path = POST_LUA) -> bytes:
    """The request body a wrk script sends (`wrk.body = '...'`), so probes send the same bytes."""
    m = re.search(r"^wrk\.body\s*=\s*'([^']*)'", script.read_text(), re.M)
    if m is None:
        raise BenchmarkError(f"{script}: no wrk.body = '...' line")
    return m.group(1).encode()


def mlfe_build() -> str:
    """Which build of the scoring path `mlfe serve` runs here: `make compile` leaves mypyc's
    extension modules beside the sources, and Python prefers them."""
    compiled = sorted(p.name.split(".")[0] for p in REPO.glob("router/*.so"))
    return f"mypyc-compiled ({', '.join(compiled)})" if compiled else "pure Python"


# --- output ------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float | None:
    vals = list(values)
    return statistics.median(vals) if vals else None


def markdown_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    align: Sequence[Literal["l", "r"]] | None = None,
) -> str:
    """A GitHub-flavoured markdown table, columns padded so it also reads well as plain text."""
    align = align or ["l"] * len(headers)
    widths = [
        max(len(headers[i]), *(len(r[i]) for r in rows), 3) for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if a == "r" else c.ljust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(
        ("-" * (w - 1) + ":") if a == "r" else "-" * w for w, a in zip(widths, align, strict=True)
    ) + " |"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fmt_num(value: float | None, digits: int = 0, signed: bool = False) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    spec = f"{'+' if signed else ''},.{digits}f"
    return format(value, spec)


def run_record(name: str, started: dt.datetime, argv: Sequence[str] | None,
               settings: Any) -> dict[str, Any]:
    """The fields every benchmark's JSON begins with: which one, when, how it was run."""
    return {
        "benchmark": name,
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.UTC).isoformat(),
        "command": " ".join([f"python -m benchmarks.{name}", *(argv or sys.argv[1:])]),
        "settings": settings,
    }


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(tools: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """What the numbers were measured on; `tools` maps a name to a version command."""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "tools": {name: tool_version(argv) for name, argv in (tools or {}).items()},
    }


# --- process trees, memory, percentiles, open-loop load (workers, autoscale, overload) -------


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant of it (one scan of /proc): a supervisor and its
    workers, even when those run in sessions of their own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def cpu_seconds_alive(pids: Iterable[int]) -> float:
    """utime + stime summed over `pids`, skipping any that have exited meanwhile."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process in KiB (VmRSS of /proc/<pid>/status); None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    vals = sorted(values)
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


async def http_get_json_async(
    port: int, path: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 2.0,
    host: str = "127.0.0.1",
) -> Any:
    """GET `path` on a fresh connection from inside an event loop and decode its JSON body;
    None if the exchange failed or did not answer 200 with JSON."""
    import asyncio

    request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
               + "\r\n").encode()
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status, _, body = await _read_response(reader)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError):
        return None
    finally:
        if writer is not None:
            writer.close()
    if status != 200:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


async def _read_response(reader: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response off an asyncio.StreamReader: (status, lower-cased headers,
    body); bodies by Content-Length or chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
    if status < 200 or status in (204, 304):
        return status, hdrs, b""
    if "content-length" in hdrs:
        return status, hdrs, await reader.readexactly(int(hdrs["content-length"]))
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return status, hdrs, b"".join(parts)
            parts.append((await reader.readexactly(size + 2))[:-2])
    raise ValueError("response without Content-Length or chunked encoding")


# (scheduled time, latency, status, Retry-After present). Times in seconds from the load's
# start; latency from the *scheduled* time (an open-loop generator that falls behind charges
# the wait to the system, not to itself). status 0: connection error or client timeout;
# -1: not sent (the generator was at its connection limit).
LoadRecord = tuple[float, float, int, bool]


async def open_loop_load(
    port: int,
    path: str,
    *,
    rate_at: Callable[[float], float],
    duration_s: float,
    records: list[LoadRecord],
    headers: Mapping[str, str] | None = None,
    body: bytes = b'{"data": [1]}',
    max_connections: int = 1024,
    timeout_s: float = 30.0,
    t0: float | None = None,
    host: str = "127.0.0.1",
    idle_close_s: float = 30.0,
) -> int:
    """Open-loop load: POST `path` at the offered rate `rate_at(t)` (requests/s, t in seconds
    since `t0`, default now) for `duration_s`, each request started on its schedule whether or
    not earlier ones have been answered (evenly spaced at the current rate, not closed-loop).
    Keep-alive connections are reused from a free list; a new one is opened when none is idle,
    up to `max_connections`; one idle for `idle_close_s` is closed rather than reused (servers
    close idle keep-alive connections, mlfe and nginx after 75 s), and a request whose reused
    connection turns out closed before any answer is sent once more on a new one, as HTTP
    clients do. Each answer (or failure) is appended to `records` as it happens,
    so a caller can read them while the load runs. Returns how many requests were scheduled.
    Waits for outstanding answers (at most `timeout_s`) before returning."""
    import asyncio

    loop = asyncio.get_running_loop()
    start = loop.time() if t0 is None else t0
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
               + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # + since when
    open_conns = 0
    tasks: set[asyncio.Task[None]] = set()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        nonlocal open_conns
        if open_conns >= max_connections:
            return None
        open_conns += 1
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            open_conns -= 1
            raise

    def take_idle() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        nonlocal open_conns
        now = loop.time()
        while idle:
            reader, writer, since = idle.pop()
            if now - since < idle_close_s:
                return reader, writer
            writer.close()  # idle for long: the server may be closing it right now
            open_conns -= 1
        return None

    async def one(scheduled: float) -> None:
        nonlocal open_conns
        conn = take_idle()
        reused = conn is not None
        while True:
            if conn is None:
                try:
                    conn = await connect()
                except (OSError, TimeoutError):
                    records.append((scheduled, loop.time() - start - scheduled, 0, False))
                    return
                if conn is None:
                    records.append((scheduled, 0.0, -1, False))
                    return
            reader, writer = conn
            try:
                writer.write(request)
                async with asyncio.timeout(timeout_s):
                    status, hdrs, _ = await _read_response(reader)
                break
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as e:
                writer.close()
                open_conns -= 1
                # A kept-alive connection the server closed before reading our request (its
                # idle timeout): what HTTP clients do, send it once more on a new connection.
                stale = reused and (
                    isinstance(e, ConnectionResetError | BrokenPipeError)
                    or (isinstance(e, asyncio.IncompleteReadError) and not e.partial))
                if stale:
                    conn, reused = None, False
                    continue
                records.append((scheduled, loop.time() - start - scheduled, 0, False))
                return
        records.append((scheduled, loop.time() - start - scheduled, status,
                        "retry-after" in hdrs))
        if hdrs.get("connection", "").lower() == "close":
            writer.close()
            open_conns -= 1
        else:
            idle.append((reader, writer, loop.time()))

    scheduled = 0
    t = 0.0
    idle_step = 0.01  # how finely a zero-rate stretch is stepped through
    while t < duration_s:
        rate = rate_at(t)
        if rate <= 0:
            t += idle_step
            continue
        delay = start + t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(t))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        scheduled += 1
        t += 1.0 / rate
    rest = start + duration_s - loop.time()
    if rest > 0:
        await asyncio.sleep(rest)
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout_s)
    for _, writer, _ in idle:
        writer.close()
    return scheduled
