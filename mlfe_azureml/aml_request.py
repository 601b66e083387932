"""`rawhttp` and `AMLRequest`: the raw-HTTP side of Azure ML's entry-script API.

    from azureml.contrib.services.aml_request import AMLRequest, rawhttp
    from azureml.contrib.services.aml_response import AMLResponse

    @rawhttp
    def run(request):
        if request.method == "POST":
            return AMLResponse(request.get_data(), 200, {"Content-Type": "image/png"})
        return AMLResponse("use POST", 405)

As in azmlinfsrv, `@rawhttp` sets a module-wide flag: applying it anywhere in the entry script
makes the server call run() with the request. `AMLRequest` carries the surface scripts use of
flask's request: `method`, `headers`, `args`, `get_data()`, `data`, `get_json()`/`json`, `form`,
`files`, `path`, `full_path`, `url`, `query_string`, `content_type`, `mimetype`, `is_json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from email.message import Message
from email.parser import BytesHeaderParser
from functools import cached_property
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from mlfe_azureml.datastructures import FileStorage, Headers, MultiDict

F = TypeVar("F", bound=Callable[..., Any])

# Read (and reset before each import of an entry script) by the server. The camelCase name is
# azmlinfsrv's: scripts and tools that look at it keep working.
_rawHttpRequested = False


def rawhttp(func: F) -> F:
    """Applied to run(): the server calls it with the `AMLRequest` instead of the body."""
    global _rawHttpRequested
    _rawHttpRequested = True
    return func


class RequestError(ValueError):
    """A request body the script asked for cannot be read as asked (a 400/415 under flask)."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class AMLRequest:
    """One HTTP request to /score, as an `@rawhttp` run() sees it (flask's request surface)."""

    def __init__(
        self,
        *,
        method: str = "GET",
        path: str = "/score",
        query_string: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        scheme: str = "http",
        host: str = "localhost",
        remote_addr: str | None = None,
    ) -> None:
        self.method = method.upper()
        self.path = path
        self.query_string = query_string
        self.headers = Headers(headers)
        self.scheme = scheme
        self.host = host
        self.remote_addr = remote_addr
        self._body = body
        self._data_cached = False  # werkzeug: get_data() caches; parsing a form consumes
        self._consumed_by_form = False
        self._form: MultiDict | None = None
        self._files: MultiDict | None = None

    def __repr__(self) -> str:
        return f"<AMLRequest '{self.url}' [{self.method}]>"

    # -- the URL ---------------------------------------------------------------------------

    @property
    def full_path(self) -> str:
        # Like werkzeug, always with the "?" (an empty query gives "/score?").
        return f"{self.path}?{self.query_string.decode('latin-1')}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    @property
    def url(self) -> str:
        query = self.query_string.decode("latin-1")
        return f"{self.base_url}?{query}" if query else self.base_url

    @property
    def host_url(self) -> str:
        return f"{self.scheme}://{self.host}/"

    @cached_property
    def args(self) -> MultiDict:
        return MultiDict(parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True))

    # -- the body --------------------------------------------------------------------------

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")

    @property
    def mimetype(self) -> str:
        return (self.content_type or "").split(";", 1)[0].strip().lower()

    @property
    def mimetype_params(self) -> dict[str, str]:
        message = Message()
        message["Content-Type"] = self.content_type or ""
        params = message.get_params() or []
        return {k.lower(): v for k, v in params[1:]}

    @property
    def content_length(self) -> int | None:
        return self.headers.get("Content-Length", None, int)

    @property
    def is_json(self) -> bool:
        mt = self.mimetype
        return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))

    def get_data(
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> Any:
        """The body; b"" once a form parse consumed it first (werkzeug's order rules)."""
        if parse_form_data:
            self._load_form()
        if self._consumed_by_form and not self._data_cached:
            body = b""
        else:
            body = self._body
            self._data_cached = self._data_cached or cache
        return body.decode("utf-8", "replace") if as_text else body

    @property
    def data(self) -> bytes:
        data: bytes = self.get_data(parse_form_data=True)
        return data

    @property
    def stream(self) -> Any:
        import io

        return io.BytesIO(self._body)

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        if not (force or self.is_json):
            if silent:
                return None
            raise RequestError(415, "Did not attempt to load JSON data because the request"
                               " Content-Type was not 'application/json'.")
        try:
            return json.loads(self.get_data(cache=cache))
        except ValueError:
            if silent:
                return None
            raise RequestError(400, "Failed to decode JSON object") from None

    @property
    def json(self) -> Any:
        return self.get_json()

    @property
    def form(self) -> MultiDict:
        self._load_form()
        assert self._form is not None
        return self._form

    @property
    def files(self) -> MultiDict:
        self._load_form()
        assert self._files is not None
        return self._files

    @property
    def values(self) -> MultiDict:
        return MultiDict([*self.args.items(multi=True), *self.form.items(multi=True)])

    def _load_form(self) -> None:
        if self._form is not None:
            return
        mimetype = self.mimetype
        body = b"" if self._consumed_by_form and not self._data_cached else self._body
        form: list[tuple[str, str]] = []
        files: list[tuple[str, FileStorage]] = []
        if mimetype == "application/x-www-form-urlencoded":
            form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        elif mimetype == "multipart/form-data":
            boundary = self.mimetype_params.get("boundary", "")
            if boundary:
                form, files = _parse_multipart(body, boundary.encode("latin-1"))
        if mimetype in _FORM_TYPES and not self._data_cached:
            self._consumed_by_form = True
        self._form = MultiDict(form)
        self._files = MultiDict(files)


def _parse_multipart(
    body: bytes, boundary: bytes
) -> tuple[list[tuple[str, str]], list[tuple[str, FileStorage]]]:
    """Split a multipart/form-data body into its fields and files (binary-safe)."""
    form: list[tuple[str, str]] = []
    files: list[tuple[str, FileStorage]] = []
    delimiter = b"--" + boundary
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        content = content.removesuffix(b"\r\n")
        parsed = BytesHeaderParser().parsebytes(head.lstrip(b"\r\n") + b"\r\n\r\n")
        headers = Headers((k, str(v)) for k, v in parsed.items())
        name = parsed.get_param("name", header="content-disposition")
        filename = parsed.get_filename()
        if not isinstance(name, str):
            continue
        if filename is not None:
            files.append((name, FileStorage(content, name=name, filename=filename,
                                            headers=headers)))
        else:
            charset = parsed.get_content_charset() or "utf-8"
            form.append((name, content.decode(charset, "replace")))
    return form, files
