"""TLS through the real router: HTTPS scoring, TLS 1.1 refused, a certificate swap picked up
by new connections while an open one keeps working."""

from __future__ import annotations

import socket
import ssl
import warnings
from pathlib import Path

import httpx
import pytest
import trustme

from tests.support import EXAMPLES, start_replica, start_router

KEY = "tls-test-key-" + "t" * 32


def write_cert(ca: trustme.CA, tmp: Path, tag: str) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1", organization_name=tag)
    cert_file, key_file = tmp / f"{tag}-cert.pem", tmp / f"{tag}-key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return cert_file, key_file


def peer_org(port: int, ca: trustme.CA) -> str:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        cert = s.getpeercert()
    return dict(x[0] for x in cert["subject"])["organizationName"]


def test_https_scoring_and_certificate_swap(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert_file, key_file = write_cert(ca, tmp_path, "first")
    live_cert, live_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    live_cert.write_bytes(cert_file.read_bytes())
    live_key.write_bytes(key_file.read_bytes())
    rep = start_replica(tmp_path, EXAMPLES / "echo" / "score.py")
    router = start_router(tmp_path, {
        "router": {"tls": {"cert_file": str(live_cert), "key_file": str(live_key)}},
        "services": {"sec": {"upstreams": [f"127.0.0.1:{rep.port}"], "primary_key": KEY}},
    }, ready=False)
    try:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        url = f"https://localhost:{router.port}/api/v1/service/sec/score"
        with httpx.Client(verify=ctx) as client:
            router.wait_for(lambda: _ok(client, f"https://localhost:{router.port}/-/healthy"),
                            "router up over TLS")
            r = client.post(url, json={}, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200 and r.json() == {"result": [1]}
            assert peer_org(router.port, ca) == "first"

            old = ssl.create_default_context()
            ca.configure_trust(old)
            with warnings.catch_warnings():  # setting TLS 1.1 is itself deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                old.maximum_version = ssl.TLSVersion.TLSv1_1
                old.minimum_version = ssl.TLSVersion.TLSv1
            old.set_ciphers("DEFAULT:@SECLEVEL=0")
            with pytest.raises(ssl.SSLError), socket.create_connection(
                    ("127.0.0.1", router.port), timeout=5) as raw:
                old.wrap_socket(raw, server_hostname="localhost")

            # Swap the files (rename over, as a Secret volume update does).
            new_cert, new_key = write_cert(ca, tmp_path, "second")
            new_key.replace(live_key)
            new_cert.replace(live_cert)
            router.wait_for(lambda: peer_org(router.port, ca) == "second",
                            "new certificate presented", timeout=20)
            # The connection opened before the swap is still served.
            r = client.post(url, json={}, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200
        assert "https://" in router.log()
    finally:
        router.stop()
        rep.stop()


def _ok(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False
