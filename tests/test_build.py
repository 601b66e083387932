"""Which build of the scoring path the tests run against: pure Python (`make test`'s first
run), or mypyc-compiled (`make test-compiled`, MLFE_EXPECT_COMPILED=1), so that each run really
tests the build it claims to."""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def hot_modules() -> list[str]:
    """setup.py's HOT_MODULES (read, not imported: importing setup.py would run setup())."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "HOT_MODULES":
            paths: list[str] = ast.literal_eval(node.value)
            return [p.removesuffix(".py").replace("/", ".") for p in paths]
    raise AssertionError("setup.py has no HOT_MODULES")


def test_the_scoring_path_runs_the_build_it_claims() -> None:
    compiled = os.environ.get("MLFE_EXPECT_COMPILED") == "1"
    modules = hot_modules()
    assert "router.proxy" in modules and "router.http_server" in modules
    for name in modules:
        path = importlib.import_module(name).__file__ or ""
        assert path.endswith(".so") == compiled, (name, path)
