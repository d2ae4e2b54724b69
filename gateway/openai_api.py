"""OpenAI-compatible front end: /v1/completions and /v1/chat/completions over the same queue.

Every request is admitted, enqueued, pollable (GET /v1/requests/{id}, the id is in
X-Request-Id) and cancellable exactly like a native one. Parameters that would change the output
and that we do not implement are refused with a 400 naming them, never silently ignored. A client
that goes away (while its request is queued or running) cancels it; an error after an SSE stream
started ends the stream with an error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from common.errors import BadRequest, FleetError, Unavailable
from common.protocol import Chunk, FinishReason, Job
from common.redis_conn import REDIS_UNAVAILABLE, describe
from common.request_store import Idempotency
from gateway.api_responses import (
    ChatCompletion,
    ChatLogprobs,
    ChatTopLogprob,
    Completion,
    CompletionLogprobs,
    Usage,
)
from gateway.api_types import MAX_SEED, ChatBody, CompletionBody, StreamOptions, parse, parse_json_object
from gateway.auth import CALLER_KEY, Caller
from gateway.context import REQUEST_ID_KEY, Gateway
from gateway.idempotency import idempotency_of
from gateway.relay import Subscription
from gateway.tool_calls import ToolCallShape
from gateway.views import finite, usage_of

log = logging.getLogger(__name__)


def parse_openai_body(body: dict[str, Any], *, chat: bool) -> ChatBody | CompletionBody:
    """The body checked: 400 for a parameter the route does not take, 422 for a bad value."""
    return parse(ChatBody if chat else CompletionBody, body, unknown=BadRequest)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _serve(request: web.Request, *, chat: bool) -> web.StreamResponse:
    gateway = Gateway.of(request)
    body = parse_json_object(await request.read())
    parsed = parse_openai_body(body, chat=chat)
    generate = parsed.request()
    job = await gateway.submitter.prepare(generate, request_id=request[REQUEST_ID_KEY])
    card = await gateway.registry.resolve(job.model)
    tool_mode = parsed.tool_mode(card.tool_call_parser) if isinstance(parsed, ChatBody) else None
    caller = request.get(CALLER_KEY)
    subscriptions = await _submit_choices(gateway, job, parsed.n, caller, idempotency_of(request, body))
    request_id = request[REQUEST_ID_KEY] = subscriptions[0].request_id  # a replay's: the earlier request's
    # A client that leaves while its request waits (queued, or between chunks) cancels it; the cancel's
    # final chunk then ends the loops below.
    try:
        async with gateway.disconnects.watching(request, lambda: _cancel(gateway, subscriptions, caller)):
            shape = CompletionShape(chat, request_id, job.model, len(job.prompt_token_ids))
            if tool_mode is not None:
                shape.tools = ToolCallShape(request_id, tool_mode, card.tool_call_parser)
            echo = isinstance(parsed, CompletionBody) and parsed.echo
            if job.params.logprobs is not None or echo:
                encoder = await gateway.registry.encoder(card)
                shape.token_text = encoder.token_text
                shape.top_logprobs = job.params.logprobs or 0
                if echo:
                    shape.echo = generate.prompt or await encoder.decode(job.prompt_token_ids)
                    shape.prompt_ids = job.prompt_token_ids
            if parsed.stream:
                return await _stream(request, subscriptions, shape, parsed.usage_wanted())
            return await _complete(request, subscriptions, shape)
    finally:
        for subscription in subscriptions:
            subscription.close()


async def _submit_choices(gateway: Gateway, job: Job, n: int, caller: Caller | None,
                          idempotency: Idempotency | None) -> list[Subscription]:
    """`n` choices are `n` jobs: choice i > 0 is request `{id}-{i}` (pollable as such), seeded `seed + i` when
    a seed is given. Each gets every guarantee of a request; if one is refused (429), those queued go."""
    subscriptions: list[Subscription] = []
    try:
        for index in range(n):
            choice, key = job, idempotency
            if index:
                seed = job.sampling.get("seed")
                choice = dataclasses.replace(job, request_id=f"{job.request_id}-{index}", sampling={
                    **job.sampling, "seed": None if seed is None else (seed + index) % (MAX_SEED + 1)})
                if idempotency is not None:
                    key = dataclasses.replace(idempotency, key=f"{idempotency.key}-{index}")
            subscriptions.append(await gateway.submit_streaming(choice, caller, key))
    except BaseException:
        with contextlib.suppress(FleetError, *REDIS_UNAVAILABLE):
            await _cancel(gateway, subscriptions, caller)
        for subscription in subscriptions:
            subscription.close()
        raise
    return subscriptions


async def _cancel(gateway: Gateway, subscriptions: list[Subscription], caller: Caller | None) -> None:
    await asyncio.gather(*(gateway.cancel(s.request_id, caller) for s in subscriptions))


class CompletionShape:
    """OpenAI's response objects for one request. With logprobs asked, `token_text` names the tokens; with
    completions' `echo`, the prompt's text comes first (and its logprobs, if asked)."""

    def __init__(self, chat: bool, request_id: str, model: str, prompt_tokens: int) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.token_text: Callable[[int], str] | None = None
        self.echo: str | None = None
        self.top_logprobs = 0  # asked for, of each token (chat lists that many; completions the token too)
        self.prompt_ids: list[int] = []  # with echo: the prompt's tokens, named with its logprobs
        self._text_offsets: dict[int, int] = {}  # choice -> its next token's offset in its text (completions)
        self.tools: ToolCallShape | None = None  # when the answer may be tool calls (ChatBody.tool_mode)

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk_base(self) -> dict[str, Any]:
        return self._base("chat.completion.chunk" if self.chat else "text_completion")

    def final(self, choices: list[list[Chunk]]) -> Completion | ChatCompletion:
        """The whole response, from all the chunks of each choice."""
        finals = [Chunk.merged(chunks) if chunks else Chunk(seq=0, text="") for chunks in choices]
        body = []
        for index, merged in enumerate(finals):
            choice: dict[str, Any] = {"index": index, "logprobs": self._logprobs(index, merged, first=True),
                                      "finish_reason": _finish(merged)}
            if self.chat:
                content, calls = (merged.text, None) if self.tools is None else self.tools.answer(index, merged.text)
                choice["message"] = {"role": "assistant", "content": content}
                if calls:
                    choice["message"]["tool_calls"] = calls
                    if choice["finish_reason"] == "stop":
                        choice["finish_reason"] = "tool_calls"
            else:
                choice["text"] = (self.echo or "") + merged.text
            body.append(choice)
        return {**self._base("chat.completion" if self.chat else "text_completion"), "choices": body,  # type: ignore[return-value]
                "usage": _usage(finals)}

    def delta(self, index: int, chunk: Chunk | None, finish_reason: str | None, *, first: bool) -> dict[str, Any]:
        text = "" if chunk is None else chunk.text
        logprobs = None if chunk is None else self._logprobs(index, chunk, first=first)
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.chat and self.tools is not None:
            choice["delta"] = self.tools.delta(index, text, first, finish_reason is not None)
            if finish_reason == "stop" and "tool_calls" in choice["delta"]:
                choice["finish_reason"] = "tool_calls"
        elif self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = (self.echo or "") + text if first else text
        return {**self._chunk_base(), "choices": [choice]}

    def usage_only(self, finals: list[Chunk]) -> dict[str, Any]:
        return {**self._chunk_base(), "choices": [], "usage": _usage(finals)}

    def usage_so_far(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _logprobs(self, index: int, chunk: Chunk, *, first: bool) -> ChatLogprobs | CompletionLogprobs | None:
        if self.token_text is None or (chunk.logprobs is None and chunk.prompt_logprobs is None):
            return None
        name = self.token_text
        pairs = list(zip(chunk.token_ids or [], chunk.logprobs or [], strict=False))
        if self.chat:  # the token itself is among its top_logprobs only if it is one of the k most likely
            return {"content": [{**_chat_token(name(token), logprob),
                                 "top_logprobs": [_chat_token(name(i), lp) for i, lp in top[:self.top_logprobs]]}
                                for token, (logprob, top) in pairs]}
        if first and self.echo is not None and chunk.prompt_logprobs is not None:
            pairs = [*zip(self.prompt_ids, chunk.prompt_logprobs, strict=False), *pairs]
        tokens = [name(token) for token, _ in pairs]
        offsets = []
        offset = self._text_offsets.get(index, 0)
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        self._text_offsets[index] = offset
        return {"tokens": tokens,
                "token_logprobs": [None if entry is None else finite(entry[0]) for _, entry in pairs],
                "top_logprobs": [None if entry is None else {name(i): finite(lp) for i, lp in entry[1]}
                                 for _, entry in pairs],
                "text_offset": offsets}


def _usage(finals: list[Chunk]) -> Usage:
    """The choices' usage together: the prompt counted once (as vLLM does), every choice's output."""
    usage = usage_of(finals[0])
    completion = sum(f.completion_tokens or 0 for f in finals)
    return {**usage, "completion_tokens": completion, "total_tokens": usage["prompt_tokens"] + completion}


def _chat_token(text: str, logprob: float) -> ChatTopLogprob:
    return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8", "surrogatepass"))}


def _finish(chunk: Chunk) -> str:
    # OpenAI has no "cancelled"; vLLM reports an aborted request as "abort".
    return "abort" if chunk.finish_reason == FinishReason.CANCELLED else str(chunk.finish_reason)


def _failed(chunk: Chunk) -> FleetError:
    error = FleetError(chunk.error or "generation failed")
    error.status, error.type = 502, "server_error"
    return error


async def _choices(subscriptions: list[Subscription]) -> AsyncIterator[tuple[int, Chunk]]:
    """Every choice's chunks as they come, with the choice's index; ends when all have ended."""
    if len(subscriptions) == 1:  # the common case, without a task or a queue hop per chunk
        async for chunk in subscriptions[0].chunks():
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | BaseException]] = asyncio.Queue()

    async def pump(index: int, subscription: Subscription) -> None:
        try:
            async for chunk in subscription.chunks():
                queue.put_nowait((index, chunk))
        except Exception as exc:
            queue.put_nowait((index, exc))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(subscriptions)]
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            running -= item.finish_reason is not None
            yield index, item
    finally:
        for task in pumps:
            task.cancel()


async def _complete(request: web.Request, subscriptions: list[Subscription],
                    shape: CompletionShape) -> web.Response:
    chunks: list[list[Chunk]] = [[] for _ in subscriptions]
    async for index, chunk in _choices(subscriptions):
        if request.transport is None or request.transport.is_closing():
            # The client gave up waiting (the disconnect watch cancels the request).
            return web.Response(status=499)  # nginx's "client closed request": nobody reads it
        if chunk.finish_reason == FinishReason.ERROR:
            raise _failed(chunk)
        chunks[index].append(chunk)
    return web.json_response(shape.final(chunks))


async def _stream(request: web.Request, subscriptions: list[Subscription], shape: CompletionShape,
                  usage: StreamOptions) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": subscriptions[0].request_id})
    await response.prepare(request)
    started: set[int] = set()
    completion_tokens = [0] * len(subscriptions)
    finals: list[Chunk] = []
    try:
        async for index, chunk in _choices(subscriptions):
            events = []
            completion_tokens[index] += len(chunk.token_ids or ())
            if chunk.text or chunk.logprobs or index not in started:
                events.append(shape.delta(index, chunk, None, first=index not in started))
                started.add(index)
            if chunk.finish_reason == FinishReason.ERROR:
                events.append(_failed(chunk).to_dict())
            elif chunk.finish_reason is not None:
                events.append(shape.delta(index, None, _finish(chunk), first=False))
                completion_tokens[index] = chunk.completion_tokens or completion_tokens[index]
                finals.append(chunk)
            if usage.continuous_usage_stats:
                for event in events:
                    if "choices" in event:
                        event["usage"] = shape.usage_so_far(sum(completion_tokens))
            done = len(finals) == len(subscriptions) or chunk.finish_reason == FinishReason.ERROR
            if done and chunk.finish_reason != FinishReason.ERROR and usage.include_usage:
                events.append(shape.usage_only(finals))
            payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
            if done:
                payload += "data: [DONE]\n\n"
            await response.write(payload.encode())
            if done:
                break
    except ConnectionError:
        return response  # the client dropped the stream (the disconnect watch cancels the request)
    except Exception as exc:  # after the headers: the error goes in the stream, which then ends
        await _end_with_error(response, subscriptions[0].request_id, exc)
        return response
    await response.write_eof()
    return response


async def _end_with_error(response: web.StreamResponse, request_id: str, exc: Exception) -> None:
    if isinstance(exc, FleetError):
        error = exc
    elif isinstance(exc, REDIS_UNAVAILABLE):
        error = Unavailable(f"the stream was interrupted: {describe(exc)}; the request goes on: poll "
                            f"/v1/requests/{request_id}")
    else:
        log.exception("stream failed", extra={"request_id": request_id})
        error = FleetError(f"internal error while streaming; poll /v1/requests/{request_id}")
    try:
        await response.write(f"data: {json.dumps(error.to_dict())}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
    except ConnectionError:
        pass
