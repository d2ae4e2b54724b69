"""The event loop every process runs on: uvloop where it is installed (a faster loop for
many sockets: WebSockets, SSE, pub/sub), else asyncio's own."""

from __future__ import annotations

import asyncio

try:
    import uvloop
except ImportError:  # e.g. Windows; asyncio's loop works the same, only slower
    uvloop = None


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
