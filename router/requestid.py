"""Request ids: a fresh UUID4 per request, and the client's id checked against azureml's rules."""

from __future__ import annotations

import os
import random
import re

# Request ids need uniqueness, not secrecy: a seeded Mersenne Twister costs no system call per
# request, where os.urandom (uuid.uuid4) does one getrandom(2) each time. Ids are made BATCH at
# a time from one draw of random bits (one big int to hex in C), so a request pays a list pop.
BATCH = 256
_rng = random.Random()
_ready: list[str] = []
_VARIANT = "89ab89ab89ab89ab"  # the variant nibble (10xx) for each value of a random nibble


def _after_fork() -> None:
    """Forked workers must not repeat each other's (or their parent's) ids."""
    _rng.seed()
    _ready.clear()


os.register_at_fork(after_in_child=_after_fork)


def _refill() -> None:
    h = _rng.getrandbits(128 * BATCH).to_bytes(16 * BATCH, "little").hex()
    _ready.extend([
        # version 4 in the 13th hex digit, variant 10xx in the 17th; the rest random
        f"{h[i:i + 8]}-{h[i + 8:i + 12]}-4{h[i + 13:i + 16]}-{_VARIANT[int(h[i + 16], 16)]}"
        f"{h[i + 17:i + 20]}-{h[i + 20:i + 32]}"
        for i in range(0, 32 * BATCH, 32)
    ])


def new_request_id() -> str:
    """A random (version 4) UUID string."""
    if not _ready:
        _refill()
    return _ready.pop()


# azureml: alphanumerics, '-' and '_', at most 40 characters; anything else is dropped (not echoed).
_CLIENT_ID_RE = re.compile(rb"[A-Za-z0-9_-]{1,40}")


def valid_client_request_id(value: bytes) -> bool:
    return _CLIENT_ID_RE.fullmatch(value) is not None
