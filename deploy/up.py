"""`mlfe up`'s friendly output: where to score, with which key, and a live status line."""

from __future__ import annotations

import asyncio
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.server import Router

STATUS_PERIOD_S = 1.0
# Without a terminal (logs, CI) a status line is printed this often, and only when it changed.
PLAIN_STATUS_PERIOD_S = 10.0


def print_welcome(router: Router) -> None:
    for name, svc in router.services.items():
        uri = router.scoring_uri(f"service/{name}")
        print(f"\nservice {name}\n  scoring URI: {uri}")
        headers = "-H 'Content-Type: application/json'"
        keys = router.keys.get(name) if svc.cfg.auth_enabled else None
        if keys is not None:
            print(f"  key:         {keys[0]}")
            headers += " -H " + shlex.quote(f"Authorization: Bearer {keys[0]}")
        sample = svc.cfg.sample_input or '{"data": [[5.1, 3.5, 1.4, 0.2]]}'
        print(f"  try:         curl -s {headers} -d {shlex.quote(sample)} {uri}")
    print("\nCtrl-C stops everything.\n", flush=True)


def status_line(router: Router, rates: dict[str, float]) -> str:
    parts = []
    for name, st in router.stats().items():
        desired = st.get("desired", st["replicas"])
        part = (f"{name}: {st['replicas']}/{desired} replicas, {st['busy']} in flight, "
                f"{st['queued']} queued, {rates.get(name, 0.0):.1f} req/s")
        if st.get("scaledToZero"):
            part += " (scaled to zero)"
        if st.get("startFailures"):
            retry = st.get("retryInSeconds")
            part += f", {st['startFailures']} failed starts" + (
                f", next try in {retry:.0f} s" if retry is not None else "")
        parts.append(part)
    return " | ".join(parts)


async def status_line_loop(router: Router) -> None:
    tty = sys.stdout.isatty()
    period = STATUS_PERIOD_S if tty else PLAIN_STATUS_PERIOD_S
    loop = asyncio.get_running_loop()
    last = {n: s.completed for n, s in router.services.items()}
    last_t = loop.time()
    shown = ""
    while True:
        await asyncio.sleep(period)
        now = loop.time()
        rates = {}
        for n, s in router.services.items():
            rates[n] = (s.completed - last.get(n, 0)) / max(now - last_t, 1e-9)
            last[n] = s.completed
        last_t = now
        line = status_line(router, rates)
        if tty:
            sys.stdout.write("\r\x1b[2K" + line)
            sys.stdout.flush()
        elif line != shown:
            print(line, flush=True)
        shown = line
