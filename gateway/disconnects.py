"""Noticing HTTP clients that leave while they wait.

aiohttp tells a handler that its client is gone only when it next writes (or, with handler
cancellation on, by cancelling every handler mid-call, Redis calls included). An SSE or a
non-streaming completion whose request is still queued writes nothing for a long time, so its
slot would be kept and its job run for nobody. One loop per gateway looks at the waiting
requests' connections a few times a second (a few attribute reads each) and calls their `on_gone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from common.errors import FleetError
from common.redis_conn import REDIS_UNAVAILABLE, describe
from common.supervision import Supervisor

log = logging.getLogger(__name__)

_CHECK_INTERVAL_S = 0.25


@dataclass(eq=False)  # one per waiting request, held in a set by identity
class _Watch:
    request: web.Request
    on_gone: Callable[[], Awaitable[object]]


class DisconnectWatcher:
    def __init__(self) -> None:
        self._watches: set[_Watch] = set()
        self._gone: set[asyncio.Task[None]] = set()

    def start(self, supervisor: Supervisor) -> None:
        supervisor.start("disconnects", self._loop)

    @contextlib.asynccontextmanager
    async def watching(self, request: web.Request, on_gone: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
        """Call `on_gone` once if the request's client disconnects inside the block. A client found gone
        at its end (a write failed before the loop looked) still gets it."""
        watch = _Watch(request, on_gone)
        self._watches.add(watch)
        try:
            yield
        finally:
            if watch in self._watches:
                self._watches.discard(watch)
                if _disconnected(request):
                    await self._call(watch)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(_CHECK_INTERVAL_S)
            for watch in [w for w in self._watches if _disconnected(w.request)]:
                self._watches.discard(watch)
                task = asyncio.create_task(self._call(watch))
                self._gone.add(task)
                task.add_done_callback(self._gone.discard)

    @staticmethod
    async def _call(watch: _Watch) -> None:
        try:
            await watch.on_gone()
        except (FleetError, *REDIS_UNAVAILABLE) as exc:
            message = describe(exc) if isinstance(exc, REDIS_UNAVAILABLE) else exc.message  # type: ignore[union-attr]
            log.warning("a client left, but its request could not be cancelled: %s", message)


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
