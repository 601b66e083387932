"""Token (JWT) auth: issuing, verifying, key persistence and rotation, external IdPs' JWKS.

Time is a fake `now` (epoch seconds) passed to `issue()`/`check()`, and a fake monotonic clock
for the JWKS refresh rate limit: nothing sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import router.tokens as tokens
from mlfe.config import TokenIssuer
from router.tokens import (
    ExternalJwks,
    SigningKeys,
    TokenAuth,
    TokenAuthority,
    TokenVerifier,
    jwk_thumbprint,
    parse_jwks,
)

NOW = 1_700_000_000.0
LEEWAY = tokens.DEFAULT_LEEWAY_S
IDP = "https://idp.example/realms/ml"
IDP_AUDIENCE = "api://mlfe-scoring"


def bearer(token: str) -> bytes:
    return b"Bearer " + token.encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj).encode())


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys(tmp_path / "state")


@pytest.fixture
def authority(keys: SigningKeys) -> TokenAuthority:
    return TokenAuthority(keys)


@pytest.fixture
def verifier(authority: TokenAuthority) -> TokenVerifier:
    return TokenVerifier(authority)


def claims(**overrides: Any) -> dict[str, Any]:
    base = {"iss": "mlfe", "aud": "svc", "iat": int(NOW), "exp": int(NOW) + 3600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


# --- issuing and verifying -------------------------------------------------------------------


def test_issue_and_verify(authority: TokenAuthority, verifier: TokenVerifier) -> None:
    issued = authority.issue("svc", NOW)
    assert issued["tokenType"] == "Bearer"
    assert issued["expiryOn"] == int(NOW) + 3600
    assert issued["refreshAfter"] == int(NOW) + 1800
    assert all(isinstance(issued[k], int) for k in ("refreshAfter", "expiryOn"))

    token = issued["accessToken"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": "JWT", "kid": authority.keys.kid}
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {"iss": "mlfe", "aud": "svc", "iat": int(NOW), "exp": int(NOW) + 3600}

    assert verifier.check(bearer(token), "svc", NOW)
    assert verifier.check(b"bearer  " + token.encode() + b" ", "svc", NOW)  # scheme any case
    assert TokenAuth(verifier, "svc").check(bearer(token)) is False  # real clock: long expired
    assert TokenAuth(TokenVerifier(authority, clock=lambda: NOW), "svc").check(bearer(token))


def test_custom_issuer_and_lifetime(keys: SigningKeys) -> None:
    auth = TokenAuthority(keys, issuer="https://router.example", lifetime_s=600)
    issued = auth.issue("ep", NOW)
    assert issued["expiryOn"] - int(NOW) == 600
    assert issued["refreshAfter"] - int(NOW) == 300
    assert TokenVerifier(auth).check(bearer(issued["accessToken"]), "ep", NOW)
    # A verifier expecting the default issuer does not know this one.
    assert not TokenVerifier(TokenAuthority(keys)).check(bearer(issued["accessToken"]), "ep", NOW)


def test_expiry_on_fake_time(authority: TokenAuthority, verifier: TokenVerifier) -> None:
    issued = authority.issue("svc", NOW)
    auth, exp = bearer(issued["accessToken"]), issued["expiryOn"]
    assert verifier.check(auth, "svc", exp - 1)
    assert verifier.check(auth, "svc", exp + LEEWAY - 0.001)  # within the leeway
    assert not verifier.check(auth, "svc", exp + LEEWAY)
    assert not verifier.check(auth, "svc", exp + 86400)
    # A fresh verifier (no cache) agrees.
    fresh = TokenVerifier(authority)
    assert not fresh.check(auth, "svc", exp + LEEWAY)
    assert fresh.check(auth, "svc", exp + LEEWAY - 1)


def test_not_yet_valid(keys: SigningKeys, verifier: TokenVerifier) -> None:
    def signed(**c: Any) -> bytes:
        return bearer(jwt.encode(claims(**c), keys.private_key, "ES256", {"kid": keys.kid}))

    future_iat = signed(iat=int(NOW) + 600)
    assert not verifier.check(future_iat, "svc", NOW)
    assert verifier.check(future_iat, "svc", NOW + 600 - LEEWAY + 1)
    future_nbf = signed(nbf=int(NOW) + 600)
    assert not verifier.check(future_nbf, "svc", NOW)
    assert verifier.check(future_nbf, "svc", NOW + 600)
    assert not verifier.check(signed(exp=None), "svc", NOW)  # exp is required
    assert not verifier.check(signed(exp="tomorrow"), "svc", NOW)
    assert not verifier.check(signed(iat="yesterday"), "svc", NOW)
    assert verifier.check(signed(iat=None), "svc", NOW)  # iat is optional


# --- attacks and garbage ---------------------------------------------------------------------


def test_alg_none_rejected(authority: TokenAuthority, verifier: TokenVerifier) -> None:
    kid = authority.keys.kid
    body = b64json(claims())
    for header in ({"alg": "none", "kid": kid}, {"alg": "None", "kid": kid, "typ": "JWT"}):
        for sig in ("", "AAAA"):
            token = f"{b64json(header)}.{body}.{sig}"
            assert not verifier.check(bearer(token), "svc", NOW)
    unsigned = jwt.encode(claims(), "", algorithm="none", headers={"kid": kid})
    assert not verifier.check(bearer(unsigned), "svc", NOW)


def test_hmac_with_public_key_as_secret_rejected(
    authority: TokenAuthority, verifier: TokenVerifier
) -> None:
    """The classic confusion attack: HS256 with the (public) verification key as the secret."""
    pem = authority.keys.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk_json = json.dumps(authority.jwks()["keys"][0]).encode()
    for secret in (pem, jwk_json):
        for alg in ("HS256", "HS512"):
            digest = hashlib.sha256 if alg == "HS256" else hashlib.sha512
            signing_input = (
                f"{b64json({'alg': alg, 'kid': authority.keys.kid})}.{b64json(claims())}"
            )
            sig = hmac.new(secret, signing_input.encode(), digest).digest()
            assert not verifier.check(bearer(f"{signing_input}.{b64(sig)}"), "svc", NOW)


def test_wrong_claims_keys_and_tampering(keys: SigningKeys, verifier: TokenVerifier) -> None:
    def signed(key: ec.EllipticCurvePrivateKey = keys.private_key, kid: str = keys.kid,
               **c: Any) -> str:  # fmt: skip
        return jwt.encode(claims(**c), key, "ES256", {"kid": kid})

    assert verifier.check(bearer(signed()), "svc", NOW)
    assert not verifier.check(bearer(signed()), "other-svc", NOW)  # wrong aud
    assert not verifier.check(bearer(signed(aud="other-svc")), "svc", NOW)
    assert not verifier.check(bearer(signed(aud=None)), "svc", NOW)
    assert not verifier.check(bearer(signed(iss="evil")), "svc", NOW)  # wrong iss
    assert not verifier.check(bearer(signed(iss=None)), "svc", NOW)
    assert not verifier.check(bearer(signed(kid="no-such-kid")), "svc", NOW)  # unknown kid
    other = ec.generate_private_key(ec.SECP256R1())
    assert not verifier.check(bearer(signed(key=other)), "svc", NOW)  # right kid, wrong key
    other_kid = tokens.ec_public_jwk(other.public_key())["kid"]
    assert not verifier.check(bearer(signed(key=other, kid=other_kid)), "svc", NOW)

    # Tampered payload: claims changed, signature kept.
    head, _, sig = signed(aud="other-svc").split(".")
    tampered = f"{head}.{b64json(claims())}.{sig}"
    assert not verifier.check(bearer(tampered), "svc", NOW)
    # Tampered header: the kid changed to ours on a token signed by another key.
    head, body, sig = signed(key=other, kid=other_kid).split(".")
    forged_head = b64json({"alg": "ES256", "typ": "JWT", "kid": keys.kid})
    assert not verifier.check(bearer(f"{forged_head}.{body}.{sig}"), "svc", NOW)
    # A signature bit flipped.
    head, body, sig = signed().split(".")
    flipped = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    flipped[5] ^= 1
    assert not verifier.check(bearer(f"{head}.{body}.{b64(bytes(flipped))}"), "svc", NOW)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        b"",
        b"Bearer",
        b"Bearer ",
        b"Bearer        ",
        b"Bearer x",
        b"Bearer a.b.c",
        b"Bearer ...",
        b"Bearer \xff\xfe.\x00.\x01",
        b"Bearer eyJhbGciOiJFUzI1NiJ9",
        b"Bearer eyJhbGciOiJFUzI1NiJ9.eyJ9.",
        b"Bearer W10.W10.W10",  # JSON arrays, not objects
        b"Bearer " + b64json({"alg": "ES256", "kid": 1}).encode() + b".e30.e30",
        b"Bearer " + b"A" * 100_000,
        b"Basic dXNlcjpwYXNz",
        b"Token abc",
    ],
)
def test_garbage_rejected(verifier: TokenVerifier, authorization: bytes | None) -> None:
    assert verifier.check(authorization, "svc", NOW) is False


def test_missing_bearer_scheme(authority: TokenAuthority, verifier: TokenVerifier) -> None:
    token = authority.issue("svc", NOW)["accessToken"].encode()
    assert not verifier.check(token, "svc", NOW)
    assert not verifier.check(b"Basic " + token, "svc", NOW)
    assert not verifier.check(b"Bearer" + token, "svc", NOW)


# --- keys: persistence, permissions, JWKS, rotation ------------------------------------------


def test_key_persisted_with_owner_only_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = TokenAuthority(SigningKeys(state))
    token = first.issue("svc", NOW)["accessToken"]
    path = state / tokens.SIGNING_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    again = SigningKeys(state)
    assert again.kid == first.keys.kid
    assert TokenVerifier(TokenAuthority(again)).check(bearer(token), "svc", NOW)


def test_refuses_a_non_p256_key_file(tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / tokens.SIGNING_KEY_FILE).write_bytes(tokens._pem(other))
    with pytest.raises(ValueError, match="P-256"):
        SigningKeys(tmp_path)


def test_jwks_is_public_only_and_verifies(authority: TokenAuthority) -> None:
    jwks = authority.jwks()
    (jwk,) = jwks["keys"]
    assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}  # no "d"
    assert jwk["use"] == "sig" and jwk["alg"] == "ES256" and jwk["crv"] == "P-256"
    assert jwk["kid"] == authority.keys.kid == jwk_thumbprint(jwk)
    # The JWKS is enough for anyone to verify (e.g. PyJWT's own JWK support).
    token = authority.issue("svc", NOW)["accessToken"]
    key = jwt.PyJWK(jwk)
    decoded = jwt.decode(token, key, algorithms=["ES256"], audience="svc",
                         options={"verify_exp": False})  # fmt: skip
    assert decoded["aud"] == "svc"
    # Our thumbprint matches PyJWT's serialisation of the same public key.
    theirs = json.loads(ECAlgorithm.to_jwk(authority.keys.private_key.public_key()))
    assert jwk_thumbprint(theirs) == jwk["kid"]


def test_thumbprint_rfc7638_example() -> None:
    """RFC 7638 §3.1's RSA example and its published thumbprint."""
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJ"
        "ECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2"
        "QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6"
        "WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    jwk = {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_rotation_keeps_previous_public_keys(tmp_path: Path) -> None:
    state = tmp_path / "state"
    keys = SigningKeys(state, max_previous=2)
    authority = TokenAuthority(keys)
    verifier = TokenVerifier(authority)
    old = authority.issue("svc", NOW)["accessToken"]
    old_kid = keys.kid

    new_kid = keys.rotate()
    assert new_kid != old_kid == jwt.get_unverified_header(old)["kid"]
    new = authority.issue("svc", NOW)["accessToken"]
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert verifier.check(bearer(old), "svc", NOW)
    assert verifier.check(bearer(new), "svc", NOW)
    assert [k["kid"] for k in authority.jwks()["keys"]] == [new_kid, old_kid]
    assert all("d" not in k for k in authority.jwks()["keys"])
    assert stat.S_IMODE((state / tokens.PREVIOUS_KEYS_FILE).stat().st_mode) == 0o600

    # A restart sees the same current and previous keys.
    reloaded = SigningKeys(state, max_previous=2)
    assert reloaded.kid == new_kid
    assert reloaded.jwks() == keys.jwks()
    assert TokenVerifier(TokenAuthority(reloaded)).check(bearer(old), "svc", NOW)

    # Two more rotations push the first key out.
    keys.rotate()
    keys.rotate()
    assert len(keys.jwks()["keys"]) == 3
    fresh = TokenVerifier(authority)
    assert not fresh.check(bearer(old), "svc", NOW)
    assert fresh.check(bearer(new), "svc", NOW)
    # ...and the cache of the first verifier does not keep it alive either.
    assert not verifier.check(bearer(old), "svc", NOW)


