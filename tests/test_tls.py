"""TLS termination (router/tls.py) and `mlfe cert --self-signed` (deploy/certs.py).

A minimal HTTPS server runs in-process on 127.0.0.1:0 with the reloader's context; clients are
real TLS clients (httpx, asyncio streams, and blocking sockets in a thread where a handshake is
expected to fail). Reloads are driven by calling `maybe_reload()`; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import stat
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trustme
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from deploy.certs import self_signed
from deploy.cli import main as mlfe
from router.tls import TlsReloader, build_context

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


# -- helpers ---------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """As certificate tools (and Kubernetes Secret volumes) do: a new file renamed over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def chain_pem(leaf: trustme.LeafCert, with_intermediates: bool = True) -> bytes:
    pems = leaf.cert_chain_pems if with_intermediates else leaf.cert_chain_pems[:1]
    return b"".join(p.bytes() for p in pems)


def install(leaf: trustme.LeafCert, cert_file: Path, key_file: Path) -> None:
    write_atomic(cert_file, chain_pem(leaf))
    write_atomic(key_file, leaf.private_key_pem.bytes())


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ca.configure_trust(ctx)
    return ctx


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A fixed HTTP/1.1 response to each request on a kept-alive connection."""
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def https_server(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    server = await asyncio.start_server(_answer, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


class Conn:
    """One client TLS connection, kept open across requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext, host: str = "localhost") -> Conn:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=host
        )
        return cls(reader, writer)

    @property
    def peer_serial(self) -> int:
        ssl_object = self.writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number

    async def request(self) -> bytes:
        self.writer.write(REQUEST)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        return head.split(b"\r\n", 1)[0] + b" " + await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def handshake(port: int, ctx: ssl.SSLContext, host: str = "localhost") -> str:
    """A blocking handshake (run in a thread); the negotiated protocol version."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname=host) as tls,
    ):
        version = tls.version()
        assert version is not None
        return version


def key_lines(*leaves: trustme.LeafCert) -> list[str]:
    """The base64 lines of the leaves' private keys, to make sure none reaches a log."""
    return [
        line
        for leaf in leaves
        for line in leaf.private_key_pem.bytes().decode().splitlines()
        if not line.startswith("-----")
    ]


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def old(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1")


@pytest.fixture
def new(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", "127.0.0.1")


@pytest.fixture
def files(tmp_path: Path, old: trustme.LeafCert) -> tuple[Path, Path]:
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(old, cert_file, key_file)
    return cert_file, key_file


@pytest.fixture
def reloader(files: tuple[Path, Path]) -> TlsReloader:
    return TlsReloader(*files)


# -- serving ---------------------------------------------------------------------------------


async def test_https_request_verifies_against_the_ca(
    reloader: TlsReloader, ca: trustme.CA, old: trustme.LeafCert
) -> None:
    async with https_server(reloader.context) as port:
        async with httpx.AsyncClient(verify=client_context(ca)) as client:
            r = await client.get(f"https://127.0.0.1:{port}/")
        assert (r.status_code, r.text, r.http_version) == (200, "ok", "HTTP/1.1")
        conn = await Conn.open(port, client_context(ca))
        assert conn.peer_serial == serial_of(old)
        await conn.close()


async def test_context_settings(reloader: TlsReloader, ca: trustme.CA) -> None:
    ctx = reloader.context
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    client = client_context(ca)
    client.set_alpn_protocols(["h2", "http/1.1"])
    async with https_server(ctx) as port:
        conn = await Conn.open(port, client)
        tls = conn.writer.get_extra_info("ssl_object")
        assert tls.selected_alpn_protocol() == "http/1.1"  # never h2: the router speaks 1.1
        assert tls.compression() is None
        assert await conn.request() == b"HTTP/1.1 200 OK ok"
        await conn.close()


async def test_tls12_is_accepted(reloader: TlsReloader, ca: trustme.CA) -> None:
    client = client_context(ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with https_server(reloader.context) as port:
        assert await asyncio.to_thread(handshake, port, client) == "TLSv1.2"


def tls11_client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = client_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1 are deprecated
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL's default security level refuses TLS 1.1 on the client side already.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


async def test_tls11_is_refused(
    reloader: TlsReloader, ca: trustme.CA, old: trustme.LeafCert
) -> None:
    async with https_server(reloader.context) as port:
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(handshake, port, tls11_client(ca))
    if not ssl.HAS_TLSv1_1:
        return
    # Control: the same client does speak TLS 1.1 to a server that allows it, so the refusal
    # above is the router's doing, not the client's.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.configure_cert(permissive)
    async with https_server(permissive) as port:
        assert await asyncio.to_thread(handshake, port, tls11_client(ca)) == "TLSv1.1"


async def test_full_chain_from_the_cert_file(ca: trustme.CA, tmp_path: Path) -> None:
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("localhost", "127.0.0.1")
    assert len(leaf.cert_chain_pems) == 2  # leaf + intermediate
    cert_file, key_file = tmp_path / "chain.pem", tmp_path / "key.pem"
    install(leaf, cert_file, key_file)
    reloader = TlsReloader(cert_file, key_file)
    assert reloader.info.chain_length == 2
    # The client trusts only the root: the handshake verifies only if the server sends the
    # intermediate along.
    async with (
        https_server(reloader.context) as port,
        httpx.AsyncClient(verify=client_context(ca)) as client,
    ):
        assert (await client.get(f"https://127.0.0.1:{port}/")).text == "ok"

    # Control: the leaf alone does not verify against the root.
    write_atomic(cert_file, chain_pem(leaf, with_intermediates=False))
    leaf_only = TlsReloader(cert_file, key_file)
    async with https_server(leaf_only.context) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(handshake, port, client_context(ca))


# -- reloading -------------------------------------------------------------------------------


async def reload_keeps_open_connections(
    files: tuple[Path, Path], ca: trustme.CA, old: trustme.LeafCert, new: trustme.LeafCert
) -> None:
    reloader = TlsReloader(*files)
    client = client_context(ca)
    async with https_server(reloader.context) as port:
        before = await Conn.open(port, client)
        assert before.peer_serial == serial_of(old)
        assert await before.request() == b"HTTP/1.1 200 OK ok"
        assert reloader.maybe_reload() is False  # nothing changed

        install(new, *files)
        assert reloader.maybe_reload() is True
        assert reloader.maybe_reload() is False
        assert reloader.info.serial == serial_of(new)

        after = await Conn.open(port, client)
        assert after.peer_serial == serial_of(new)
        assert await after.request() == b"HTTP/1.1 200 OK ok"
        # The connection from before the swap is untouched: same certificate, still serving.
        assert await before.request() == b"HTTP/1.1 200 OK ok"
        assert before.peer_serial == serial_of(old)
        # And the listening context is the same object: nothing to re-bind.
        assert reloader.context is not reloader.current
        await before.close()
        await after.close()


async def test_reload_keeps_open_connections(
    files: tuple[Path, Path], ca: trustme.CA, old: trustme.LeafCert, new: trustme.LeafCert
) -> None:
    await reload_keeps_open_connections(files, ca, old, new)


def test_reload_keeps_open_connections_on_uvloop(
    files: tuple[Path, Path], ca: trustme.CA, old: trustme.LeafCert, new: trustme.LeafCert
) -> None:
    """The router runs on uvloop, whose TLS transport is its own: the swap must work there."""
    uvloop.run(reload_keeps_open_connections(files, ca, old, new))


async def test_reload_in_place_rewrite(
    reloader: TlsReloader, files: tuple[Path, Path], new: trustme.LeafCert
) -> None:
    cert_file, key_file = files
    cert_file.write_bytes(chain_pem(new))  # same inode: size or mtime tell
    key_file.write_bytes(new.private_key_pem.bytes())
    assert reloader.maybe_reload() is True
    assert reloader.info.serial == serial_of(new)


def _other_key(ca: trustme.CA) -> bytes:
    return ca.issue_cert("localhost").private_key_pem.bytes()


BROKEN: dict[str, Callable[[trustme.CA, trustme.LeafCert, Path, Path], str]] = {}


def broken(name: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    def register(f: Callable[..., str]) -> Callable[..., str]:
        BROKEN[name] = f
        return f
    return register


@broken("half-written key")
def _half_key(ca: trustme.CA, new: trustme.LeafCert, cert: Path, key: Path) -> str:
    write_atomic(cert, chain_pem(new))
    pem = new.private_key_pem.bytes()
    key.write_bytes(pem[: len(pem) // 2])
    return "key_file"


@broken("key of another certificate")
def _mismatch(ca: trustme.CA, new: trustme.LeafCert, cert: Path, key: Path) -> str:
    write_atomic(cert, chain_pem(new))  # the old key stays: the new cert does not match it
    return "does not match"


@broken("half-written cert")
def _half_cert(ca: trustme.CA, new: trustme.LeafCert, cert: Path, key: Path) -> str:
    pem = chain_pem(new)
    cert.write_bytes(pem[: len(pem) - 40])
    write_atomic(key, new.private_key_pem.bytes())
    return "incomplete"


@broken("key file gone")
def _gone(ca: trustme.CA, new: trustme.LeafCert, cert: Path, key: Path) -> str:
    write_atomic(cert, chain_pem(new))
    key.unlink()
    return "cannot be read"


@broken("encrypted key")
def _encrypted(ca: trustme.CA, new: trustme.LeafCert, cert: Path, key: Path) -> str:
    write_atomic(cert, chain_pem(new))
    pk = load_pem_private_key(new.private_key_pem.bytes(), password=None)
    write_atomic(key, pk.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    return "encrypted"


@pytest.mark.parametrize("case", list(BROKEN))
async def test_broken_files_keep_the_current_certificate(
    case: str,
    reloader: TlsReloader,
    files: tuple[Path, Path],
    ca: trustme.CA,
    old: trustme.LeafCert,
    new: trustme.LeafCert,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert_file, key_file = files
    caplog.set_level(logging.INFO, logger="router.tls")
    async with https_server(reloader.context) as port:
        expected = BROKEN[case](ca, new, cert_file, key_file)
        assert reloader.maybe_reload() is False
        warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings_) == 1, caplog.text
        message = warnings_[0].getMessage()
        assert expected in message
        assert str(key_file) in message or str(cert_file) in message
        assert "PRIVATE KEY" not in caplog.text
        assert not [line for line in key_lines(old, new) if line in caplog.text]

        conn = await Conn.open(port, client_context(ca))
        assert conn.peer_serial == serial_of(old)  # still the old certificate
        await conn.close()

        # Tried once per change: no warning on every poll.
        assert reloader.maybe_reload() is False
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

        # Once the files are whole again, the next check takes them.
        install(new, cert_file, key_file)
        assert reloader.maybe_reload() is True
        conn = await Conn.open(port, client_context(ca))
        assert conn.peer_serial == serial_of(new)
        await conn.close()


async def test_watch_reloads(reloader: TlsReloader, files: tuple[Path, Path],
                             new: trustme.LeafCert) -> None:
    task = asyncio.create_task(reloader.watch(interval_s=0))
    try:
        install(new, *files)
        for _ in range(1000):
            if reloader.reloads:
                break
            await asyncio.sleep(0)
        assert reloader.reloads == 1
        assert reloader.info.serial == serial_of(new)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- startup validation ----------------------------------------------------------------------


def _setup(ca: trustme.CA, leaf: trustme.LeafCert, tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    install(leaf, cert, key)
    return cert, key


STARTUP: dict[str, Callable[[trustme.CA, Path, Path], Path]] = {
    # each breaks the pair and returns the file the error must name
    "cert missing": lambda ca, cert, key: (cert.unlink(), cert)[1],
    "key missing": lambda ca, cert, key: (key.unlink(), key)[1],
    "cert is not a certificate": lambda ca, cert, key: (cert.write_bytes(b"hello\n"), cert)[1],
    "key is a certificate": lambda ca, cert, key: (key.write_bytes(cert.read_bytes()), key)[1],
    "key does not match": lambda ca, cert, key: (key.write_bytes(_other_key(ca)), key)[1],
    "cert is a directory": lambda ca, cert, key: (cert.unlink(), cert.mkdir(), cert)[2],
}


@pytest.mark.parametrize("case", list(STARTUP))
def test_startup_refuses_bad_files(case: str, ca: trustme.CA, old: trustme.LeafCert,
                                   tmp_path: Path) -> None:
    cert, key = _setup(ca, old, tmp_path)
    culprit = STARTUP[case](ca, cert, key)
    with pytest.raises(ValueError, match=re.escape(str(culprit))) as e:
        TlsReloader(cert, key)
    assert "PRIVATE KEY" not in str(e.value)


def test_startup_refuses_an_encrypted_key_without_prompting(
    ca: trustme.CA, new: trustme.LeafCert, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_atomic(key, b"placeholder")
    _encrypted(ca, new, cert, key)
    with pytest.raises(ValueError, match="encrypted"):
        build_context(cert, key)


# -- mlfe cert --self-signed -----------------------------------------------------------------


async def test_mlfe_cert_self_signed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tls"
    argv = ["cert", "--self-signed", "--host", "example.test", "--host", "10.1.2.3",
            "--out-dir", str(out), "--days", "30"]
    assert mlfe(argv) == 0
    cert_file, key_file = out / "cert.pem", out / "key.pem"
    printed = capsys.readouterr().out
    assert f"cert_file: {cert_file.resolve()}" in printed
    assert f"key_file: {key_file.resolve()}" in printed
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.test", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30

    # It loads, and a strict client that trusts cert.pem accepts it for example.test.
    reloader = TlsReloader(cert_file, key_file)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=cert_file)
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    async with https_server(reloader.context) as port:
        conn = await Conn.open(port, client, host="example.test")
        assert await conn.request() == b"HTTP/1.1 200 OK ok"
        await conn.close()

    # No overwrite without --force; nothing is touched.
    before = (cert_file.read_bytes(), key_file.read_bytes())
    assert mlfe(argv) == 1
    assert "--force" in capsys.readouterr().err
    assert (cert_file.read_bytes(), key_file.read_bytes()) == before
    key_file.unlink()  # one of the two present is enough to refuse
    assert mlfe(argv) == 1
    assert not key_file.exists()

    assert mlfe([*argv, "--force"]) == 0
    assert cert_file.read_bytes() != before[0]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    TlsReloader(cert_file, key_file)


def test_mlfe_cert_defaults_to_loopback(tmp_path: Path) -> None:
    assert mlfe(["cert", "--self-signed", "--out-dir", str(tmp_path)]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_mlfe_cert_refuses_a_bad_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mlfe(["cert", "--self-signed", "--host", "a b", "--out-dir", str(tmp_path)]) == 1
    assert "--host 'a b'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_self_signed_needs_a_host() -> None:
    with pytest.raises(ValueError):
        self_signed([])
