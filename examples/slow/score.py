"""A deliberately slow model: run() sleeps, and reports how many run() calls overlapped.

Sleep time: `{"ms": N}` in the request, else env SLOW_RUN_MS (default 50). As Azure ML's
entry scripts do, run() gets the request body as a str and parses it itself. The replica runs
WORKER_COUNT calls at once, so `max_in_flight` shows the concurrency the router let through.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

DEFAULT_MS = float(os.environ.get("SLOW_RUN_MS", "50"))

_lock = threading.Lock()
_in_flight = 0
_max_in_flight = 0
_started = 0  # run() calls begun so far: a request's `seq` is its place in that order


def init() -> None:
    """Nothing to load."""


def _parse(raw_data: str) -> Any:
    try:
        return json.loads(raw_data)
    except ValueError:
        return None


def run(raw_data: str) -> dict[str, Any]:
    global _in_flight, _max_in_flight, _started
    data = _parse(raw_data)
    ms = data.get("ms", DEFAULT_MS) if isinstance(data, dict) else DEFAULT_MS
    ms = float(ms)
    with _lock:
        seq = _started
        _started += 1
        _in_flight += 1
        in_flight = _in_flight
        _max_in_flight = max(_max_in_flight, _in_flight)
    try:
        time.sleep(ms / 1000)
    finally:
        with _lock:
            _in_flight -= 1
            max_in_flight = _max_in_flight  # read after sleeping: includes calls that overlapped us
    return {
        "slept_ms": ms,
        "in_flight": in_flight,
        "max_in_flight": max_in_flight,
        "pid": os.getpid(),
        "seq": seq,
        "tag": data.get("tag") if isinstance(data, dict) else None,
    }
