"""`AMLResponse`: what an `@rawhttp` run() may return to answer with its own status and headers.

The same constructor as azmlinfsrv's (a flask Response there):
`AMLResponse(message, status_code, response_headers={}, json_str=False, run_function_failed=False)`.
`json_str=True` JSON-encodes `message`; otherwise a str or bytes `message` is the body as is
(content type `text/html; charset=utf-8` unless `response_headers` names one); `None` answers `{}`.
A header value with commas becomes one header per comma-separated part, as there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from mlfe_azureml.datastructures import Headers

_HTML = "text/html; charset=utf-8"
_JSON = "application/json"


def _body(message: Any) -> bytes:
    if isinstance(message, str):
        return message.encode("utf-8")
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message)
    if isinstance(message, Iterable):  # flask accepts an iterable of str/bytes chunks
        return b"".join(c.encode("utf-8") if isinstance(c, str) else bytes(c) for c in message)
    raise TypeError(f"AMLResponse body must be str or bytes, not {type(message).__name__}")


class AMLResponse:
    """A complete HTTP answer from run(): `status_code`, `headers`, and the body (`get_data()`)."""

    def __init__(
        self,
        message: Any,
        status_code: int,
        response_headers: Mapping[str, str] | None = None,
        json_str: bool = False,
        run_function_failed: bool = False,
    ) -> None:
        response_headers = response_headers or {}
        self.status_code = int(status_code)
        self.headers = Headers()
        if message is None:
            self._data = b"{}"
            self.headers.add("Content-Type", _JSON)
        elif json_str:
            self._data = json.dumps(message).encode("utf-8")
            self.headers.add("Content-Type", _JSON)
        else:
            self._data = _body(message)
            if "Content-Type" not in response_headers:
                self.headers.add("Content-Type", _HTML)
        self.headers["x-ms-run-function-failed"] = run_function_failed
        for header, value in response_headers.items():
            for part in str(value).split(","):
                self.headers.add(header, part.strip())

    @property
    def status(self) -> str:
        try:
            return f"{self.status_code} {HTTPStatus(self.status_code).phrase.upper()}"
        except ValueError:
            return f"{self.status_code} UNKNOWN"

    @property
    def content_type(self) -> str | None:
        return self.headers.get("Content-Type")

    @property
    def mimetype(self) -> str:
        return (self.content_type or "").split(";", 1)[0].strip().lower()

    def get_data(self, as_text: bool = False) -> Any:
        return self._data.decode("utf-8", "replace") if as_text else self._data

    def set_data(self, value: str | bytes) -> None:
        self._data = value.encode("utf-8") if isinstance(value, str) else bytes(value)

    @property
    def data(self) -> bytes:
        return self._data

    @data.setter
    def data(self, value: str | bytes) -> None:
        self.set_data(value)

    def __repr__(self) -> str:
        return f"<AMLResponse {len(self._data)} bytes [{self.status_code}]>"
