"""`mlfe keys|regen-key|token|services|stats|endpoint ...`: the admin API's client.

A thin httpx client over the router's admin API. Every command prints a short human-readable
answer, or the server's JSON with `--json`. A failure is `mlfe: ...` on stderr and exit status
1, never a traceback: the server's `message` (as it is; a config error may span lines) and the
HTTP status, or a one-line hint for an admin API that is not listening. The admin token is sent,
never printed.

The admin token comes from `--token`, else `MLFE_ADMIN_TOKEN`, else `<state-dir>/admin-token`
(the file `mlfe serve` writes when it generates one); the URL from `--admin-url`, else
`MLFE_ADMIN_URL`, else http://127.0.0.1:8081 (the default `router.admin_listen`).

httpx is imported only when a command runs, so building the `mlfe` parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    import httpx

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

ADMIN_URL_ENV = "MLFE_ADMIN_URL"
ADMIN_TOKEN_ENV = "MLFE_ADMIN_TOKEN"  # the same variable the router reads (router/admin.py)
ADMIN_TOKEN_FILE = "admin-token"
DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
DEFAULT_STATE_DIR = ".mlfe"
TIMEOUT_S = 30.0

Handler = Callable[["AdminClient", argparse.Namespace], int]


class AdminError(Exception):
    """A failure to report on stderr as `mlfe: <message>` (exit status 1)."""


# ---- the client -------------------------------------------------------------------------------


class AdminClient:
    """JSON over HTTP with the admin token; errors become `AdminError` with a clear message."""

    def __init__(self, base_url: str, token: str, timeout: float = TIMEOUT_S) -> None:
        import httpx

        self.base_url = base_url
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The answer's JSON object (None for an empty answer), or `AdminError`."""
        resp = self._send(method, path, body)
        if not resp.content:
            return None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):  # every admin API answer is a JSON object
            raise AdminError(
                f"{method} {path}: {self.base_url} answered {resp.status_code} with something "
                f"other than a JSON object (is it the admin API?): {_snippet(resp.text)}"
            )
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def text(self, path: str) -> str:
        """A GET whose answer is text (`/metrics`)."""
        return self._send("GET", path, None).text

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        import httpx

        try:
            resp = self._http.request(method, path, json=body)
        except httpx.ConnectError as e:
            raise AdminError(
                f"cannot reach the mlfe admin API at {self.base_url} ({_reason(e)}). "
                "Is `mlfe serve` (or `mlfe up`) running, and is this its router.admin_listen? "
                f"Set --admin-url or {ADMIN_URL_ENV}."
            ) from None
        except httpx.TimeoutException:
            raise AdminError(
                f"the mlfe admin API at {self.base_url} did not answer {method} {path} "
                f"within {self._http.timeout.read:g}s"
            ) from None
        except httpx.HTTPError as e:
            raise AdminError(
                f"{method} {self.base_url}{path} failed: {_reason(e)}"
            ) from None
        if resp.status_code >= 400:
            raise AdminError(_error_message(resp, self.base_url))
        return resp


def _reason(e: Exception) -> str:
    text = str(e).strip()
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    return text or type(e).__name__


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _error_message(resp: httpx.Response, base_url: str) -> str:
    message: str | None = None
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        message = data["message"]
    if message is None:  # not the admin API's {"message": ...} shape (e.g. an unknown route)
        if "html" in resp.headers.get("content-type", ""):
            message = f"{resp.reason_phrase} (an HTML page: is {base_url} the mlfe admin API?)"
        else:
            message = _snippet(resp.text) or resp.reason_phrase
    status = f"HTTP {resp.status_code}"
    if resp.status_code == 401:
        return (f"{message} ({status}): the admin token was refused; check --token, "
                f"{ADMIN_TOKEN_ENV} or <state-dir>/{ADMIN_TOKEN_FILE}")
    return f"{message} ({status})"


def resolve_admin_url(given: str | None) -> str:
    url = (given or os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL).strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url  # `127.0.0.1:8081`, as router.admin_listen is written
    return url


def default_state_dir() -> Path:
    """The state dir of a router started here: ./.mlfe (a config's default) when it holds an
    admin token, else the one of `mlfe up` with no config (deploy/bundled.py)."""
    from deploy.bundled import user_data_dir

    local = Path(DEFAULT_STATE_DIR)
    return local if (local / ADMIN_TOKEN_FILE).exists() else user_data_dir()


