"""TLS termination for the scoring port: TLS >= 1.2, the full chain from the cert file, and the
certificate and key reloaded when their files change, without dropping a connection.

How a reload keeps connections: the listening socket keeps the context it was created with, and
that context's SNI callback (which OpenSSL runs for every new handshake, with or without a
server name from the client) hands the handshake the newest context. An open connection keeps
the context, certificate and keys it was made with until it closes; the next one gets the new.

Files are checked by stat (inode, size, mtime), so an atomic replace (rename, or Kubernetes
swapping the `..data` symlink of a Secret volume) and an in-place rewrite are both seen. A new
pair that does not load (half written, a key that does not match, an encrypted key) is refused
with a warning naming the file, never its contents, and the current certificate stays; each
change is tried once, and the next change of either file is tried again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

log = logging.getLogger(__name__)

ALPN = ["http/1.1"]
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# What identifies one version of a file: (device, inode, size, mtime_ns), or None if it cannot
# be stat'ed (missing, or a directory on the way is unreadable).
_FileSig = tuple[int, int, int, int] | None


def _file_sig(path: Path) -> _FileSig:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _no_password() -> bytes:
    # Given to load_cert_chain so that an encrypted key is an error, never a terminal prompt.
    raise ValueError("encrypted private keys are not supported")


def _read(what: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot be read ({e.strerror or e})") from None


@dataclass(frozen=True)
class CertInfo:
    """What was loaded, for logs and the admin API (never the key)."""

    subject: str
    names: tuple[str, ...]
    serial: int
    not_after: datetime
    chain_length: int

    def describe(self) -> str:
        names = ", ".join(self.names) or "no subjectAltName"
        return (
            f"{self.subject} [{names}], serial {self.serial:x}, "
            f"expires {self.not_after:%Y-%m-%d %H:%M} UTC, chain of {self.chain_length}"
        )


def _cert_info(chain: list[x509.Certificate]) -> CertInfo:
    leaf = chain[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(
            [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
            + [f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)]
        )
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(
        subject=leaf.subject.rfc4514_string(),
        names=names,
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc,
        chain_length=len(chain),
    )


def _check_files(cert_file: Path, key_file: Path) -> list[x509.Certificate]:
    """Read and check the pair, so a refusal names the file at fault: the chain is complete
    PEM with the leaf first, and the key is an unencrypted PEM key matching the leaf."""
    cert_pem = _read("cert_file", cert_file)
    begins = cert_pem.count(b"-----BEGIN CERTIFICATE-----")
    if begins == 0:
        raise ValueError(f"cert_file {cert_file}: no PEM certificate in it")
    if begins != cert_pem.count(b"-----END CERTIFICATE-----"):
        raise ValueError(f"cert_file {cert_file}: a certificate is incomplete (half written?)")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ValueError(f"cert_file {cert_file}: not a valid PEM certificate chain") from None
    for i, (child, parent) in enumerate(itertools.pairwise(chain)):
        if child.issuer != parent.subject:
            log.warning(
                "cert_file %s: certificate %d was not issued by certificate %d after it; the "
                "chain should be in order, leaf first", cert_file, i + 1, i + 2,
            )

    key_pem = _read("key_file", key_file)
    # No exception text from parsing the key is passed on: it is about key material.
    try:
        key = load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(
            f"key_file {key_file}: the key is encrypted; an unencrypted PEM key is required"
        ) from None
    except Exception:
        raise ValueError(
            f"key_file {key_file}: not a PEM private key (or incomplete)"
        ) from None
    spki = Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise ValueError(
            f"key_file {key_file} does not match the certificate in cert_file {cert_file}"
        )
    return chain


def build_context(cert_file: Path, key_file: Path) -> tuple[ssl.SSLContext, CertInfo]:
    """A server context for the pair: TLS >= 1.2, Python's default (forward-secret, AEAD)
    ciphers, no compression, no renegotiation, ALPN http/1.1, the whole chain from cert_file.
    Raises ValueError naming the file at fault."""
    chain = _check_files(cert_file, key_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(ALPN)
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as e:
        # The files changed between the check and the load, or OpenSSL refuses what the check
        # passed (e.g. a key too weak for its security level). The reason is a short code.
        reason = getattr(e, "reason", None) or type(e).__name__
        raise ValueError(
            f"cert_file {cert_file} / key_file {key_file}: OpenSSL refused them ({reason})"
        ) from None
    info = _cert_info(chain)
    if info.not_after <= datetime.now(UTC):
        log.warning("cert_file %s: the certificate expired at %s", cert_file, info.not_after)
    return ctx, info


class TlsReloader:
    """The scoring port's TLS context, following the cert and key files.

    `context` is the one to listen with; `maybe_reload()` picks up changed files (True if it
    swapped in a new certificate); `watch()` calls it periodically. The constructor raises
    ValueError naming the file if the pair does not load.
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self._seen = self._signature()
        self._current, self.info = build_context(self.cert_file, self.key_file)
        self._listening = self._current
        self._listening.sni_callback = self._on_handshake
        self.reloads = 0
        log.info("TLS certificate from %s: %s", self.cert_file, self.info.describe())

    @property
    def context(self) -> ssl.SSLContext:
        """The context to pass to `create_server`; it stays the same across reloads."""
        return self._listening

    @property
    def current(self) -> ssl.SSLContext:
        """The context new handshakes get."""
        return self._current

    def _on_handshake(
        self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext
    ) -> None:
        current = self._current
        if ctx is not current:
            conn.context = current

    def _signature(self) -> tuple[_FileSig, _FileSig]:
        return _file_sig(self.cert_file), _file_sig(self.key_file)

    def maybe_reload(self) -> bool:
        """Load the files again if either changed since the last try; True if new handshakes
        now get a new certificate. A pair that does not load is logged and the current one
        stays."""
        sig = self._signature()
        if sig == self._seen:
            return False
        # Taken before reading: a write during the load changes the files again, and the next
        # call retries.
        self._seen = sig
        try:
            ctx, info = build_context(self.cert_file, self.key_file)
        except ValueError as e:
            log.warning("TLS files changed but cannot be used, keeping the current "
                        "certificate: %s", e)
            return False
        self._current, self.info = ctx, info
        self.reloads += 1
        log.info("TLS certificate reloaded from %s: %s", self.cert_file, info.describe())
        return True

    async def watch(self, interval_s: float = 2.0) -> None:
        """Check the files every `interval_s` seconds, forever (run it as a task)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.maybe_reload()
            except Exception:  # never stop watching over one bad check
                log.exception("TLS: checking %s and %s failed", self.cert_file, self.key_file)
