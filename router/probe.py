"""A replica liveness probe: `GET /` answered 2xx/3xx in time (Kubernetes httpGet semantics)."""

from __future__ import annotations

import asyncio


async def probe_http(host: str, port: int, timeout_s: float, path: str = "/") -> bool:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            status_line = await reader.readline()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        if writer is not None:
            writer.close()
    parts = status_line.split(b" ", 2)
    return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
