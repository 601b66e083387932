"""Credential checks on the scoring path: `Authorization: Bearer <key>`, either key of the owner."""

from __future__ import annotations

import hmac
from typing import Protocol


class KeyAuth:
    """Accepts either of two keys; compared in constant time, both always compared."""

    __slots__ = ("_primary", "_secondary")

    def __init__(self, primary: str, secondary: str) -> None:
        self._primary = primary.encode()
        self._secondary = secondary.encode()

    def check(self, authorization: bytes | None) -> bool:
        if authorization is None or len(authorization) < 8:
            return False
        if authorization[:7].lower() != b"bearer ":
            return False
        presented = authorization[7:].strip()
        # Non-short-circuit `|`: the time taken does not tell which key matched.
        return hmac.compare_digest(presented, self._primary) | hmac.compare_digest(
            presented, self._secondary
        )


class NoAuth:
    __slots__ = ()

    def check(self, authorization: bytes | None) -> bool:
        return True


class Credentials(Protocol):
    """What the scoring path asks of a service's or endpoint's auth (keys, tokens or none)."""

    def check(self, authorization: bytes | None) -> bool: ...
