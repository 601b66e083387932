"""Load a user's entry script (azureml's `score.py`) and work out how run() wants its input.

As azmlinfsrv decides it: an undecorated `run(raw_data)` gets the request body as a str (GET: the
query parameters as a JSON str); a run() decorated with inference-schema's `@input_schema` gets
one keyword argument per parameter, taken from the JSON body (the decorator converts them to the
declared types); an `@rawhttp` run() gets the request itself. A parameter named `request_headers`
receives the request's headers as a dict. `init()` is optional here (azmlinfsrv requires one);
`run` and `init` may each be plain functions or `async def` (mlfe's own addition).
"""

from __future__ import annotations

import asyncio
import enum
import importlib.machinery
import importlib.util
import inspect
import itertools
import os
import re
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import mlfe_azureml
from mlfe_azureml import aml_request

_module_ids = itertools.count()

# azmlinfsrv's own request module, when installed and imported by a script: its @rawhttp sets
# its own flag, which counts as well.
AZMLINFSRV_REQUEST_MODULE = "azureml_inference_server_http.api.aml_request"
REQUEST_HEADERS = "request_headers"


class EntryScriptError(Exception):
    """The entry script is missing, failed to import, or its run() cannot be called."""


class InputMode(enum.Enum):
    """How run() gets its input (azmlinfsrv's JsonStringInput / ObjectInput / RawRequestInput)."""

    STRING = "string"
    SCHEMA = "schema"
    RAW = "raw"


def _is_async(fn: Callable[..., Any]) -> bool:
    # A callable object with `async def __call__` counts too.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method itself, not callable()
    )


@dataclass(frozen=True, slots=True)
class EntryScript:
    """A loaded entry script. `run` is the user's function; `call(params, headers)` invokes it."""

    path: Path
    module: ModuleType
    run: Callable[..., Any]
    is_async: bool
    mode: InputMode = InputMode.STRING
    # STRING/RAW: the one parameter that receives the input. SCHEMA: every parameter (name, and
    # its default or `inspect.Parameter.empty`), filled from the body's keys.
    input_param: str = "data"
    schema_params: tuple[tuple[str, Any], ...] = ()
    wants_headers: bool = False
    init_fn: Callable[[], Any] | None = None
    init_is_async: bool = False
    app_root: Path = field(default_factory=Path.cwd)

    def call(self, params: dict[str, Any], headers: Mapping[str, str] | None) -> Any:
        """run(**params), plus `request_headers=` when run() declares it."""
        if self.wants_headers:
            return self.run(**params, request_headers=dict(headers or {}))
        return self.run(**params)

    async def init(self, executor: Executor | None = None) -> None:
        """Run the user's `init()` once (no-op if absent).

        An async init runs on the current loop, so what it creates (sessions, clients) lives on
        the loop that will await `run`. A sync init runs on `executor`: give it the pool `run`
        uses, so with one worker init and run share a thread (some libraries are thread-bound).
        """
        if self.init_fn is None:
            return
        if self.init_is_async:
            await self.init_fn()
        else:
            await asyncio.get_running_loop().run_in_executor(executor, self.init_fn)

    def swagger(self) -> Any | None:
        """The module's own `swagger` dict (mlfe's addition; looked up now: init() may set it)."""
        doc = getattr(self.module, "swagger", None)
        return doc if isinstance(doc, dict) else None


def _module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    return f"mlfe_entry_{next(_module_ids)}_{stem}"


def _reset_rawhttp_flags() -> None:
    aml_request._rawHttpRequested = False
    theirs = sys.modules.get(AZMLINFSRV_REQUEST_MODULE)
    if theirs is not None:
        setattr(theirs, "_rawHttpRequested", False)  # noqa: B010 - a module mypy cannot see


def _rawhttp_requested() -> bool:
    theirs = sys.modules.get(AZMLINFSRV_REQUEST_MODULE)
    return aml_request._rawHttpRequested or bool(getattr(theirs, "_rawHttpRequested", False))


