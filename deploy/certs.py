"""`mlfe cert --self-signed`: a development certificate for the scoring port.

A self-signed leaf (EC P-256, serverAuth) whose subjectAltName holds every `--host` (DNS names
and IP addresses alike) plus `localhost` and `127.0.0.1`, so the router can be called on
loopback too. Clients trust it by trusting cert.pem itself (`curl --cacert cert.pem`). For
production, give `router.tls` a certificate from a real CA, with the full chain in cert_file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from router.keystore import atomic_write

DEFAULT_OUT_DIR = Path(".mlfe") / "tls"
LOOPBACK = ("localhost", "127.0.0.1")
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.strip().rstrip(".").lower()
    if not name or any(c.isspace() or c in "/:@" for c in name):
        raise ValueError(f"--host {host!r}: not a DNS name or an IP address")
    try:
        return x509.DNSName(name.encode("idna").decode("ascii"))
    except UnicodeError:
        raise ValueError(f"--host {host!r}: not a DNS name or an IP address") from None


def hosts_with_loopback(hosts: Sequence[str]) -> list[str]:
    """The hosts in order, then localhost and 127.0.0.1, each once."""
    out: list[str] = []
    for h in [*hosts, *LOOPBACK]:
        if h not in out:
            out.append(h)
    return out


def self_signed(
    hosts: Sequence[str], days: int = 365, now: dt.datetime | None = None
) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) of a self-signed server certificate for `hosts`."""
    if not hosts:
        raise ValueError("at least one host is required")
    if days < 1:
        raise ValueError(f"--days {days}: must be at least 1")
    names = [_general_name(h) for h in hosts]
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mlfe development certificate"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # a little clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_self_signed(
    out_dir: Path, hosts: Sequence[str], days: int = 365, force: bool = False
) -> tuple[Path, Path]:
    """Write cert.pem (0644) and key.pem (0600) into `out_dir`, each atomically. Refuses
    (FileExistsError, nothing written) if either exists, unless `force`."""
    cert_path, key_path = out_dir / CERT_FILE, out_dir / KEY_FILE
    if not force:
        for p in (cert_path, key_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; use --force to overwrite it")
    cert_pem, key_pem = self_signed(hosts, days)
    # Key first: a router watching these files sees a mismatched pair for a moment either way
    # and keeps its current certificate until both are there.
    atomic_write(key_path, key_pem, mode=0o600)
    atomic_write(cert_path, cert_pem, mode=0o644)
    return cert_path, key_path


def run_cert(
    *, self_signed_: bool, hosts: Sequence[str], out_dir: str, days: int, force: bool
) -> int:
    if not self_signed_:
        print("mlfe cert: only --self-signed is supported", file=sys.stderr)
        return 2
    all_hosts = hosts_with_loopback(hosts)
    try:
        cert_path, key_path = write_self_signed(Path(out_dir), all_hosts, days, force)
    except (FileExistsError, ValueError) as e:
        print(f"mlfe cert: {e}", file=sys.stderr)
        return 1
    cert_abs, key_abs = cert_path.resolve(), key_path.resolve()
    print(f"wrote {cert_abs} (self-signed for {', '.join(all_hosts)}; valid {days} days)")
    print(f"wrote {key_abs} (mode 0600)")
    print("\nadd to the config:\n")
    snippet = {"router": {"tls": {"cert_file": str(cert_abs), "key_file": str(key_abs)}}}
    print(yaml.safe_dump(snippet, default_flow_style=False, sort_keys=False), end="")
    print(f"\nclients trust it with e.g. curl --cacert {cert_abs} https://{all_hosts[0]}:8080/...")
    return 0
