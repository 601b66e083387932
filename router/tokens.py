"""Token (JWT) auth on the scoring path: tokens the router issues, and tokens from external IdPs.

Issued tokens (`POST /v1/services/{name}/token` on the admin API)
    ES256 (ECDSA P-256 + SHA-256), signed with a key kept in `state_dir/signing-key.pem`
    (PKCS#8 PEM, written atomically, mode 0600). Header `{"alg": "ES256", "typ": "JWT",
    "kid": <RFC 7638 thumbprint>}`; claims `iss` (configurable, default "mlfe"), `aud` (the
    service or endpoint name the token is for), `iat`, `exp`. Lifetime 1 hour; `refreshAfter` is
    at half the lifetime, so a client that refreshes late still has 30 minutes of slack (azureml
    does not document its own split). The response is azureml's
    `AksServiceAccessToken` shape: `{"accessToken", "tokenType": "Bearer", "refreshAfter",
    "expiryOn"}`, times in epoch seconds.

    `rotate()` makes a new signing key; the old public key is kept (persisted next to the key,
    in `signing-key.previous.jwks`) so tokens already handed out stay valid until they expire.
    The public keys are served as a JWKS (`GET /v1/jwks.json` on the admin port) so other
    router instances, or anyone else, can verify the tokens.

External issuers (`router.token_issuers`: Entra ID, Keycloak, ...)
    Each is `{issuer, audience, jwks_file | jwks_url}`. A token whose `iss` equals `issuer` is
    verified with that issuer's JWKS and must carry `aud == audience` -- the *configured*
    audience, not the service name: a token the IdP minted for audience X is accepted by every
    service and endpoint that has `token_auth_enabled`. (Issued tokens, by contrast, are bound
    to one service or endpoint by their `aud`.) A `jwks_url` is fetched with httpx when the
    router starts (`await refresh()`) and again when a token names a `kid` the cache does not
    know -- at most once per `min_refresh_interval_s`, in the background: that request gets 401
    at once, the next one after the refresh succeeds. Keys are never fetched per request.

Verification (`TokenVerifier.check`)
    The unverified header's `kid` and the unverified `iss` only *select* a key (a dict lookup);
    the token is then verified by PyJWT with `algorithms` fixed to that key's single algorithm
    (ES256 for ours; for an external JWK its `alg`, else from its kty/crv: RS256 for RSA, ES256
    for P-256 ...). `none` and the HMAC algorithms are never accepted: no symmetric ("oct") key
    is ever loaded and the algorithm list never contains HS*, so the public-key-as-HMAC-secret
    confusion cannot work. Required claims: `exp`, `aud`, `iss`; `exp`, `nbf` and `iat` are
    checked against `now` (the router's clock, or a caller's fake clock in tests) with a leeway
    (30 s). `check()` never raises and never logs the token.

Cost (`timeit`, best of 5; 2-vCPU box shared with other work; CPython 3.11, cryptography 50,
PyJWT 2.15):
    full ES256 verification (`check()`, cache off)        ~ 70-115 µs
    full RS256 (2048-bit) verification of an IdP token     ~ 75-85 µs
    the same token again (cache hit)                       ~ 0.5-1 µs
    a bad signature on a known kid (PyJWT raises)          ~ 65-140 µs once, then cached
    garbage / unknown kid (no crypto)                      ~ 0.4 / 2 µs
    `issue()` (ES256 sign)                                 ~ 25-40 µs
    Successful verifications are cached per (token, audience) in a bounded LRU until
    min(exp + leeway, now + cache_ttl_s); a hit also re-checks that the key is still known, so a
    key removed from an IdP's JWKS stops its tokens at the next refresh.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mlfe.config import TokenIssuer
from mlfe.redact import redact_url, redact_urls_in
from router.keystore import PREVIOUS_KEYS_FILE, SIGNING_KEY_FILE, atomic_write

log = logging.getLogger(__name__)

ALGORITHM = "ES256"
DEFAULT_ISSUER = "mlfe"
DEFAULT_LIFETIME_S = 3600
DEFAULT_LEEWAY_S = 30.0

# Algorithms an external JWK may be used with. Never "none", never HS* (symmetric).
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_ASYMMETRIC_KTY = frozenset({"RSA", "EC", "OKP"})
_MIN_RSA_BITS = 2048
_MAX_TOKEN_BYTES = 16 * 1024
_MAX_JWKS_BYTES = 1024 * 1024
_NOT_FOUND = object()

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class VerifyKey(NamedTuple):
    """A public key and the one algorithm it may verify."""

    key: PublicKey
    algorithm: str


class KeySet(Protocol):
    """Something holding `kid -> VerifyKey`; the dict is replaced whole, never mutated."""

    @property
    def verification_keys(self) -> Mapping[str, VerifyKey]: ...


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url) of a public JWK: its required members only."""
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
    required = members[jwk["kty"]]
    canonical = orjson.dumps({k: jwk[k] for k in required}, option=orjson.OPT_SORT_KEYS)
    return _b64url(hashlib.sha256(canonical).digest())


