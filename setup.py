"""Optional: the scoring path compiled with mypyc (`MLFE_MYPYC=1`); pure Python otherwise.

Everything in pyproject.toml; this file only adds the compiled extensions when asked:

    MLFE_MYPYC=1 pip install --no-build-isolation .   # needs mypy and a C compiler
    make compile                                      # in place, for a checkout (.so beside .py)

Without MLFE_MYPYC (the default) nothing is compiled: the same modules run as Python, so an
install without a compiler works. The compiled modules are the same sources (mypy --strict).
"""

from __future__ import annotations

import os

from setuptools import setup

# The per-request path. Two of its modules stay Python: router/admission.py (mypyc cannot
# build its slotted dataclasses) and router/routing.py (its generic Route class fails to import
# compiled).
HOT_MODULES = [
    "router/http_server.py",
    "router/proxy.py",
    "router/upstream.py",
    "router/accesslog.py",
    "router/requestid.py",
    "router/metrics.py",
    "router/traffic.py",
    "router/errors.py",
    "router/auth.py",
    "router/writes.py",
]

ext_modules = []
if os.environ.get("MLFE_MYPYC") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(HOT_MODULES, opt_level="3")

setup(ext_modules=ext_modules)
