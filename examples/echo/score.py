"""The no-op model: a constant, tiny answer, so benchmarks measure the serving path, not a model."""

from __future__ import annotations

_RESULT = {"result": [1]}


def init() -> None:
    """Nothing to load."""


def run(raw_data: str) -> dict[str, list[int]]:
    return _RESULT
