"""What of a configuration may appear in an error message or a log line: the one rule.

Any config value may be a secret (a key, a password in an environment variable, a token in a
URL), so an error names the key path and the kind of problem, and shows the value given only
where it cannot be one:

- the value sits in a field typed as a number, a boolean or a fixed choice (`Literal`), or in a
  string field marked `SHOWN` (addresses, names: never secrets by their nature);
- it is a number, a boolean, None, or a string of token characters (no spaces, no `@`, `/`, `?`
  or `=`: no URL, no password with punctuation) no longer than 15 characters (shorter than the
  shortest key mlfe accepts), or 100 for a `SHOWN` field, so that even a key pasted into the
  wrong field stays hidden;
- never under a mapping of arbitrary user keys (`environment_variables`, `tags`, `properties`),
  never for a key the schema does not have (a misspelt `primary_kye: ...` is refused by name).

URLs from a config (`jwks_url`) are logged and shown as `redact_url` gives them: no userinfo, no
query, no fragment.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel


class _Shown:
    """Marks a string field whose values are never secrets: `Annotated[str, SHOWN]`."""

    def __repr__(self) -> str:
        return "SHOWN"


SHOWN = _Shown()
_TOKEN_RE = re.compile(r"[A-Za-z0-9_.:+\-\[\]]+")
_SHORT = 15  # one less than a key's minimum length (mlfe/config.py: primary_key)
_LONG = 100  # a host name and port, a name
_SCALARS = (bool, int, float, type(None))


def redact_url(url: str) -> str:
    """`https://user:pass@host/path?token=x#f` -> `https://host/path` (`?…` marks a dropped
    query): what may be logged or shown of a URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    if not parts.scheme or not parts.netloc:
        return "<not a URL>"  # whatever it is, it is shown no more than a URL would be
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + ("?…" if parts.query else "")


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def redact_urls_in(text: str) -> str:
    """Every URL in a message (a library's error text) as `redact_url` gives it."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m[0]), text)


def shown_token(value: Any, max_len: int = _SHORT) -> str | None:
    """A value's repr if it can be shown whatever its key (a number, a boolean, None, a short
    token-like string), else None."""
    if isinstance(value, _SCALARS):
        return repr(value)
    if isinstance(value, str) and len(value) <= max_len and _TOKEN_RE.fullmatch(value):
        return repr(value)
    return None


def shown_at(model: type[BaseModel], loc: Sequence[str | int], value: Any) -> str | None:
    """VALUE's repr if the rule above lets it be shown at `loc` (pydantic's path under
    `model`), else None."""
    limit = _showable_at(model, loc)
    return shown_token(value, limit) if limit else None


def shown_value(model: type[BaseModel], loc: Sequence[str | int], value: Any) -> str:
    """` (got VALUE)` for an error at `loc` when VALUE may be shown there, else ``."""
    token = shown_at(model, loc, value)
    return "" if token is None else f" (got {token})"


def _showable_at(model: type[BaseModel], loc: Sequence[str | int]) -> int:
    """How long a string the field at `loc` may show (0: none), walking the schema: a key the
    schema does not know, or a path into a mapping of user strings, shows none."""
    tp: Any = model
    shown = False
    for part in loc:
        tp, marked = _strip(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(str(part))
            if info is None:
                return 0  # not a key of the schema (a typo, or a stray key)
            tp = info.annotation
            shown = any(m is SHOWN for m in info.metadata)
            continue
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is dict and len(args) == 2:
            tp, shown = args[1], False  # `part` is a user's key: what is under it, is theirs
        elif origin is list and args:
            tp, shown = args[0], shown or marked
        elif _is_union(tp):
            # pydantic names the union member that failed: all of them must be showable.
            return _SHORT if all(_scalar_type(a) for a in typing.get_args(tp)) else 0
        else:
            return 0
    tp, marked = _strip(tp)
    if shown or marked:
        return _LONG
    return _SHORT if _scalar_type(tp) else 0


def _strip(tp: Any) -> tuple[Any, bool]:
    """`Annotated[X, ...] | None` -> (X, whether SHOWN was among the metadata)."""
    marked = False
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            marked = marked or any(m is SHOWN for m in tp.__metadata__)
            tp = tp.__origin__
        elif _is_union(tp):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp, marked
            tp = args[0]
        else:
            return tp, marked


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _scalar_type(tp: Any) -> bool:
    tp, marked = _strip(tp)
    if marked or typing.get_origin(tp) is Literal:
        return True
    if _is_union(tp):
        return all(_scalar_type(a) for a in typing.get_args(tp))
    return tp in _SCALARS