def ec_public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK of a P-256 key, with `kid` (its thumbprint), `use: sig`, `alg: ES256`."""
    numbers = key.public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }
    return {**jwk, "kid": jwk_thumbprint(jwk), "use": "sig", "alg": ALGORITHM}


def parse_jwks(data: Any, source: str = "jwks") -> dict[str, VerifyKey]:
    """`kid -> VerifyKey` for the usable signing keys of a JWKS document.

    Skipped (and logged by kid): keys without a `kid`, with `use` other than "sig", symmetric
    keys, algorithms outside ASYMMETRIC_ALGORITHMS, RSA keys under 2048 bits, malformed keys.
    Private members, if a JWKS carries them, are ignored: only the public key is kept.
    """
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{source}: not a JWKS (an object with a 'keys' list)")
    keys: dict[str, VerifyKey] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            log.warning("%s: skipping a key without kid", source)
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("kty") not in _ASYMMETRIC_KTY:
            log.info("%s: skipping key %s (not an asymmetric signing key)", source, kid)
            continue
        alg = jwk.get("alg")
        if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
            log.warning("%s: skipping key %s (algorithm %r not accepted)", source, kid, alg)
            continue
        try:
            # PyJWK takes `alg` when present, else infers it from kty/crv (RSA -> RS256, ...).
            # Its error messages can echo the JWK, so they are not logged.
            pyjwk = jwt.PyJWK(jwk)
        except Exception:  # PyJWKError, InvalidKeyError, ValueError from cryptography ...
            log.warning("%s: skipping key %s (malformed)", source, kid)
            continue
        algorithm = pyjwk.algorithm_name
        public = pyjwk.key
        if isinstance(
            public, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        ):
            public = public.public_key()
        if algorithm not in ASYMMETRIC_ALGORITHMS or not isinstance(
            public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
        ):
            log.warning("%s: skipping key %s (algorithm %r not accepted)", source, kid, algorithm)
            continue
        if isinstance(public, rsa.RSAPublicKey) and public.key_size < _MIN_RSA_BITS:
            log.warning("%s: skipping key %s (RSA key under %d bits)", source, kid, _MIN_RSA_BITS)
            continue
        keys[kid] = VerifyKey(public, algorithm)
    return keys


class SigningKeys:
    """The router's ES256 signing key (created once, kept in the state dir) and the public keys
    of the keys it replaced (kept for verification until tokens signed with them expire)."""

    def __init__(self, state_dir: Path, *, max_previous: int = 2) -> None:
        self._path = state_dir / SIGNING_KEY_FILE
        self._previous_path = state_dir / PREVIOUS_KEYS_FILE
        self._max_previous = max_previous
        if self._path.exists():
            key = serialization.load_pem_private_key(self._path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
                raise ValueError(f"{self._path}: not an EC P-256 private key")
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            atomic_write(self._path, _pem(key))
        self._private_key = key
        self._current = ec_public_jwk(key.public_key())
        self._previous: list[dict[str, str]] = []
        if self._previous_path.exists():
            loaded = orjson.loads(self._previous_path.read_bytes())
            usable = parse_jwks(loaded, str(self._previous_path))
            self._previous = [
                jwk for jwk in loaded["keys"] if jwk.get("kid") in usable and jwk["kid"] != self.kid
            ][:max_previous]
        self._rebuild()

    @property
    def kid(self) -> str:
        return self._current["kid"]

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._private_key

    @property
    def verification_keys(self) -> Mapping[str, VerifyKey]:
        return self._verification_keys

    def jwks(self) -> dict[str, Any]:
        """RFC 7517 JWK Set of the public keys (current first): no private members."""
        return {"keys": [dict(self._current), *(dict(k) for k in self._previous)]}

    def rotate(self) -> str:
        """A new signing key; the old public key stays for verification. Returns the new kid.

        The previous-keys file is written before the new private key, so a crash in between
        leaves the old key both current and previous (harmless) rather than lost.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        previous = [self._current, *self._previous][: self._max_previous]
        atomic_write(self._previous_path, orjson.dumps({"keys": previous}))
        atomic_write(self._path, _pem(key))
        self._private_key = key
        self._current = ec_public_jwk(key.public_key())
        self._previous = previous
        self._rebuild()
        return self.kid

    def _rebuild(self) -> None:
        keys = {self.kid: VerifyKey(self._private_key.public_key(), ALGORITHM)}
        for kid, vk in parse_jwks({"keys": self._previous}, "previous keys").items():
            keys.setdefault(kid, vk)
        self._verification_keys = keys


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TokenAuthority:
    """Issues the router's own tokens: `aud` = the service or endpoint name."""

    def __init__(
        self,
        keys: SigningKeys,
        issuer: str = DEFAULT_ISSUER,
        lifetime_s: int = DEFAULT_LIFETIME_S,
    ) -> None:
        if lifetime_s < 1:
            raise ValueError(f"token lifetime {lifetime_s} s: at least 1 s")
        self.keys = keys
        self.issuer = issuer
        self.lifetime_s = lifetime_s

    def issue(self, audience: str, now: float) -> dict[str, Any]:
        """`{"accessToken", "tokenType": "Bearer", "refreshAfter", "expiryOn"}` (epoch seconds).

        refreshAfter = iat + lifetime / 2 (30 min for the default hour).
        """
        iat = int(now)
        exp = iat + self.lifetime_s
        token = jwt.encode(
            {"iss": self.issuer, "aud": audience, "iat": iat, "exp": exp},
            self.keys.private_key,
            algorithm=ALGORITHM,
            headers={"kid": self.keys.kid},
        )
        return {
            "accessToken": token,
            "tokenType": "Bearer",
            "refreshAfter": iat + self.lifetime_s // 2,
            "expiryOn": exp,
        }

    def jwks(self) -> dict[str, Any]:
        return self.keys.jwks()


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ExternalJwks:
    """An external issuer's keys, from a JWKS file or URL, cached in memory.

    `refresh()` (async, never raises) reloads the file or fetches the URL; on failure the keys
    already held are kept. The verifier calls `claim_refresh()` on an unknown kid: True at most
    once per `min_refresh_interval_s` (counted from the last refresh of any kind), so a flood of
    made-up kids costs the IdP one request per interval.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        jwks_file: Path | None = None,
        jwks_url: str | None = None,
        min_refresh_interval_s: float = 30.0,
        http_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (jwks_file is None) == (jwks_url is None):
            raise ValueError(f"token issuer {issuer!r}: exactly one of jwks_file or jwks_url")
        # What is logged or shown of the URL: no userinfo, no query (either may hold a secret).
        self._url_shown = redact_url(jwks_url) if jwks_url is not None else ""
        if jwks_url is not None:
            scheme = urlsplit(jwks_url).scheme
            if scheme not in ("http", "https"):
                raise ValueError(
                    f"token issuer {issuer!r}: jwks_url {self._url_shown} is not http(s)")
            if scheme == "http" and not _is_loopback(jwks_url):
                log.warning(
                    "token issuer %r: jwks_url %s is plain http: keys can be forged in transit",
                    issuer,
                    self._url_shown,
                )
        self.issuer = issuer
        self.audience = audience
        self.jwks_file = jwks_file
        self.jwks_url = jwks_url
        self.min_refresh_interval_s = min_refresh_interval_s
        self._http_timeout_s = http_timeout_s
        self._clock = clock
        self._last_refresh = -math.inf
        self._verification_keys: dict[str, VerifyKey] = {}
        if jwks_file is not None:
            self.load_file()  # at start: a missing or broken file is a config error

    @classmethod
    def from_config(cls, cfg: TokenIssuer, **kwargs: Any) -> ExternalJwks:
        """From a `router.token_issuers` entry (issuer, audience, jwks_file | jwks_url)."""
        return cls(
            cfg.issuer, cfg.audience, jwks_file=cfg.jwks_file, jwks_url=cfg.jwks_url, **kwargs
        )

    @property
    def verification_keys(self) -> Mapping[str, VerifyKey]:
        return self._verification_keys

    def load_file(self) -> None:
        """(Re)load `jwks_file`; raises on a missing or malformed file."""
        assert self.jwks_file is not None
        self._last_refresh = self._clock()
        data = orjson.loads(self.jwks_file.read_bytes())
        self._verification_keys = parse_jwks(data, str(self.jwks_file))

    def claim_refresh(self) -> bool:
        """Whether a refresh may start now (and if so, the slot is taken)."""
        now = self._clock()
        if now - self._last_refresh < self.min_refresh_interval_s:
            return False
        self._last_refresh = now
        return True

    async def refresh(self) -> bool:
        """Reload the file or fetch the URL. Never raises; False (keys kept) on failure."""
        self._last_refresh = self._clock()
        try:
            if self.jwks_file is not None:
                await asyncio.to_thread(self.load_file)
            else:
                self._verification_keys = parse_jwks(await self._fetch(), self._url_shown)
        except Exception as e:
            log.warning(
                "token issuer %r: could not refresh keys from %s: %s",
                self.issuer,
                self.jwks_file or self._url_shown,
                self._failure(e),
            )
            return False
        log.info("token issuer %r: %d signing keys", self.issuer, len(self._verification_keys))
        return True

    def _failure(self, e: Exception) -> str:
        """A failed refresh, as logged: httpx names the URL it failed on (after redirects, too),
        so every URL in the message is shown redacted."""
        if self.jwks_url is not None:
            import httpx  # (already imported by _fetch: only a URL issuer gets httpx errors)

            if isinstance(e, httpx.HTTPStatusError):
                return f"HTTP {e.response.status_code} from {redact_url(str(e.request.url))}"
        return redact_urls_in(str(e) or type(e).__name__)

    async def _fetch(self) -> Any:
        # Imported here: only routers with a jwks_url issuer need it, and httpx brings several
        # MiB of modules (rich, pygments, click) into every router's RSS.
        import httpx

        assert self.jwks_url is not None
        async with (
            httpx.AsyncClient(timeout=self._http_timeout_s, follow_redirects=True) as client,
            client.stream("GET", self.jwks_url, headers={"Accept": "application/json"}) as resp,
        ):
            resp.raise_for_status()
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > _MAX_JWKS_BYTES:
                    raise ValueError(f"JWKS larger than {_MAX_JWKS_BYTES} bytes")
        return orjson.loads(body)


class TokenVerifier:
    """Checks `Authorization: Bearer <jwt>` against the router's keys and external issuers.

    `on_unknown_kid(issuer)` is called (at most once per the issuer's refresh interval) when a
    token from an external issuer names a kid not in its key set; the default schedules
    `issuer.refresh()` as a task on the running loop. The request itself fails at once.
    """

    def __init__(
        self,
        authority: TokenAuthority | None = None,
        external: Iterable[ExternalJwks] = (),
        *,
        leeway_s: float = DEFAULT_LEEWAY_S,
        cache_size: int = 4096,
        cache_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        on_unknown_kid: Callable[[ExternalJwks], None] | None = None,
    ) -> None:
        self._authority = authority
        self._local_issuer = authority.issuer if authority is not None else None
        self._external: dict[str, ExternalJwks] = {}
        for ext in external:
            if ext.issuer in self._external or ext.issuer == self._local_issuer:
                raise ValueError(f"token issuer {ext.issuer!r} is configured twice")
            self._external[ext.issuer] = ext
        self.leeway_s = leeway_s
        self._cache: OrderedDict[tuple[bytes, str], tuple[float, KeySet, str]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_ttl_s = cache_ttl_s
        # Tokens that failed full verification (bad signature, audience, issuer, claims, or
        # expired), so the same bad token sent again costs a lookup, not a signature check.
        # An entry holds from `since` (an expired token's expiry; -inf otherwise) to its TTL,
        # while the key it failed against is still the kid's key.
        self._failed: OrderedDict[
            tuple[bytes, str], tuple[float, float, KeySet, str, object]] = OrderedDict()
        self._clock = clock
        self._on_unknown_kid = on_unknown_kid or self._schedule_refresh
        self._tasks: set[asyncio.Task[bool]] = set()

    @property
    def external(self) -> Mapping[str, ExternalJwks]:
        return self._external

    async def refresh_all(self) -> None:
        """Fetch every external issuer's keys (at start)."""
        await asyncio.gather(*(ext.refresh() for ext in self._external.values()))

    @property
    def pending_refreshes(self) -> tuple[asyncio.Task[bool], ...]:
        """Background refreshes started by unknown kids and not finished yet."""
        return tuple(self._tasks)

    async def aclose(self) -> None:
        """Cancel background refreshes (at shutdown)."""
        tasks = self.pending_refreshes
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def check(self, authorization: bytes | None, audience: str, now: float | None = None) -> bool:
        """True iff `authorization` is `Bearer <jwt>` valid for `audience` at `now`."""
        try:
            return self._check(authorization, audience, self._clock() if now is None else now)
        except Exception:
            return False

    def _check(self, authorization: bytes | None, audience: str, now: float) -> bool:
        if authorization is None or not 8 <= len(authorization) <= _MAX_TOKEN_BYTES:
            return False
        if authorization[:7].lower() != b"bearer ":
            return False
        token = authorization[7:].strip()
        cache_key = (token, audience)
        hit = self._cache.get(cache_key)
        if hit is not None:
            deadline, cached_keys, cached_kid = hit
            if now < deadline and cached_kid in cached_keys.verification_keys:
                self._cache.move_to_end(cache_key)
                return True
            del self._cache[cache_key]
        failed = self._failed.get(cache_key)
        if failed is not None:
            deadline, since, failed_keys, failed_kid, failed_key = failed
            if since <= now < deadline and (
                    failed_keys.verification_keys.get(failed_kid) is failed_key):
                return False
            del self._failed[cache_key]

        # Unverified look at header and claims: only to choose the key.
        head, sep, rest = token.partition(b".")
        body, sep2, _sig = rest.partition(b".")
        if not sep or not sep2:
            return False
        header = orjson.loads(_b64url_decode(head))
        claims = orjson.loads(_b64url_decode(body))
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return False
        kid: object = header.get("kid")
        iss: object = claims.get("iss")
        if not isinstance(kid, str) or not isinstance(iss, str):
            return False
        keyset: KeySet
        ext: ExternalJwks | None = None
        if iss == self._local_issuer and self._authority is not None:
            keyset, expected_aud = self._authority.keys, audience
        else:
            ext = self._external.get(iss)
            if ext is None:
                return False
            keyset, expected_aud = ext, ext.audience
        vk = keyset.verification_keys.get(kid)
        if vk is None:
            if ext is not None and ext.claim_refresh():
                self._on_unknown_kid(ext)
            return False
        if header.get("alg") != vk.algorithm:
            return False

        # Full verification; the time claims are checked below against `now`, not the wall clock.
        try:
            verified = jwt.decode(
                token,
                vk.key,
                algorithms=[vk.algorithm],
                audience=expected_aud,
                issuer=iss,
                options={
                    "require": ["exp", "aud", "iss"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidTokenError:
            self._remember_failure(cache_key, now, -math.inf, keyset, kid, vk)
            return False
        exp = verified["exp"]
        if not _is_number(exp):
            self._remember_failure(cache_key, now, -math.inf, keyset, kid, vk)
            return False
        if now >= exp + self.leeway_s:  # expired stays expired
            self._remember_failure(cache_key, now, exp + self.leeway_s, keyset, kid, vk)
            return False
        for claim in ("nbf", "iat"):
            value = verified.get(claim, _NOT_FOUND)
            if value is not _NOT_FOUND and (not _is_number(value) or now < value - self.leeway_s):
                return False  # (not remembered: it may become valid)

        self._cache[cache_key] = (min(exp + self.leeway_s, now + self._cache_ttl_s), keyset, kid)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return True

    def _remember_failure(self, cache_key: tuple[bytes, str], now: float, since: float,
                          keyset: KeySet, kid: str, vk: object) -> None:
        self._failed[cache_key] = (now + self._cache_ttl_s, since, keyset, kid, vk)
        if len(self._failed) > self._cache_size:
            self._failed.popitem(last=False)

    def _schedule_refresh(self, ext: ExternalJwks) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(ext.refresh())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class TokenAuth:
    """The scoring path's `check(authorization)` for one service or endpoint (like KeyAuth)."""

    __slots__ = ("_audience", "_verifier")

    def __init__(self, verifier: TokenVerifier, audience: str) -> None:
        self._verifier = verifier
        self._audience = audience

    def check(self, authorization: bytes | None) -> bool:
        return self._verifier.check(authorization, self._audience)
