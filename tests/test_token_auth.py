"""Token auth against a real router: issued tokens work until they expire; forged, foreign or
tampered ones get 401; an external IdP's token verifies from a JWKS served on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from router.tokens import jwk_thumbprint
from tests.support import EXAMPLES, Proc, free_port, start_replica, start_router

ADMIN = "admin-token-for-tests"
IDP = "https://idp.example.test"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rsa_jwk(key: rsa.RSAPrivateKey) -> dict[str, str]:
    n = key.public_key().public_numbers()
    jwk = {"kty": "RSA", "e": b64(n.e.to_bytes(3, "big")),
           "n": b64(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big"))}
    return {**jwk, "kid": jwk_thumbprint(jwk), "alg": "RS256", "use": "sig"}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    procs: list[Proc] = []
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = rsa_jwk(idp_key)
    (tmp_path / "idp").mkdir()
    (tmp_path / "idp" / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    idp_port = free_port()
    idp = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(idp_port), "--bind", "127.0.0.1",
         "--directory", str(tmp_path / "idp")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        rep = start_replica(tmp_path, EXAMPLES / "echo" / "score.py")
        procs.append(rep)
        admin_port = free_port()
        up = [f"127.0.0.1:{rep.port}"]
        tok = {"upstreams": up, "auth_enabled": False, "token_auth_enabled": True}
        router = start_router(tmp_path, {
            "router": {
                "admin_listen": f"127.0.0.1:{admin_port}",
                "token_lifetime_s": 2, "token_leeway_s": 0,
                "token_issuers": [{"issuer": IDP, "audience": "mlfe-api",
                                   "jwks_url": f"http://127.0.0.1:{idp_port}/jwks.json"}],
            },
            "services": {"tok": tok, "other": tok, "keyed": {"upstreams": up}},
        }, env={"MLFE_ADMIN_TOKEN": ADMIN})
        procs.append(router)
        yield {"router": router, "admin": f"http://127.0.0.1:{admin_port}",
               "idp_key": idp_key, "kid": jwk["kid"]}
    finally:
        for p in procs:
            p.stop()
        idp.kill()
        idp.wait()


def issue(s: dict[str, Any], service: str) -> httpx.Response:
    return httpx.post(f"{s['admin']}/v1/services/{service}/token",
                      headers={"Authorization": f"Bearer {ADMIN}"})


def score(s: dict[str, Any], token: str, service: str = "tok") -> int:
    r = httpx.post(f"{s['router'].url}/api/v1/service/{service}/score", json={},
                   headers={"Authorization": f"Bearer {token}"})
    return r.status_code


def test_issued_token_works_until_it_expires(setup: dict[str, Any]) -> None:
    r = issue(setup, "tok")
    assert r.status_code == 200
    body = r.json()
    assert body["tokenType"] == "Bearer"
    assert body["expiryOn"] > body["refreshAfter"] >= int(time.time()) - 1
    token = body["accessToken"]
    assert score(setup, token) == 200
    assert score(setup, token, "other") == 401  # aud is the service
    # Lifetime 2 s, no leeway: it stops working by itself.
    setup["router"].wait_for(lambda: score(setup, token) == 401, "token expiry", timeout=15)
    assert issue(setup, "keyed").status_code == 400  # key-auth services issue no tokens


def test_forged_tokens_are_refused(setup: dict[str, Any]) -> None:
    good = issue(setup, "tok").json()["accessToken"]
    header_b64, payload_b64, sig = good.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    jwks = httpx.get(f"{setup['admin']}/v1/jwks.json").json()  # public, no admin token
    assert [k["kid"] for k in jwks["keys"]] == [header["kid"]] and "d" not in jwks["keys"][0]

    def encode(h: dict[str, Any], p: dict[str, Any]) -> str:
        return b64(json.dumps(h).encode()) + "." + b64(json.dumps(p).encode())

    forged = {
        "alg-none": encode({**header, "alg": "none"}, payload) + ".",
        "tampered": encode(header, {**payload, "aud": "other"}) + "." + sig,
        "unknown-kid": encode({**header, "kid": "nope"}, payload) + "." + sig,
        "garbage": "not.a.token",
    }
    # HS256 signed with the public key as the HMAC secret (algorithm confusion).
    public = ECAlgorithm.from_jwk(json.dumps(jwks["keys"][0]))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = encode({**header, "alg": "HS256"}, payload)
    forged["hs256-public-key"] = signing_input + "." + b64(
        hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    for name, token in forged.items():
        assert score(setup, token) == 401, name
    # A token from the IdP with the wrong issuer.
    now = int(time.time())
    wrong_iss = jwt.encode({"iss": "https://evil.test", "aud": "mlfe-api", "iat": now,
                            "exp": now + 300}, setup["idp_key"], algorithm="RS256",
                           headers={"kid": setup["kid"]})
    assert score(setup, wrong_iss) == 401
    assert score(setup, good) == 200


def test_external_issuer_token_verifies_from_loopback_jwks(setup: dict[str, Any]) -> None:
    now = int(time.time())
    claims = {"iss": IDP, "aud": "mlfe-api", "sub": "user-1", "iat": now, "exp": now + 300}
    token = jwt.encode(claims, setup["idp_key"], algorithm="RS256", headers={"kid": setup["kid"]})
    assert score(setup, token) == 200
    assert score(setup, token, "keyed") == 401  # key auth services take keys only
    wrong_aud = jwt.encode({**claims, "aud": "someone-else"}, setup["idp_key"],
                           algorithm="RS256", headers={"kid": setup["kid"]})
    assert score(setup, wrong_aud) == 401
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    bad_sig = jwt.encode(claims, pem, algorithm="RS256", headers={"kid": setup["kid"]})
    assert score(setup, bad_sig) == 401


def _loads_cryptography(p: Proc) -> bool:
    """Whether the process has mapped cryptography's compiled library (it was imported)."""
    maps = Path(f"/proc/{p.proc.pid}/maps").read_text()
    return any("/cryptography/" in line for line in maps.splitlines())


def test_a_router_without_tokens_or_tls_never_loads_cryptography(
        tmp_path: Path, setup: dict[str, Any]) -> None:
    """cryptography is ~8 MiB of an idle router: loaded only when tokens (or TLS) are used.
    Without them there is no signing key, and the JWKS is empty (nothing was ever signed);
    with them the key is made at start."""
    rep = start_replica(tmp_path, EXAMPLES / "echo" / "score.py", name="replica2")
    admin_port = free_port()
    plain = start_router(tmp_path, {
        "router": {"admin_listen": f"127.0.0.1:{admin_port}"},
        "services": {"keyed": {"upstreams": [f"127.0.0.1:{rep.port}"], "auth_enabled": False}},
    }, env={"MLFE_ADMIN_TOKEN": ADMIN}, name="plain")
    try:
        r = httpx.post(f"{plain.url}/api/v1/service/keyed/score", json={})
        assert r.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{admin_port}/v1/jwks.json").json() == {"keys": []}
        assert not (plain.extra["state_dir"] / "signing-key.pem").exists()
        assert not _loads_cryptography(plain)
    finally:
        plain.stop()
        rep.stop()
    router = setup["router"]  # token auth on: the key exists from the start
    assert (router.extra["state_dir"] / "signing-key.pem").exists()
    assert _loads_cryptography(router)
    keys = httpx.get(f"{setup['admin']}/v1/jwks.json").json()["keys"]
    assert [k["alg"] for k in keys] == ["ES256"]
