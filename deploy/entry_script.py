"""Load a user's entry script (azureml's `score.py`): optional `init()`, required `run(data)`.

`run` and `init` may each be plain functions or `async def`. An optional swagger document comes from
a module-level `swagger` dict or a `swagger.json` file next to the script.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import inspect
import itertools
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

_module_ids = itertools.count()


class EntryScriptError(Exception):
    """The entry script is missing, failed to import, or does not define `run(data)`."""


def _is_async(fn: Callable[..., Any]) -> bool:
    # A callable object with `async def __call__` counts too.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method itself, not callable()
    )


@dataclass(frozen=True, slots=True)
class EntryScript:
    """A loaded entry script. `run` is the user's function, called as `run(data)`."""

    path: Path
    module: ModuleType
    run: Callable[[Any], Any]
    is_async: bool
    init_fn: Callable[[], Any] | None = None
    init_is_async: bool = False
    swagger_file: Any = None  # parsed swagger.json next to the script, if any

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
        """The module's `swagger` dict (looked up now: init() may set it), else swagger.json's."""
        doc = getattr(self.module, "swagger", None)
        return doc if isinstance(doc, dict) else self.swagger_file


def _module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    return f"mlfe_entry_{next(_module_ids)}_{stem}"


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
    except Exception as exc:
        del sys.modules[name]
        raise EntryScriptError(f"Importing entry script {path} failed: {exc!r}") from exc
    return module


def _read_swagger(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise EntryScriptError(f"Cannot read {path}: {exc}") from exc


def load_entry_script(path: str | os.PathLike[str]) -> EntryScript:
    """Import the script at `path` under a unique module name, its directory first on sys.path."""
    file = Path(path).resolve()
    if not file.is_file():
        raise EntryScriptError(f"Entry script not found: {file}")
    # So the script can import modules that sit next to it, as under azureml.
    directory = str(file.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module = _import(file)

    run = getattr(module, "run", None)
    if not callable(run):
        raise EntryScriptError(f"Entry script {file} does not define a run(data) function")
    init = getattr(module, "init", None)
    if init is not None and not callable(init):
        raise EntryScriptError(f"Entry script {file}: init is not a function")
    swagger_path = file.parent / "swagger.json"
    return EntryScript(
        path=file,
        module=module,
        run=run,
        is_async=_is_async(run),
        init_fn=init,
        init_is_async=init is not None and _is_async(init),
        swagger_file=_read_swagger(swagger_path) if swagger_path.is_file() else None,
    )
