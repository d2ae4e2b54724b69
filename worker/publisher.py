"""Coalesces engine output and writes it to Redis: one pipeline per flush for every request.

Per-token work stays in memory; Redis sees one append per flush for each request with new output.
A flush starts as soon as the previous one is done: with little load, that is every engine step
(each token goes out as it is made); as load rises a flush takes longer and carries more tokens per
request. The cost of the last flush sets the coalescing, not a fixed delay. An optional
`flush_interval` spaces flushes further (a request's first output is never held back). A request opened
with its own `interval` (batch-class jobs: nobody watches them token by token) is written at most that
often, and when it ends: its per-token cost in Redis all but goes.

A flush that Redis cannot take (unreachable, or refusing: OOM, BUSY, READONLY) keeps the text and
retries with backoff, so a Redis blip loses nothing. A request whose own output cannot be stored (any
other error, for that request alone) is marked `broken` and aborted: the worker fails it with the
reason; the other requests' output goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from common.protocol import Chunk, TokenLogprob
from common.redis_conn import REDIS_REFUSALS, REDIS_UNAVAILABLE, describe
from common.request_store import RequestStore, ScriptCall
from worker.engines.base import EngineOutput

log = logging.getLogger(__name__)


@dataclass
class OpenRequest:
    last_seq: int
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, as the engine reported it
    first_output_at: float | None = None  # wall clock of this run's first output (TTFT, ITL metrics)
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # until the first chunk carries them
    final: EngineOutput | None = None
    # Resolved with the store's reply (1, 0, -1) by the flush that carries what is buffered now.
    waiter: asyncio.Future[int] | None = None
    taken: bool = False  # another worker owns the request now (this one's heartbeat expired)
    broken: str | None = None  # why this request's output cannot be stored; nothing more is written for it
    # Sent, but the reply was lost (Redis went away): it is re-sent exactly as it was, since it
    # may have been applied (the store ignores a seq it has), and newer output waits for it.
    unconfirmed: tuple[ScriptCall, Chunk] | None = None
    interval: float = 0.0  # written at most this often (s) until it ends; 0: every flush
    # Monotonic. A run's first output is due at once: it shows the run made progress (a job whose runs
    # keep dying before any output is given up on as poison, common/request_store.py).
    next_write_at: float = 0.0

    @property
    def buffered(self) -> bool:
        return bool(self.text or self.token_ids or self.prompt_logprobs) or self.final is not None


class ChunkPublisher:
    def __init__(
        self,
        redis: Redis,
        store: RequestStore,
        worker_id: str,
        *,
        flush_interval_s: float,
        request_ttl_s: int,
        result_ttl_s: int,
        on_lost: Callable[[str], None],
    ) -> None:
        self._redis = redis
        self._store = store
        self._worker_id = worker_id
        self._interval = flush_interval_s
        self._request_ttl = request_ttl_s
        self._result_ttl = result_ttl_s
        self._on_lost = on_lost  # the request is no longer ours (cancelled, reclaimed): abort it
        self._open: dict[str, OpenRequest] = {}
        # Requests with something to write: a flush looks at these only, not at every open one.
        self._dirty: dict[str, OpenRequest] = {}
        self._wakeup = asyncio.Event()
        self._urgent = False
        self.tokens_out = 0  # every output token this process generated, for the heartbeat

    def open(self, request_id: str, last_seq: int, prompt_tokens: int, completion_tokens: int = 0, *,
             interval_s: float = 0.0) -> OpenRequest:
        """Start publishing a request; a continuation passes the seq and token count it reached. With
        `interval_s`, its output is written at most that often until it ends."""
        state = self._open[request_id] = OpenRequest(last_seq=last_seq, prompt_tokens=prompt_tokens,
                                                     completion_tokens=completion_tokens, interval=interval_s)
        return state

    def completion_tokens(self, request_id: str) -> int:
        """Tokens the request has generated so far (a continuation's earlier runs included)."""
        state = self._open.get(request_id)
        return state.completion_tokens if state is not None else 0

    def add(self, output: EngineOutput) -> None:
        state = self._open.get(output.request_id)
        if state is None:
            return
        if output.request_id not in self._dirty:
            if state.first_output_at is None:
                state.first_output_at = time.time()
            if state.last_seq == 0 and not state.interval:
                self._urgent = True  # first output of a request: no coalescing delay
            self._dirty[output.request_id] = state
        if output.cached_tokens is not None:
            state.cached_tokens = output.cached_tokens
        state.text.append(output.text)
        state.token_ids.extend(output.token_ids)
        if output.logprobs is not None:
            if state.logprobs is None:
                state.logprobs = []
            state.logprobs.extend(output.logprobs)
        if output.prompt_logprobs is not None:
            state.prompt_logprobs = output.prompt_logprobs
        state.completion_tokens += len(output.token_ids)
        self.tokens_out += len(output.token_ids)
        self._wakeup.set()

    async def finish(self, output: EngineOutput) -> int:
        """Write the request's remaining output and final status; the store's reply: 1, or 0 (the
        request was already over) or -1 (another worker owns it)."""
        state = self._open[output.request_id]
        self.add(output)
        state.final = output
        return await self._flushed(output.request_id, state)

    async def settle(self, request_id: str) -> None:
        """Write what is buffered for the request now (before handing it back)."""
        state = self._open[request_id]
        if request_id in self._dirty or state.unconfirmed is not None:
            await self._flushed(request_id, state)

    def _flushed(self, request_id: str, state: OpenRequest) -> asyncio.Future[int]:
        self._dirty[request_id] = state
        if state.waiter is None:
            state.waiter = asyncio.get_running_loop().create_future()
        self._urgent = True
        self._wakeup.set()
        return state.waiter

    def close(self, request_id: str) -> OpenRequest | None:
        """Stop publishing; the request's final state (`taken`: another worker owns it now, do not ack
        its entry; `broken`: its output could not be stored)."""
        self._dirty.pop(request_id, None)
        return self._open.pop(request_id, None)

    async def run(self) -> None:
        last_flush = 0.0
        backoff = 0.05
        if self._dirty:
            self._wakeup.set()  # restarted after a crash: what was buffered is still to be written
        while True:
            await self._wakeup.wait()
            if self._interval and not self._urgent:
                await asyncio.sleep(max(0.0, last_flush + self._interval - time.monotonic()))
            self._wakeup.clear()
            self._urgent = False
            last_flush = time.monotonic()
            try:
                await self._flush()
                backoff = 0.05
            except REDIS_UNAVAILABLE as exc:
                log.warning("publishing chunks failed, will retry: %s", describe(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._wakeup.set()

    async def _flush(self) -> None:
        # Take each request's buffered output out before the first await: engine output that
        # arrives while the pipeline is in flight goes into the next flush.
        dirty, self._dirty = self._dirty, {}
        sent: list[tuple[str, OpenRequest]] = []
        now = time.monotonic()
        for request_id, state in dirty.items():
            if state.interval and state.waiter is None and state.unconfirmed is None and now < state.next_write_at:
                self._dirty[request_id] = state  # not due: a later flush writes it
                continue
            state.next_write_at = now + state.interval
            if state.taken or state.broken:  # nothing more is written for it; a finish learns so at once
                _resolve(state, -1)
                continue
            if state.unconfirmed is None:
                if not state.buffered:  # a settle() of what an earlier flush already wrote
                    _resolve(state, 1)
                    continue
                try:
                    state.unconfirmed = self._next_chunk(request_id, state)
                except Exception as exc:  # e.g. text the engine produced that cannot be encoded
                    self._break(request_id, state, exc)
                    continue
            sent.append((request_id, state))
        if not sent:
            return
        try:
            replies = await self._store.run_scripts([state.unconfirmed[0] for _, state in sent],  # type: ignore[index]
                                                    raise_on_error=False)
        except BaseException:
            for request_id, state in sent:
                self._dirty.setdefault(request_id, state)
            raise
        refused: BaseException | None = None
        for (request_id, state), reply in zip(sent, replies, strict=True):
            if isinstance(reply, REDIS_REFUSALS):  # not now: sent again as it is, after the backoff
                self._dirty.setdefault(request_id, state)
                refused = reply
                continue
            if isinstance(reply, Exception):
                self._break(request_id, state, reply)
                continue
            _, chunk = state.unconfirmed  # type: ignore[misc]
            state.unconfirmed = None
            state.last_seq = chunk.seq
            state.taken = reply == -1
            if state.buffered and not state.taken:
                self._dirty[request_id] = state  # more arrived meanwhile: its flush resolves the waiter
                self._wakeup.set()
            else:
                _resolve(state, reply)
            if reply != 1 and chunk.finish_reason is None:
                self._on_lost(request_id)
        if refused is not None:
            raise refused

    def _break(self, request_id: str, state: OpenRequest, exc: Exception) -> None:
        """This request's output cannot be stored: stop writing it and abort its generation; the worker
        fails the request with the reason (`close` tells it)."""
        log.error("output of this request cannot be stored: %s: %s", type(exc).__name__, exc,
                  extra={"request_id": request_id})
        state.broken = f"its output could not be stored ({type(exc).__name__}: {exc})"
        state.unconfirmed = None
        state.text, state.token_ids, state.final = [], [], None
        state.logprobs = state.prompt_logprobs = None
        _resolve(state, -1)
        self._on_lost(request_id)

    def _next_chunk(self, request_id: str, state: OpenRequest) -> tuple[ScriptCall, Chunk]:
        """Everything buffered for the request as its next chunk (the final one if it finished)."""
        chunk = Chunk(seq=state.last_seq + 1, text="".join(state.text), token_ids=state.token_ids,
                      logprobs=state.logprobs, prompt_logprobs=state.prompt_logprobs)
        state.text, state.token_ids = [], []
        state.logprobs = state.prompt_logprobs = None
        final, state.final = state.final, None
        if final is None:
            return self._store.append(request_id, self._worker_id, chunk, state.completion_tokens,
                                      self._request_ttl), chunk
        chunk.finish_reason = final.finish_reason
        chunk.error = final.error
        chunk.prompt_tokens = state.prompt_tokens
        chunk.completion_tokens = state.completion_tokens
        chunk.cached_tokens = state.cached_tokens
        return self._store.finish(request_id, self._worker_id, chunk, result_ttl_s=self._result_ttl), chunk


def _resolve(state: OpenRequest, reply: int) -> None:
    if state.waiter is not None and not state.waiter.done():
        state.waiter.set_result(reply)
