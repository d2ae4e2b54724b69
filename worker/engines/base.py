"""What every engine offers the worker: per-request output streams, abort, real capacity."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from common.protocol import FinishReason, ModelCard, SamplingParams, TokenizerBundle

ProgressCallback = Callable[[float], None]


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class EngineOutput:
    """New text since the previous output of the same request; finish_reason on the last one."""

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class Engine(ABC):
    card: ModelCard
    tokenizer: TokenizerBundle
    kv_capacity_tokens: int  # the most prompt+output tokens the engine holds at once
    max_num_seqs: int  # the most sequences it decodes at once

    def __init__(self) -> None:
        self._streams: dict[str, asyncio.Queue[EngineOutput]] = {}

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Yield outputs until one carries a finish_reason (also after abort)."""
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
        """Stop generating; the stream ends with finish_reason=cancelled and its KV is freed."""
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

    @property
    def running(self) -> int:
        return len(self._streams)

    @abstractmethod
    def _submit(self, request: EngineRequest) -> None: ...

    @abstractmethod
    def _abort(self, request_id: str) -> None: ...

    def _forget(self, request_id: str) -> None:
        """The consumer stopped listening (finished, aborted or gone): drop it if still decoding."""
        self._abort(request_id)

    @abstractmethod
    async def close(self) -> None: ...
