"""The no-op model: a constant, tiny answer, so benchmarks measure the serving path, not a model."""

from __future__ import annotations

from typing import Any

_RESULT = {"result": [1]}


def init() -> None:
    """Nothing to load."""


def run(data: Any) -> dict[str, list[int]]:
    return _RESULT
