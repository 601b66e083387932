"""Helpers for integration tests: real `mlfe` processes on loopback, polled with deadlines.

Nothing here sleeps for a fixed time: every wait polls a condition and paces itself by waiting
briefly on the process itself, so a crash is seen at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    """A child process with its output in a log file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pause(self, seconds: float = 0.02) -> None:
        """The poll interval: wait on the process (it returns at once if it exits)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=seconds)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S,
                 allow_exit: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if not allow_exit and self.proc.poll() is not None:
                raise AssertionError(f"process exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")
            self.pause()

    def get_ok(self, path: str) -> bool:
        try:
            return httpx.get(self.url + path, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = DEADLINE_S) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def spawn(args: list[str], log_path: Path, port: int, env: Mapping[str, str] | None = None) -> Proc:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    return _track(Proc(proc, log_path, port))


def start_replica(tmp: Path, entry_script: Path | str, env: Mapping[str, str] | None = None,
                  name: str = "replica") -> Proc:
    port = free_port()
    p = spawn(
        ["score-server", "--entry-script", str(entry_script), "--port", str(port)],
        tmp / f"{name}-{port}.log",
        port,
        env,
    )
    _ready_or_stop(p, lambda: p.get_ok("/"), f"replica {entry_script} healthy")
    return p


def start_router(tmp: Path, config: dict[str, Any], env: Mapping[str, str] | None = None,
                 name: str = "router", ready: bool = True) -> Proc:
    """`mlfe serve` with `config` (its router.listen is filled in with a free port)."""
    port = free_port()
    cfg = {**config}
    cfg["router"] = {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(tmp / f"{name}-state"),
        **config.get("router", {}),
    }
    cfg_path = tmp / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    p = spawn(["serve", "--config", str(cfg_path)], tmp / f"{name}.log", port, env)
    p.extra["config_path"] = cfg_path
    p.extra["state_dir"] = Path(cfg["router"]["state_dir"])
    if ready:  # (a TLS router is polled by the test itself)
        _ready_or_stop(p, lambda: p.get_ok("/-/healthy"), "router healthy")
    return p


def _ready_or_stop(p: Proc, condition: Callable[[], bool], what: str) -> None:
    """Wait for a process just started; if it never gets ready, do not leave it running (the
    caller never got it to stop)."""
    try:
        p.wait_for(condition, what)
    except BaseException:
        p.stop()
        raise


def keys_of(router: Proc, owner: str) -> tuple[str, str]:
    import json

    keys = json.loads((router.extra["state_dir"] / "keys.json").read_text())[owner]
    return keys["primaryKey"], keys["secondaryKey"]


@contextlib.contextmanager
def raw_conn(port: int, timeout: float = 10.0) -> Iterator[socket.socket]:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        yield s
    finally:
        s.close()


def read_until_close(s: socket.socket, limit: int = 1 << 24) -> bytes:
    chunks = []
    total = 0
    while total < limit:
        try:
            data = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


class Reader:
    """Reads HTTP/1.x responses off a raw socket, keeping bytes read ahead (pipelining)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed; unread: {self.buf[:200]!r}")
        self.buf += data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """One response: (status, lower-cased headers, body)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if status < 200 or status in (204, 304):
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._take(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                body += self._take(size)
                self._take(2)
                if size == 0:
                    return status, headers, body
        body, self.buf = self.buf + read_until_close(self.sock), b""
        return status, headers, body


# ---- misbehaving replicas, nginx, process memory (protocol tests) ---------------------------


def spawn_cmd(cmd: list[str], log_path: Path, port: int) -> Proc:
    """Any command as a `Proc`, its output in `log_path`."""
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return _track(Proc(proc, log_path, port))


# Every process a test started, so that none outlives the test session (tests/conftest.py),
# whatever a test's own clean-up missed.
SPAWNED: list[Proc] = []


def _track(p: Proc) -> Proc:
    SPAWNED.append(p)
    return p


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_fake_replica(tmp: Path, name: str = "fake") -> Proc:
    """tests/fake_replicas.py on a free port: behaviour chosen per request by `?mode=`."""
    port = free_port()
    p = spawn_cmd(
        [sys.executable, str(REPO / "tests" / "fake_replicas.py"), "--port", str(port)],
        tmp / f"{name}-{port}.log",
        port,
    )
    _ready_or_stop(p, lambda: p.get_ok("/"), "fake replica healthy")
    return p


NGINX_CONF = """
worker_processes 1;
master_process off;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream replica {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        {server_extra}
        location / {{
            proxy_pass http://replica;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def start_nginx(tmp: Path, upstream_port: int, server_extra: str = "",
                name: str = "nginx") -> Proc:
    """nginx as a reverse proxy to 127.0.0.1:`upstream_port` (one process, no master, so
    `Proc.stop` ends all of it); `server_extra` is put in its server block."""
    import shutil

    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=d, upstream_port=upstream_port, port=port,
                                      server_extra=server_extra))
    p = spawn_cmd([binary, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                  d / "stdout.log", port)
    _ready_or_stop(p, lambda: port_open(port), "nginx listening")
    return p


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def post_many(
    port: int, path: str, n: int, headers: Mapping[str, str], body: bytes = b'{"data": [1]}',
    concurrency: int = 32, on_response: Callable[[int, dict[str, str]], None] | None = None,
) -> list[int]:
    """`n` keep-alive POSTs over `concurrency` raw connections (httpx is too slow to send
    10,000 requests quickly); returns the statuses. Responses must carry Content-Length."""
    import asyncio

    head = (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    statuses: list[int] = []

    async def worker(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                writer.write(head)
                raw = await reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                hdrs = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        hdrs[k.strip().lower()] = v.strip()
                await reader.readexactly(int(hdrs.get("content-length", "0")))
                statuses.append(status)
                if on_response is not None:
                    on_response(status, hdrs)
        finally:
            writer.close()

    per, extra = divmod(n, concurrency)
    await asyncio.gather(*(worker(per + (i < extra)) for i in range(concurrency)))
    return statuses