def _import(path: Path) -> ModuleType:
    # SourceFileLoader accepts any file name (spec_from_file_location refuses names without .py).
    name = _module_name(path)
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before executing so the script's own dataclasses, pickling etc. can find it.
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException as exc:  # azmlinfsrv: a script that exits while importing fails too
        del sys.modules[name]
        raise EntryScriptError(f"Importing entry script {path} failed: {exc!r}") from exc
    return module


def is_schema_decorated(run: Callable[..., Any]) -> bool:
    """Whether inference-schema's decorators wrap `run` (False when it is not even imported)."""
    schema_util = sys.modules.get("inference_schema.schema_util")
    if schema_util is None:
        return False
    return bool(schema_util.is_schema_decorated(run))


@dataclass(frozen=True, slots=True)
class _Calling:
    mode: InputMode
    input_param: str
    schema_params: tuple[tuple[str, Any], ...]
    wants_headers: bool


def analyse_run(run: Callable[..., Any], *, rawhttp: bool) -> _Calling:
    """azmlinfsrv's checks of run()'s signature, and the input mode they lead to."""
    try:
        params = list(inspect.signature(run).parameters.values())
    except (TypeError, ValueError) as exc:
        raise EntryScriptError(f"Cannot inspect run(): {exc}") from exc
    allowed = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in allowed for p in params):
        raise EntryScriptError("run() cannot accept positional-only arguments, *args, or **kwargs.")
    wants_headers = any(p.name == REQUEST_HEADERS for p in params)
    params = [p for p in params if p.name != REQUEST_HEADERS]
    if not params:
        if wants_headers:
            raise EntryScriptError(
                'run() needs to accept an argument other than "request_headers".'
            )
        raise EntryScriptError("run() needs to accept an argument for input data.")
    schema = is_schema_decorated(run)
    if rawhttp and schema:
        raise EntryScriptError("run() cannot be decorated with both @rawhttp and @input_schema")
    if rawhttp:
        mode = InputMode.RAW
    elif schema:
        mode = InputMode.SCHEMA
    else:
        mode = InputMode.STRING
    return _Calling(
        mode=mode,
        input_param=params[0].name,
        schema_params=tuple((p.name, p.default) for p in params),
        wants_headers=wants_headers,
    )


def app_root(script: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Where user swagger files are looked up: AML_APP_ROOT, else the script's folder."""
    root = environ.get("AML_APP_ROOT", "").strip()
    return Path(root).resolve() if root else script.parent


def resolve_entry_script(
    entry_script: str | None, environ: Mapping[str, str] = os.environ
) -> Path:
    """`--entry-script`, else azmlinfsrv's AZUREML_ENTRY_SCRIPT (relative to AML_APP_ROOT)."""
    raw = entry_script or environ.get("AZUREML_ENTRY_SCRIPT", "").strip()
    if not raw:
        raise EntryScriptError("No entry script: pass --entry-script or set AZUREML_ENTRY_SCRIPT")
    path = Path(raw)
    if entry_script is None and not path.is_absolute():
        path = Path(environ.get("AML_APP_ROOT", "").strip() or ".") / path
    return path


def load_entry_script(path: str | os.PathLike[str]) -> EntryScript:
    """Import the script at `path` under a unique module name, its directory first on sys.path."""
    file = Path(path).resolve()
    if not file.is_file():
        raise EntryScriptError(f"Entry script not found: {file}")
    # So the script can import modules that sit next to it, as under azureml.
    directory = str(file.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    # `from azureml.contrib.services.aml_request import rawhttp` works as under azmlinfsrv.
    mlfe_azureml.install()
    _reset_rawhttp_flags()
    module = _import(file)

    run = getattr(module, "run", None)
    if not callable(run):
        raise EntryScriptError(f"Entry script {file} does not define a run(data) function")
    init = getattr(module, "init", None)
    if init is not None and not callable(init):
        raise EntryScriptError(f"Entry script {file}: init is not a function")
    calling = analyse_run(run, rawhttp=_rawhttp_requested())
    return EntryScript(
        path=file,
        module=module,
        run=run,
        is_async=_is_async(run),
        mode=calling.mode,
        input_param=calling.input_param,
        schema_params=calling.schema_params,
        wants_headers=calling.wants_headers,
        init_fn=init,
        init_is_async=init is not None and _is_async(init),
        app_root=app_root(file),
    )
