"""Engines that run their own decoding loop (CPU, test): one output queue per request.

The loop hands each step's outputs to `_deliver` on the event loop; `generate` reads the
request's queue until the output that carries a finish_reason.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import AsyncIterator

from common.protocol import FinishReason
from worker.engines.base import Engine, EngineOutput, EngineRequest


class QueuedEngine(Engine):
    def __init__(self) -> None:
        self._streams: dict[str, asyncio.Queue[EngineOutput]] = {}

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self._streams[request.request_id] = queue
        try:
            self._submit(request)
            while True:
                output = await queue.get()
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            del self._streams[request.request_id]
            self._forget(request.request_id)

    def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self._abort(request_id)

    def _deliver(self, outputs: list[EngineOutput]) -> None:
        """Called on the event loop with one decoding step's outputs for all requests."""
        for output in outputs:
            queue = self._streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _fail_all(self, error: str) -> None:
        self._deliver([
            EngineOutput(request_id, "", finish_reason=FinishReason.ERROR, error=error)
            for request_id in list(self._streams)
        ])

    @abstractmethod
    def _submit(self, request: EngineRequest) -> None: ...

    @abstractmethod
    def _abort(self, request_id: str) -> None: ...

    def _forget(self, request_id: str) -> None:
        """The consumer stopped listening (finished, aborted or gone): drop it if still decoding."""
        self._abort(request_id)