def resolve_token(given: str | None, state_dir: str | None) -> str:
    """--token, else MLFE_ADMIN_TOKEN, else <state-dir>/admin-token. Never echoed."""
    token = given or os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        path = (Path(state_dir) if state_dir else default_state_dir()) / ADMIN_TOKEN_FILE
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            raise AdminError(
                f"no admin token: pass --token, set {ADMIN_TOKEN_ENV}, or point --state-dir at "
                f"the router's state directory (no {path})"
            ) from None
        except OSError as e:
            raise AdminError(f"cannot read the admin token from {path}: {e.strerror}") from None
        if not token:
            raise AdminError(f"the admin token file {path} is empty")
    token = token.strip()
    if not token.isascii() or not token.isprintable():
        raise AdminError("the admin token has characters an HTTP header cannot carry")
    return token


# ---- the parser ---------------------------------------------------------------------------


def _common(json_output: bool = True) -> argparse.ArgumentParser:
    """Options every admin command takes (after the command: `mlfe keys blue --admin-url ...`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("admin API")
    g.add_argument(
        "--admin-url", metavar="URL",
        help=f"the admin API (default: ${ADMIN_URL_ENV}, else {DEFAULT_ADMIN_URL})",
    )
    g.add_argument(
        "--token", metavar="TOKEN",
        help=f"the admin token (default: ${ADMIN_TOKEN_ENV}, else <state-dir>/{ADMIN_TOKEN_FILE})",
    )
    g.add_argument(
        "--state-dir", metavar="DIR",
        help="the router's state directory, where it keeps a generated admin token "
             f"(default: {DEFAULT_STATE_DIR} if it holds one, else $XDG_DATA_HOME/mlfe or "
             "~/.local/share/mlfe: that of `mlfe up` with no config)",
    )
    if json_output:
        p.add_argument("--json", action="store_true", help="print the server's JSON answer")
    return p


def _version_options(p: argparse.ArgumentParser, service_required: bool = False) -> None:
    p.add_argument("name", metavar="NAME", help="the endpoint")
    p.add_argument("version", metavar="VERSION", help="the version")
    p.add_argument("--service", required=service_required,
                   help="the service this version routes to")
    p.add_argument("--traffic-percentile", type=float, metavar="P",
                   help="the share of the endpoint's traffic (0-100); the default version "
                        "takes whatever the others leave")
    p.add_argument("--default", dest="is_default",
                   action=argparse.BooleanOptionalAction,
                   help="make this the default version (unmarks the previous one)")
    p.add_argument("--control", dest="is_control_version",
                   action=argparse.BooleanOptionalAction,
                   help="make this the control version (unmarks the previous one)")


def add_admin_commands(sub: SubParsers) -> None:
    """Adds the admin client's commands to the `mlfe` parser."""
    common = _common()

    def command(parent: SubParsers, name: str, handler: Handler, text: str,
                json_output: bool = True, **kw: Any) -> argparse.ArgumentParser:
        parents = [common if json_output else _common(json_output=False)]
        p = parent.add_parser(name, help=text, description=text, parents=parents, **kw)
        p.set_defaults(admin_handler=handler)
        return p

    def owner_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", metavar="SERVICE", help="the service (or endpoint, with --endpoint)")
        p.add_argument("--endpoint", action="store_true",
                       help="NAME is an endpoint, not a service")

    owner_arg(command(sub, "keys", _keys, "print the primary and secondary keys of a service",
                      aliases=["get-keys"]))
    p = command(sub, "regen-key", _regen_key, "regenerate the primary or secondary key")
    owner_arg(p)
    p.add_argument("--key-type", required=True, choices=["Primary", "Secondary"],
                   type=_key_type, help="which key to regenerate")
    owner_arg(command(sub, "token", _token,
                      "get a bearer token for a service (token_auth_enabled)",
                      aliases=["get-access-token"]))
    p = command(sub, "services", _services, "list the services, or show one")
    p.add_argument("name", metavar="SERVICE", nargs="?", help="show this service only")
    command(sub, "stats", _stats, "live counts per service (what the autoscaler reads)")
    p = command(sub, "top", _top, "a live view per service, refreshed every second: rate, "
                "p50/p99 latency, queue, replicas, 503s (Ctrl-C stops)", json_output=False)
    p.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default: %(default)s)")
    p.add_argument("-n", "--iterations", type=int, default=0, metavar="N",
                   help="stop after N refreshes (default: run until Ctrl-C)")

    ep = sub.add_parser("endpoint", help="endpoints and their versions (traffic split)",
                        description="Endpoints and their versions (traffic split).")
    ep_sub = ep.add_subparsers(dest="endpoint_command", required=True, metavar="COMMAND")
    command(ep_sub, "list", _endpoint_list, "list the endpoints")
    p = command(ep_sub, "show", _endpoint_show, "show an endpoint and its versions")
    p.add_argument("name", metavar="NAME", help="the endpoint")
    _version_options(command(
        ep_sub, "set-version", _set_version,
        "create a version (needs --service) or change the given fields of an existing one",
    ))
    _version_options(command(
        ep_sub, "create-version", _create_version,
        "add a new version (refused if it exists)",
    ), service_required=True)
    _version_options(command(
        ep_sub, "update-version", _update_version,
        "change the given fields of an existing version",
    ))
    p = command(ep_sub, "delete-version", _delete_version, "remove a version from an endpoint",
                json_output=False)
    p.add_argument("name", metavar="NAME", help="the endpoint")
    p.add_argument("version", metavar="VERSION", help="the version")