# --- cache -----------------------------------------------------------------------------------


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)  # what router.tokens calls
    return calls


def test_cache_hits_skip_verification(
    authority: TokenAuthority, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_decodes(monkeypatch)
    auth = bearer(authority.issue("svc", NOW)["accessToken"])
    for _ in range(5):
        assert verifier.check(auth, "svc", NOW)
    assert calls[0] == 1
    # The cache is per audience: no free pass for another service.
    assert not verifier.check(auth, "other", NOW)
    # Failures are not cached as successes, and do not evict the good entry.
    assert verifier.check(auth, "svc", NOW + 10)
    assert calls[0] == 2  # the failed "other" check verified once
    assert not verifier.check(auth, "other", NOW + 10)
    assert calls[0] == 2  # ...and is refused from the failure cache since


def test_failures_are_cached_while_their_key_stands(
    authority: TokenAuthority, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token that fails full verification (here: another audience, then a forged signature)
    is refused from the cache when sent again: a flood of one bad token costs lookups."""
    calls = _count_decodes(monkeypatch)
    auth = bearer(authority.issue("svc", NOW)["accessToken"])
    for _ in range(5):
        assert not verifier.check(auth, "other", NOW)
    assert calls[0] == 1
    head, body, sig = auth[7:].split(b".")
    forged = b"Bearer " + head + b"." + body + b"." + sig[::-1]
    for _ in range(5):
        assert not verifier.check(forged, "svc", NOW)
    assert calls[0] == 2
    assert verifier.check(auth, "svc", NOW)  # the good token is not touched by either
    assert not verifier.check(auth, "other", NOW + 61)  # TTL over: verified again
    assert calls[0] == 4


def test_cache_respects_exp(
    authority: TokenAuthority, verifier: TokenVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_decodes(monkeypatch)
    issued = authority.issue("svc", NOW)
    auth = bearer(issued["accessToken"])
    assert verifier.check(auth, "svc", issued["expiryOn"] - 5)
    assert verifier.check(auth, "svc", issued["expiryOn"] + LEEWAY - 1)  # cache hit
    assert calls[0] == 1
    assert not verifier.check(auth, "svc", issued["expiryOn"] + LEEWAY)
    assert not verifier.check(auth, "svc", issued["expiryOn"] + LEEWAY - 1 - 1e-9 + 100)


def test_cache_ttl_and_bound(authority: TokenAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(monkeypatch)
    verifier = TokenVerifier(authority, cache_size=2, cache_ttl_s=60)
    a, b, c = (bearer(authority.issue(s, NOW)["accessToken"]) for s in ("a", "b", "c"))
    assert verifier.check(a, "a", NOW)
    assert verifier.check(a, "a", NOW + 59)
    assert calls[0] == 1
    assert verifier.check(a, "a", NOW + 60)  # TTL over: verified again
    assert calls[0] == 2
    assert verifier.check(b, "b", NOW + 60)
    assert verifier.check(c, "c", NOW + 60)  # evicts a (least recently used)
    assert calls[0] == 4
    assert verifier.check(c, "c", NOW + 60) and verifier.check(b, "b", NOW + 60)
    assert calls[0] == 4
    assert verifier.check(a, "a", NOW + 60)
    assert calls[0] == 5


# --- external issuers ------------------------------------------------------------------------


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", **extra}


def idp_token(key: rsa.RSAPrivateKey, kid: str, alg: str = "RS256", **c: Any) -> bytes:
    body = claims(**{"iss": IDP, "aud": IDP_AUDIENCE, **c})
    return bearer(jwt.encode(body, key, alg, {"kid": kid}))


class JwksServer:
    """A real HTTP server on loopback serving a JWKS that the test can change."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.requests = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response(self.jwks)


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/certs", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/certs"
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_external_issuer_over_http(
    jwks_server: JwksServer, authority: TokenAuthority
) -> None:
    key = rsa_key()
    jwks_server.jwks = {"keys": [rsa_jwk(key, "k1")]}
    ext = ExternalJwks(IDP, IDP_AUDIENCE, jwks_url=jwks_server.url)
    verifier = TokenVerifier(authority, [ext], on_unknown_kid=lambda e: None)
    token = idp_token(key, "k1")
    assert not verifier.check(token, "svc", NOW)  # keys not fetched yet
    await verifier.refresh_all()
    assert jwks_server.requests == 1
    # The configured audience, for every service or endpoint with token auth.
    assert verifier.check(token, "svc", NOW)
    assert verifier.check(token, "another-svc", NOW)
    assert not verifier.check(token, "svc", NOW + 3600 + LEEWAY)
    # A token from the IdP for a service name as audience is not for us.
    assert not verifier.check(idp_token(key, "k1", aud="svc"), "svc", NOW)
    # Only the JWK's algorithm: the same RSA key under another RSA algorithm is refused.
    assert not verifier.check(idp_token(key, "k1", alg="RS512"), "svc", NOW)
    assert not verifier.check(idp_token(key, "k1", alg="PS256"), "svc", NOW)
    # Our own tokens still work next to the external issuer's.
    assert verifier.check(bearer(authority.issue("svc", NOW)["accessToken"]), "svc", NOW)
    assert jwks_server.requests == 1  # never fetched per request


async def test_issuer_picks_the_key_set(jwks_server: JwksServer, keys: SigningKeys) -> None:
    """The unverified `iss` only chooses among key sets: it cannot borrow another set's key."""
    idp_key = rsa_key()
    jwks_server.jwks = {"keys": [rsa_jwk(idp_key, "k1")]}
    ext = ExternalJwks(IDP, IDP_AUDIENCE, jwks_url=jwks_server.url, clock=FakeClock())
    unknown: list[ExternalJwks] = []
    verifier = TokenVerifier(TokenAuthority(keys), [ext], on_unknown_kid=unknown.append)
    await ext.refresh()
    # Signed by the IdP, claiming to be the router.
    forged = jwt.encode(claims(aud="svc"), idp_key, "RS256", {"kid": "k1"})
    assert not verifier.check(bearer(forged), "svc", NOW)
    # Signed by the router, claiming to be the IdP.
    forged = jwt.encode(claims(iss=IDP, aud=IDP_AUDIENCE), keys.private_key, "ES256",
                        {"kid": keys.kid})  # fmt: skip
    assert not verifier.check(bearer(forged), "svc", NOW)
    # Unknown issuers are refused without any lookup.
    other = jwt.encode(claims(iss="https://other.example"), idp_key, "RS256", {"kid": "k1"})
    assert not verifier.check(bearer(other), "svc", NOW)
    assert unknown == []  # the forged kid came within the rate limit of the first refresh


async def test_unknown_kid_refresh_is_rate_limited(jwks_server: JwksServer) -> None:
    key1, key2 = rsa_key(), rsa_key()
    jwks_server.jwks = {"keys": [rsa_jwk(key1, "k1")]}
    clock = FakeClock(1000.0)
    ext = ExternalJwks(IDP, IDP_AUDIENCE, jwks_url=jwks_server.url, clock=clock)
    verifier = TokenVerifier(None, [ext])  # the default: refresh in the background
    assert await ext.refresh()

    # The IdP rotates its key.
    jwks_server.jwks = {"keys": [rsa_jwk(key2, "k2")]}
    new = idp_token(key2, "k2")
    clock.t += 5  # within 30 s of the last fetch: no refresh
    assert not verifier.check(new, "svc", NOW)
    assert not verifier.pending_refreshes

    clock.t += 30
    for _ in range(50):  # a flood of unknown kids: one refresh
        assert not verifier.check(new, "svc", NOW)  # 401 at once, not after the fetch
        assert not verifier.check(idp_token(key2, "made-up"), "svc", NOW)
    (refresh,) = verifier.pending_refreshes
    assert await refresh
    assert jwks_server.requests == 2
    assert verifier.check(new, "svc", NOW)
    assert not verifier.check(idp_token(key1, "k1"), "svc", NOW)  # dropped by the IdP

    clock.t += 10
    assert not verifier.check(idp_token(key2, "made-up"), "svc", NOW)
    assert not verifier.pending_refreshes
    await verifier.aclose()


async def test_refresh_failure_keeps_keys(
    jwks_server: JwksServer, caplog: pytest.LogCaptureFixture
) -> None:
    key = rsa_key()
    jwks_server.jwks = {"keys": [rsa_jwk(key, "k1")]}
    ext = ExternalJwks(IDP, IDP_AUDIENCE, jwks_url=jwks_server.url)
    verifier = TokenVerifier(None, [ext])
    assert await ext.refresh()
    jwks_server.jwks = {"not": "a jwks"}
    with caplog.at_level(logging.WARNING, logger="router.tokens"):
        assert not await ext.refresh()
    assert "could not refresh" in caplog.text
    assert verifier.check(idp_token(key, "k1"), "svc", NOW)

    dead = ExternalJwks(IDP, IDP_AUDIENCE, jwks_url="http://127.0.0.1:1/certs")
    assert not await dead.refresh()
    assert dead.verification_keys == {}


async def test_removed_key_ends_cached_tokens(jwks_server: JwksServer) -> None:
    key = rsa_key()
    jwks_server.jwks = {"keys": [rsa_jwk(key, "k1")]}
    ext = ExternalJwks(IDP, IDP_AUDIENCE, jwks_url=jwks_server.url)
    verifier = TokenVerifier(None, [ext])
    await ext.refresh()
    token = idp_token(key, "k1")
    assert verifier.check(token, "svc", NOW)
    jwks_server.jwks = {"keys": []}
    await ext.refresh()
    assert not verifier.check(token, "svc", NOW)


async def test_jwks_file_issuer(tmp_path: Path) -> None:
    key1, key2 = rsa_key(), rsa_key()
    path = tmp_path / "idp.jwks"
    path.write_bytes(orjson.dumps({"keys": [rsa_jwk(key1, "k1")]}))
    clock = FakeClock()
    cfg = TokenIssuer(issuer=IDP, audience=IDP_AUDIENCE, jwks_file=path)
    ext = ExternalJwks.from_config(cfg, clock=clock)
    refreshes: list[ExternalJwks] = []
    verifier = TokenVerifier(None, [ext], on_unknown_kid=refreshes.append)
    assert verifier.check(idp_token(key1, "k1"), "svc", NOW)  # loaded at start

    path.write_bytes(orjson.dumps({"keys": [rsa_jwk(key1, "k1"), rsa_jwk(key2, "k2")]}))
    clock.t += 31
    assert not verifier.check(idp_token(key2, "k2"), "svc", NOW)
    assert refreshes == [ext]
    assert await refreshes[0].refresh()
    assert verifier.check(idp_token(key2, "k2"), "svc", NOW)
    assert verifier.check(idp_token(key1, "k1"), "svc", NOW)

    path.write_text("{broken")
    assert not await ext.refresh()
    assert verifier.check(idp_token(key2, "k2"), "svc", NOW + 1)

    with pytest.raises(FileNotFoundError):
        ExternalJwks(IDP, IDP_AUDIENCE, jwks_file=tmp_path / "missing.jwks")


async def test_router_jwks_as_external_issuer(tmp_path: Path, jwks_server: JwksServer) -> None:
    """Another instance's `/v1/jwks.json` is a usable JWKS (ES256 from its `alg`)."""
    other = TokenAuthority(SigningKeys(tmp_path / "other"), issuer="mlfe-other")
    jwks_server.jwks = other.jwks()
    ext = ExternalJwks("mlfe-other", "shared-aud", jwks_url=jwks_server.url)
    verifier = TokenVerifier(TokenAuthority(SigningKeys(tmp_path / "me")), [ext])
    await verifier.refresh_all()
    assert verifier.check(bearer(other.issue("shared-aud", NOW)["accessToken"]), "svc", NOW)


def test_parse_jwks_refuses_symmetric_weak_and_unusable_keys() -> None:
    good = rsa_key()
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    secret = b64(b"0123456789abcdef0123456789abcdef")
    ec_key = ec.generate_private_key(ec.SECP384R1())
    ec_jwk = {**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "ec384"}
    with_private = {**RSAAlgorithm.to_jwk(good, as_dict=True), "kid": "private"}
    jwks = {
        "keys": [
            rsa_jwk(good, "good"),
            {**rsa_jwk(good, "no-alg")},
            rsa_jwk(good, "rs512", alg="RS512"),
            ec_jwk,
            with_private,
            {"kty": "oct", "k": secret, "kid": "hmac", "alg": "HS256"},
            {"kty": "oct", "k": secret, "kid": "hmac-no-alg"},
            rsa_jwk(good, "rsa-as-hmac", alg="HS256"),
            rsa_jwk(good, "none", alg="none"),
            rsa_jwk(good, "enc", use="enc"),
            rsa_jwk(weak, "weak"),
            {k: v for k, v in rsa_jwk(good, "x").items() if k != "kid"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not a key",
        ]
    }
    keys = parse_jwks(jwks)
    assert {kid: vk.algorithm for kid, vk in keys.items()} == {
        "good": "RS256",
        "no-alg": "RS256",
        "rs512": "RS512",
        "ec384": "ES384",
        "private": "RS256",
    }
    assert isinstance(keys["private"].key, rsa.RSAPublicKey)
    with pytest.raises(ValueError, match="not a JWKS"):
        parse_jwks({"keys": "nope"})


def test_hmac_token_against_symmetric_jwk_refused(tmp_path: Path) -> None:
    secret = b"0123456789abcdef0123456789abcdef"
    path = tmp_path / "idp.jwks"
    path.write_bytes(orjson.dumps({"keys": [{"kty": "oct", "k": b64(secret), "kid": "h"}]}))
    ext = ExternalJwks(IDP, IDP_AUDIENCE, jwks_file=path)
    verifier = TokenVerifier(None, [ext], on_unknown_kid=lambda e: None)
    token = jwt.encode(claims(iss=IDP, aud=IDP_AUDIENCE), secret, "HS256", {"kid": "h"})
    assert not verifier.check(bearer(token), "svc", NOW)


def test_config_errors(tmp_path: Path, authority: TokenAuthority,
                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    path = tmp_path / "idp.jwks"
    path.write_text('{"keys": []}')
    make: Callable[[str], ExternalJwks] = lambda iss: ExternalJwks(iss, "a", jwks_file=path)  # noqa: E731
    with pytest.raises(ValueError, match="configured twice"):
        TokenVerifier(authority, [make(IDP), make(IDP)])
    with pytest.raises(ValueError, match="configured twice"):
        TokenVerifier(authority, [make("mlfe")])
    with pytest.raises(ValueError, match="exactly one"):
        ExternalJwks(IDP, "a")
    with pytest.raises(ValueError, match="not http"):
        ExternalJwks(IDP, "a", jwks_url="file:///etc/passwd")
    with caplog.at_level(logging.WARNING, logger="router.tokens"):
        ExternalJwks(IDP, "a", jwks_url="http://idp.example/certs")
    assert "plain http" in caplog.text
    with pytest.raises(ValueError, match="lifetime"):
        TokenAuthority(authority.keys, lifetime_s=0)


def test_check_never_logs_the_token(
    authority: TokenAuthority, verifier: TokenVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    token = authority.issue("svc", NOW)["accessToken"]
    with caplog.at_level(logging.DEBUG):
        verifier.check(bearer(token), "svc", NOW)
        verifier.check(bearer(token), "other", NOW)
        verifier.check(bearer(token + "x"), "svc", NOW)
        verifier.check(bearer(token), "svc", NOW + 10**6)
    assert token.split(".")[2] not in caplog.text
    assert token.split(".")[1] not in caplog.text
