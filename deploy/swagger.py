"""The replica's `GET /swagger.json[?version=2|3|3.1]`, built as azmlinfsrv builds it.

Per version, a user file in the app root wins (`swagger.json` or `swagger2.json` for 2,
`swagger3.json` for 3, `swagger3.1.json` for 3.1); else the document is generated from
azmlinfsrv's templates (deploy/swagger_templates), with inference-schema's input and output
schemas of a decorated run() (an undecorated run() gets empty object schemas). A version the
run()'s schema types cannot express is left out. mlfe's own addition: a module-level `swagger`
dict in the entry script is served as version 2.

`SERVICE_NAME`, `SERVICE_VERSION` and `SERVICE_PATH_PREFIX` fill the templates, as there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "swagger_templates"
# inference-schema's ALL_SUPPORTED_VERSIONS: what an undecorated run() supports.
ALL_SUPPORTED_VERSIONS = ("2.0", "3.0", "3.1")


class SwaggerNotFound(Exception):
    """The asked version is unknown, or has no document for this script (a 404)."""


@dataclass(frozen=True, slots=True)
class _Version:
    version: str
    aliases: frozenset[str]
    template: str
    user_files: tuple[str, ...]
    openapi: str | None = None  # overrides the template's "openapi" field

    def put_schemas(self, spec: dict[str, Any], schemas: tuple[Any, Any]) -> None:
        target = spec["definitions"] if self.version == "2" else spec["components"]["schemas"]
        target["ServiceInput"], target["ServiceOutput"] = schemas
        if self.openapi is not None:
            spec["openapi"] = self.openapi


VERSIONS = (
    _Version("2", frozenset({"2", "2.0"}), "swagger2_template.json",
             ("swagger.json", "swagger2.json")),
    _Version("3", frozenset({"3", "3.0"}), "swagger3_template.json", ("swagger3.json",)),
    _Version("3.1", frozenset({"3.1"}), "swagger3_template.json", ("swagger3.1.json",),
             openapi="3.1.0"),
)
_VALID = frozenset().union(*(v.aliases for v in VERSIONS))


def _schema_util() -> Any:
    return sys.modules.get("inference_schema.schema_util")


def _run_schemas(run: Callable[..., Any]) -> tuple[list[str], tuple[Any, Any]]:
    """(supported versions, (input schema, output schema)) of run()."""
    util = _schema_util()
    if util is None or not util.is_schema_decorated(run):
        empty = {"type": "object", "example": {}}
        supported = list(util.get_supported_versions(run)) if util else list(ALL_SUPPORTED_VERSIONS)
        return supported, (empty, dict(empty))
    return (
        list(util.get_supported_versions(run)),
        (util.get_input_schema(run), util.get_output_schema(run)),
    )


def _read_user_file(path: Path) -> Any | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    logger.info("Loaded user's swagger file from %s", path)
    return data


def _template(name: str, environ: Mapping[str, str]) -> dict[str, Any]:
    prefix = environ.get("SERVICE_PATH_PREFIX", "")
    text = (
        (TEMPLATES / name).read_text(encoding="utf-8")
        .replace("$SERVICE_NAME$", environ.get("SERVICE_NAME", "ML service"))
        .replace("$SERVICE_VERSION$", environ.get("SERVICE_VERSION", "1.0"))
        .replace("$PATH_PREFIX$", f"/{prefix.strip('/')}" if prefix else "")
    )
    spec: dict[str, Any] = json.loads(text)
    return spec


class Swagger:
    """The documents of one entry script, by version alias; built once, after init()."""

    def __init__(
        self,
        run: Callable[..., Any],
        app_root: Path,
        module_swagger: Any = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._docs: dict[str, Any] = {}
        self.supported_versions: list[str] = []
        supported, schemas = _run_schemas(run)
        for version in VERSIONS:
            doc: Any = module_swagger if version.version == "2" else None
            for name in version.user_files:
                if doc:
                    break
                doc = _read_user_file(app_root / name)
            if not doc and any(alias in supported for alias in version.aliases):
                doc = _template(version.template, environ)
                version.put_schemas(doc, schemas)
            if doc:
                for alias in version.aliases:
                    self._docs[alias] = doc
                self.supported_versions.append(version.version)
        self.supported_versions.sort()

    def get(self, version: str | None) -> Any:
        """The document for `?version=` (default 2); SwaggerNotFound with azmlinfsrv's message."""
        version = "2" if version is None else version
        listed = ", ".join(self.supported_versions)
        if version not in _VALID:
            raise SwaggerNotFound(
                f"Swagger version [{version}] is not valid. Supported versions: [{listed}]."
            )
        doc = self._docs.get(version)
        if not doc:
            raise SwaggerNotFound(
                f"Swagger version [{version}] is not supported for the scoring script. "
                f"Supported swagger versions: [{listed}]."
            )
        return doc
