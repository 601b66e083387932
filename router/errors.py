"""Every error the router answers itself, in one place: status, JSON body, extra headers.

Upstream exception text never reaches a client: each failure kind maps to a fixed message here.
"""

from __future__ import annotations

from enum import Enum
from http import HTTPStatus

import orjson

# Reason phrases, precomputed so the hot path does no enum lookups.
STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d \r\n" % status
    return line


class UpstreamFailure(Enum):
    """How a replica failed a request (each maps to one status and metric label)."""

    REFUSED = "refused"  # could not connect
    CLOSED = "closed"  # closed or reset the connection before a complete response
    BAD_RESPONSE = "bad_response"  # malformed HTTP


class RouterError(Exception):
    """A request the router answers itself with `status` and `{"message": message}`."""

    def __init__(self, status: int, message: str, headers: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def json_message(message: str) -> bytes:
    return orjson.dumps({"message": message})


# ---- the catalogue ----------------------------------------------------------------------------

RETRY_AFTER = b"retry-after: 1\r\n"
WWW_AUTHENTICATE = b"www-authenticate: Bearer\r\n"


def bad_request(detail: str = "Bad request") -> RouterError:
    return RouterError(400, detail)


def unauthorized() -> RouterError:
    # No hint of which part failed: missing header, unknown key and bad token look the same.
    return RouterError(401, "Unauthorized", WWW_AUTHENTICATE)


def not_found(what: str) -> RouterError:
    return RouterError(404, f"{what} not found")


def method_not_allowed(allow: bytes) -> RouterError:
    return RouterError(405, "Method not allowed", b"allow: " + allow + b"\r\n")


def body_too_large(limit: int) -> RouterError:
    return RouterError(413, f"Request body is larger than the limit of {limit} bytes")


def headers_too_large() -> RouterError:
    return RouterError(431, "Request header fields too large")


def overloaded(service: str) -> RouterError:
    return RouterError(503, f"Too many requests for service {service} (overloaded)", RETRY_AFTER)


def no_replicas(service: str) -> RouterError:
    return RouterError(503, f"No ready replicas for service {service}", RETRY_AFTER)


def draining() -> RouterError:
    return RouterError(503, "Router is shutting down", RETRY_AFTER)


def replica_closed() -> RouterError:
    return RouterError(502, "Replica closed connection before replying")


def replica_bad_response() -> RouterError:
    return RouterError(502, "Replica sent an invalid response")


def replica_timeout(timeout_ms: int) -> RouterError:
    return RouterError(504, f"Replica did not reply within scoring_timeout_ms ({timeout_ms} ms)")


def for_upstream_failure(failure: UpstreamFailure) -> RouterError:
    if failure is UpstreamFailure.BAD_RESPONSE:
        return replica_bad_response()
    return replica_closed()  # refused, reset or closed: azureml's one message for all three