def _key_type(value: str) -> str:
    """`primary` or `Primary`: azureml spells it capitalised, but either is obvious."""
    return value.capitalize()


def run_admin_command(args: argparse.Namespace) -> int:
    """Runs the command `add_admin_commands` parsed; 0, or 1 with one line on stderr."""
    handler: Handler = args.admin_handler
    try:
        token = resolve_token(args.token, args.state_dir)
        with AdminClient(resolve_admin_url(args.admin_url), token) as client:
            return handler(client, args)
    except AdminError as e:
        print(f"mlfe: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ---- the commands -----------------------------------------------------------------------------


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


def _owner_path(args: argparse.Namespace, *rest: str) -> str:
    return _path("v1", "endpoints" if args.endpoint else "services", args.name, *rest)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs) + 1
    for k, v in pairs:
        print(f"{k + ':':<{width}} {_cell(v)}")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}".rstrip("0").rstrip(".")  # 70.0 -> 70, 33.333 -> 33.33
    return str(v)


def _print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _print_keys(data: dict[str, Any]) -> None:
    _print_fields([("primaryKey", data.get("primaryKey")),
                   ("secondaryKey", data.get("secondaryKey"))])


def _keys(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.get(_owner_path(args, "keys"))
    if args.json:
        _print_json(data)
    else:
        _print_keys(data)
    return 0


def _regen_key(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.request("POST", _owner_path(args, "regen-key"), {"keyType": args.key_type})
    if args.json:
        _print_json(data)
    else:
        _print_keys(data)
    return 0


def _epoch(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        when = datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{int(value)} ({when})"
    return _cell(value)


def _token(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.request("POST", _owner_path(args, "token"))
    if args.json:
        _print_json(data)
        return 0
    _print_fields([
        ("accessToken", data.get("accessToken")),
        ("tokenType", data.get("tokenType")),
        ("refreshAfter", _epoch(data.get("refreshAfter"))),
        ("expiryOn", _epoch(data.get("expiryOn"))),
    ])
    return 0


def _in_rotation(svc: dict[str, Any]) -> str:
    replicas = svc.get("replicas") or []
    ready = sum(1 for r in replicas if r.get("inRotation"))
    return f"{ready}/{len(replicas)}"


def _services(client: AdminClient, args: argparse.Namespace) -> int:
    if args.name is not None:
        svc = client.get(_path("v1", "services", args.name))
        if args.json:
            _print_json(svc)
            return 0
        _print_fields([
            ("name", svc.get("name")),
            ("scoringUri", svc.get("scoringUri")),
            ("swaggerUri", svc.get("swaggerUri")),
            ("authEnabled", svc.get("authEnabled")),
            ("tokenAuthEnabled", svc.get("tokenAuthEnabled")),
            ("scoringTimeoutMs", svc.get("scoringTimeoutMs")),
            ("replicaMaxConcurrentRequests", svc.get("replicaMaxConcurrentRequests")),
            ("maxRequestWaitTime", svc.get("maxRequestWaitTime")),
            ("replicas in rotation", _in_rotation(svc)),
            ("description", svc.get("description")),
            *((f"tags.{k}", v) for k, v in sorted((svc.get("tags") or {}).items())),
            *((f"properties.{k}", v) for k, v in sorted((svc.get("properties") or {}).items())),
        ])
        replicas = svc.get("replicas") or []
        if replicas:
            print()
            _print_table(["REPLICA", "IN ROTATION", "IN FLIGHT"],
                         [[r.get("address"), r.get("inRotation"), r.get("inFlight")]
                          for r in replicas])
        return 0
    data = client.get("/v1/services")
    if args.json:
        _print_json(data)
        return 0
    services = data.get("services", [])
    if not services:
        print("no services")
        return 0
    _print_table(
        ["NAME", "REPLICAS", "AUTH", "SCORING URI"],
        [[s.get("name"), _in_rotation(s), _auth(s), s.get("scoringUri")] for s in services],
    )
    return 0


def _auth(owner: dict[str, Any]) -> str:
    if owner.get("tokenAuthEnabled"):
        return "token"
    return "key" if owner.get("authEnabled") else "none"


def _percent(v: Any) -> str:
    return "-" if not isinstance(v, int | float) else f"{100 * v:.0f}%"


def _stats(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.get("/v1/stats")
    if args.json:
        _print_json(data)
        return 0
    stats: dict[str, dict[str, Any]] = data.get("services", {})
    if not stats:
        print("no services")
        return 0
    _print_table(
        ["SERVICE", "REPLICAS", "BUSY", "QUEUED", "UTILIZATION", "COMPLETED", "DESIRED"],
        [[name, s.get("replicas"), s.get("busy"), s.get("queued"),
          _percent(s.get("utilization")), s.get("completed"), s.get("desired")]
         for name, s in stats.items()],
    )
    return 0


def _positive(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        v = 0.0
    if not 0 < v < 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 3600, got {value!r}")
    return v


def _top(client: AdminClient, args: argparse.Namespace) -> int:
    from deploy.top import run_top

    return run_top(client, interval=args.interval, iterations=args.iterations)


def _split(ep: dict[str, Any]) -> str:
    versions: dict[str, dict[str, Any]] = ep.get("versions", {})
    return " ".join(f"{v}={_cell(vc.get('effectiveTrafficPercentile'))}%"
                    for v, vc in versions.items())


def _endpoint_list(client: AdminClient, args: argparse.Namespace) -> int:
    data = client.get("/v1/endpoints")
    if args.json:
        _print_json(data)
        return 0
    endpoints = data.get("endpoints", [])
    if not endpoints:
        print("no endpoints")
        return 0
    _print_table(
        ["NAME", "DEFAULT", "TRAFFIC", "AUTH", "SCORING URI"],
        [[e.get("name"), e.get("defaultVersion"), _split(e), _auth(e), e.get("scoringUri")]
         for e in endpoints],
    )
    return 0


def _print_endpoint(ep: dict[str, Any]) -> None:
    _print_fields([
        ("name", ep.get("name")),
        ("scoringUri", ep.get("scoringUri")),
        ("auth", _auth(ep)),
        ("defaultVersion", ep.get("defaultVersion")),
    ])
    print()
    versions: dict[str, dict[str, Any]] = ep.get("versions", {})
    _print_table(
        ["VERSION", "SERVICE", "TRAFFIC", "EFFECTIVE", "DEFAULT", "CONTROL"],
        [[v, vc.get("service"), vc.get("trafficPercentile"),
          vc.get("effectiveTrafficPercentile"), vc.get("isDefault"), vc.get("isControlVersion")]
         for v, vc in versions.items()],
    )


def _endpoint_show(client: AdminClient, args: argparse.Namespace) -> int:
    ep = client.get(_path("v1", "endpoints", args.name))
    if args.json:
        _print_json(ep)
    else:
        _print_endpoint(ep)
    return 0


def _version_body(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "service": args.service,
        "trafficPercentile": args.traffic_percentile,
        "isDefault": args.is_default,
        "isControlVersion": args.is_control_version,
    }
    return {k: v for k, v in given.items() if v is not None}


def _change(client: AdminClient, args: argparse.Namespace, method: str) -> int:
    body = _version_body(args)
    if method == "PATCH" and not body:
        raise AdminError("nothing to change: give --service, --traffic-percentile, "
                         "--default/--no-default or --control/--no-control")
    ep = client.request(method, _path("v1", "endpoints", args.name, "versions", args.version),
                        body)
    if args.json:
        _print_json(ep)
    else:
        _print_endpoint(ep)
    return 0


def _version_exists(client: AdminClient, args: argparse.Namespace) -> bool:
    """Whether the endpoint has the version (an unknown endpoint is the server's 404)."""
    ep = client.get(_path("v1", "endpoints", args.name))
    return args.version in ep.get("versions", {})


def _set_version(client: AdminClient, args: argparse.Namespace) -> int:
    if _version_exists(client, args):
        return _change(client, args, "PATCH")
    if args.service is None:
        raise AdminError(f"endpoint {args.name} has no version {args.version}; "
                         "a new version needs --service")
    return _change(client, args, "PUT")


def _create_version(client: AdminClient, args: argparse.Namespace) -> int:
    if _version_exists(client, args):
        raise AdminError(f"version {args.version} of endpoint {args.name} already exists; "
                         "change it with `mlfe endpoint update-version`")
    return _change(client, args, "PUT")


def _update_version(client: AdminClient, args: argparse.Namespace) -> int:
    return _change(client, args, "PATCH")


def _delete_version(client: AdminClient, args: argparse.Namespace) -> int:
    client.request("DELETE", _path("v1", "endpoints", args.name, "versions", args.version))
    print(f"deleted version {args.version} of endpoint {args.name}")
    return 0
