"""Small werkzeug-like containers for the request an `@rawhttp` run() receives, without flask.

Only what Azure ML entry scripts use: case-insensitive headers, multi-value query/form arguments
and uploaded files. They follow werkzeug's semantics (what azmlinfsrv hands scripts), so a
script's `request.headers.get("Content-Type")` or `request.args.getlist("k")` behave the same.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterable, Iterator
from os import PathLike
from typing import IO, Any, TypeVar, overload

T = TypeVar("T")
_MISSING: Any = object()


class Headers:
    """An ordered, case-insensitive list of (name, value) pairs; names may repeat.

    Iterating yields `(name, value)` tuples and `dict(headers)` maps names to values, as with
    werkzeug's `Headers`.
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._list: list[tuple[str, str]] = [(str(k), str(v)) for k, v in items]

    def __getitem__(self, key: str) -> str:
        lower = key.lower()
        for k, v in self._list:
            if k.lower() == lower:
                return v
        raise KeyError(key)

    @overload
    def get(self, key: str) -> str | None: ...
    @overload
    def get(self, key: str, default: T) -> str | T: ...
    @overload
    def get(self, key: str, default: Any, type: Callable[[str], T]) -> T | Any: ...

    def get(self, key: str, default: Any = None, type: Callable[[str], Any] | None = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        if type is None:
            return value
        try:
            return type(value)
        except ValueError:
            return default

    def getlist(self, key: str) -> list[str]:
        lower = key.lower()
        return [v for k, v in self._list if k.lower() == lower]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and any(k.lower() == key.lower() for k, _ in self._list)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._list))

    def __len__(self) -> int:
        return len(self._list)

    def keys(self) -> list[str]:
        return [k for k, _ in self._list]

    def values(self) -> list[str]:
        return [v for _, v in self._list]

    def items(self) -> list[tuple[str, str]]:
        return list(self._list)

    def add(self, key: str, value: object) -> None:
        self._list.append((key, str(value)))

    add_header = add

    def remove(self, key: str) -> None:
        lower = key.lower()
        self._list = [(k, v) for k, v in self._list if k.lower() != lower]

    __delitem__ = remove

    def set(self, key: str, value: object) -> None:
        """Replace the first `key` in place and drop the others, or append it."""
        lower = key.lower()
        out: list[tuple[str, str]] = []
        done = False
        for k, v in self._list:
            if k.lower() != lower:
                out.append((k, v))
            elif not done:
                out.append((key, str(value)))
                done = True
        if not done:
            out.append((key, str(value)))
        self._list = out

    __setitem__ = set

    def to_wsgi_list(self) -> list[tuple[str, str]]:
        return list(self._list)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and other._list == self._list

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._list!r})"


class MultiDict:
    """Keys with one or more values: `d[k]`/`d.get(k)` give the first, `getlist(k)` all of them."""

    def __init__(self, items: Iterable[tuple[str, Any]] = ()) -> None:
        self._data: dict[str, list[Any]] = {}
        for k, v in items:
            self._data.setdefault(k, []).append(v)

    def __getitem__(self, key: str) -> Any:
        if key in self._data:
            return self._data[key][0]
        raise KeyError(key)

    def get(self, key: str, default: Any = None, type: Callable[[Any], Any] | None = None) -> Any:
        if key not in self._data:
            return default
        value = self._data[key][0]
        if type is None:
            return value
        try:
            return type(value)
        except ValueError:
            return default

    def getlist(self, key: str, type: Callable[[Any], Any] | None = None) -> list[Any]:
        values = list(self._data.get(key, []))
        return values if type is None else [type(v) for v in values]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list[str]:
        return list(self._data)

    def values(self) -> list[Any]:
        return [v[0] for v in self._data.values()]

    def items(self, multi: bool = False) -> list[tuple[str, Any]]:
        if multi:
            return [(k, v) for k, vs in self._data.items() for v in vs]
        return [(k, vs[0]) for k, vs in self._data.items()]

    def lists(self) -> list[tuple[str, list[Any]]]:
        return [(k, list(vs)) for k, vs in self._data.items()]

    def to_dict(self, flat: bool = True) -> dict[str, Any]:
        if flat:
            return {k: vs[0] for k, vs in self._data.items()}
        return {k: list(vs) for k, vs in self._data.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MultiDict) and other._data == self._data

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.items(multi=True)!r})"


class FileStorage:
    """One uploaded file of a multipart/form-data request (werkzeug's `FileStorage` surface)."""

    def __init__(
        self, data: bytes, *, name: str, filename: str | None, headers: Headers
    ) -> None:
        self.stream: IO[bytes] = io.BytesIO(data)
        self.name = name
        self.filename = filename
        self.headers = headers

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")

    @property
    def mimetype(self) -> str:
        return (self.content_type or "").split(";", 1)[0].strip().lower()

    @property
    def content_length(self) -> int:
        return len(self.stream.getbuffer()) if isinstance(self.stream, io.BytesIO) else 0

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def save(self, dst: str | PathLike[str] | IO[bytes], buffer_size: int = 16384) -> None:
        if isinstance(dst, (str, PathLike)):
            with open(dst, "wb") as out:
                shutil.copyfileobj(self.stream, out, buffer_size)
        else:
            shutil.copyfileobj(self.stream, dst, buffer_size)

    def __bool__(self) -> bool:
        return bool(self.filename)

    def __repr__(self) -> str:
        return f"<FileStorage: {self.filename!r} ({self.content_type!r})>"
