"""How the scoring path hands bytes to a transport: one buffer per send.

uvloop sends a single buffer with one direct ``write(2)``, but several (``writelines``) through
libuv's queued write, with a write context allocated and completed on a later loop pass: about
a microsecond more per send, and there are two sends per request (the request to the replica,
the answer to the client). A head and a small body are cheaper to copy into one buffer than
that; a large body is not copied (above ``JOIN_LIMIT`` the buffers go out as they are).
"""

from __future__ import annotations

import asyncio

JOIN_LIMIT = 64 * 1024


def send(transport: asyncio.Transport, parts: list[bytes]) -> None:
    """Write `parts` (at least one) to `transport`, joined into one buffer when small."""
    if len(parts) == 1:
        transport.write(parts[0])
        return
    total = 0
    for part in parts:
        total += len(part)
    if total > JOIN_LIMIT:
        transport.writelines(parts)
    else:
        transport.write(b"".join(parts))
