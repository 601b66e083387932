"""Per-service auth keys: taken from config or generated, persisted in the state dir.

The file is written atomically (temp file + rename) with owner-only permissions, so a crash
never leaves half a key file and no other user can read it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

import orjson

from mlfe.config import ConfigError

KEYS_FILE = "keys.json"
# The token signing key (router/tokens.py) and the public keys it replaced.
SIGNING_KEY_FILE = "signing-key.pem"
PREVIOUS_KEYS_FILE = "signing-key.previous.jwks"

log = logging.getLogger(__name__)


class KeyFileError(ConfigError):
    """The keys file exists but cannot be used: refused at start like a bad config (exit 2).
    The message names the file, never its content."""


def generate_key() -> str:
    """32 random bytes, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class KeyStore:
    """Keys by owner name (a service or an endpoint): {"primaryKey": ..., "secondaryKey": ...}."""

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / KEYS_FILE
        self._keys: dict[str, dict[str, str]] = {}
        if self._path.exists():
            try:
                loaded = orjson.loads(self._path.read_bytes())
            except (OSError, orjson.JSONDecodeError) as e:
                kind = "cannot be read" if isinstance(e, OSError) else "is not valid JSON"
                raise KeyFileError(f"{self._path} {kind}; restore it from a backup, or move "
                                   "it away to generate new keys") from None
            if not isinstance(loaded, dict) or not all(
                isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
                for v in loaded.values()
            ):
                raise KeyFileError(f"{self._path} is not a keys file (an object of "
                                   "objects of strings)")
            self._keys = loaded
        elif state_dir.exists() and any(state_dir.iterdir()):
            # A state dir in use without its keys: every generated key is about to change.
            log.warning("%s is missing: keys not set in config are generated anew", self._path)

    def ensure(self, name: str, primary: str | None, secondary: str | None) -> tuple[str, str]:
        """Keys for `name`. A key set in config is taken when it is new or changed there;
        otherwise the stored key stays (it may have been regenerated since); a missing key is
        generated. Whatever changed is stored before it is used."""
        stored = self._keys.get(name, {})
        keys = dict(stored)
        for field, given in (("primaryKey", primary), ("secondaryKey", secondary)):
            source = field + "FromConfig"  # a digest of the config value last taken
            if given is not None:
                digest = hashlib.sha256(given.encode()).hexdigest()
                if stored.get(source) != digest:
                    keys[field], keys[source] = given, digest
            if not keys.get(field):
                keys[field] = generate_key()
        if keys != stored:
            self._keys[name] = keys
            self._save()
        return keys["primaryKey"], keys["secondaryKey"]

    def get(self, name: str) -> tuple[str, str] | None:
        k = self._keys.get(name)
        return None if k is None else (k["primaryKey"], k["secondaryKey"])

    def regenerated(self, name: str, key_type: str) -> bytes:
        """The key file's content with a new ``key_type`` key for ``name``; nothing changes
        here until that content is stored (through the state store) and this store re-read."""
        field = {"Primary": "primaryKey", "Secondary": "secondaryKey"}[key_type]
        keys = {owner: dict(k) for owner, k in self._keys.items()}
        keys.setdefault(name, {"primaryKey": generate_key(), "secondaryKey": generate_key()})
        keys[name][field] = generate_key()
        return self._dump(keys)

    @staticmethod
    def _dump(keys: dict[str, dict[str, str]]) -> bytes:
        return orjson.dumps(keys, option=orjson.OPT_INDENT_2)

    def _save(self) -> None:
        atomic_write(self._path, self._dump(self._keys))
