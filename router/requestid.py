"""Request ids: a fresh UUID4 per request, and the client's id checked against azureml's rules."""

from __future__ import annotations

import os
import random
import re

# Request ids need uniqueness, not secrecy: a seeded Mersenne Twister costs no system call per
# request, where os.urandom (uuid.uuid4) does one getrandom(2) each time.
_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)  # forked workers must not repeat each other's ids
_VERSION_4 = (0x4 << 76) | (0x8 << 60)  # version nibble 4, variant bits 10
_CLEAR = ~((0xF << 76) | (0xC << 60))


def new_request_id() -> str:
    """A random (version 4) UUID string."""
    h = f"{(_rng.getrandbits(128) & _CLEAR) | _VERSION_4:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# azureml: alphanumerics, '-' and '_', at most 40 characters; anything else is dropped (not echoed).
_CLIENT_ID_RE = re.compile(rb"[A-Za-z0-9_-]{1,40}")


def valid_client_request_id(value: bytes) -> bool:
    return _CLIENT_ID_RE.fullmatch(value) is not None
