"""OpenAI-compatible front end: /v1/completions and /v1/chat/completions over the same queue.

Every request is admitted, enqueued, pollable (GET /v1/requests/{id}, the id is in
X-Request-Id) and cancellable exactly like a native one. Parameters that would change the output
and that we do not implement are refused with a 400 naming them, never silently ignored. A client
that goes away (while its request is queued or running) cancels it; an error after an SSE stream
started ends the stream with an error event and `[DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import web

from common.errors import BadRequest, FleetError, Unavailable, Unprocessable
from common.protocol import Chunk, FinishReason
from common.redis_conn import REDIS_UNAVAILABLE, describe
from gateway.auth import CALLER_KEY
from gateway.context import REQUEST_ID_KEY, Gateway
from gateway.idempotency import idempotency_of
from gateway.relay import Subscription
from gateway.validation import (
    SAMPLING_FIELDS,
    GenerateRequest,
    check_messages,
    int_field,
    parse_json_object,
    priority_field,
    sampling_fields,
)
from gateway.views import usage_of

log = logging.getLogger(__name__)

# Accepted (the sampling fields and what does not change the output); others only with their no-op value
# (_NOOP_VALUES).
_ACCEPTED = frozenset({"user", "stream_options", "stream", "n", "model", "max_tokens", "max_completion_tokens",
                       "priority"}) | SAMPLING_FIELDS
_NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None,), "parallel_tool_calls": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"), "store": (None, False),
    "metadata": (None,),
}


def _is_noop(name: str, value: Any) -> bool:
    """Same type and value as a no-op value: `logprobs: 0` asks for logprobs (0 == False in Python)."""
    return any(type(value) is type(noop) and value == noop for noop in _NOOP_VALUES.get(name, ()))


def parse_openai_body(body: dict[str, Any], *, chat: bool) -> tuple[GenerateRequest, bool, _Usage]:
    """(request, stream, usage wanted in the stream); 400 for what we do not support."""
    text_field = "messages" if chat else "prompt"
    allowed = _ACCEPTED | {text_field}
    unsupported = sorted(k for k in body if k not in allowed and not _is_noop(k, body[k]))
    if unsupported:
        raise BadRequest(f"unsupported parameter(s): {', '.join(unsupported)}", param=unsupported[0])
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("`stream` must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise BadRequest("`stream_options` supports include_usage and continuous_usage_stats",
                         param="stream_options")
    if not all(isinstance(v, bool) for v in options.values()):
        raise BadRequest("`stream_options` values must be booleans", param="stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("`model` must be a string", param="model")

    prompt = messages = None
    if chat:
        messages = body.get("messages")
        if isinstance(messages, list):
            messages = [_flatten_content(m) for m in messages]
        check_messages(messages)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise Unprocessable("`prompt` must be a non-empty string (or a list of one)", param="prompt")

    max_tokens = int_field(body, "max_completion_tokens", minimum=1) or int_field(body, "max_tokens", minimum=1)
    request = GenerateRequest(model=model, prompt=prompt, messages=messages, max_tokens=max_tokens,
                              sampling=sampling_fields(body), priority=priority_field(body))
    return request, stream, _Usage(final=bool(options.get("include_usage")),
                                   continuous=bool(options.get("continuous_usage_stats")))


class _Usage:
    """What a stream reports of usage: a final usage-only event (`include_usage`), and usage so far on
    every event (vLLM's `continuous_usage_stats`)."""

    def __init__(self, *, final: bool, continuous: bool) -> None:
        self.final = final
        self.continuous = continuous


def _flatten_content(message: Any) -> Any:
    """OpenAI allows content as a list of text parts; the chat template wants one string."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
            return {**message, "content": "".join(p["text"] for p in parts)}
        raise BadRequest("only text content parts are supported", param="messages")
    return message


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def _serve(request: web.Request, *, chat: bool) -> web.StreamResponse:
    gateway = Gateway.of(request)
    body = parse_json_object(await request.read())
    generate, stream, usage = parse_openai_body(body, chat=chat)
    job = await gateway.submitter.prepare(generate, request_id=request[REQUEST_ID_KEY])
    caller = request.get(CALLER_KEY)
    subscription = await gateway.submit_streaming(job, caller, idempotency_of(request, body))
    request_id = request[REQUEST_ID_KEY] = subscription.request_id  # a replay's: the earlier request's
    # A client that leaves while its request waits (queued, or between chunks) cancels it; the cancel's
    # final chunk then ends the loops below.
    try:
        async with gateway.disconnects.watching(request, lambda: gateway.cancel(request_id, caller)):
            shape = CompletionShape(chat, request_id, job.model, len(job.prompt_token_ids))
            if stream:
                return await _stream(request, subscription, shape, usage)
            return await _complete(request, subscription, shape)
    finally:
        subscription.close()


class CompletionShape:
    """OpenAI's response objects for one request."""

    def __init__(self, chat: bool, request_id: str, model: str, prompt_tokens: int) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _chunk_base(self) -> dict[str, Any]:
        return self._base("chat.completion.chunk" if self.chat else "text_completion")

    def final(self, text: str, chunk: Chunk) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish(chunk)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._base("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage_of(chunk)}

    def delta(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        return {**self._chunk_base(), "choices": [choice]}

    def usage_only(self, chunk: Chunk) -> dict[str, Any]:
        return {**self._chunk_base(), "choices": [], "usage": usage_of(chunk)}

    def usage_so_far(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


def _finish(chunk: Chunk) -> str:
    # OpenAI has no "cancelled"; vLLM reports an aborted request as "abort".
    return "abort" if chunk.finish_reason == FinishReason.CANCELLED else str(chunk.finish_reason)


def _failed(chunk: Chunk) -> FleetError:
    error = FleetError(chunk.error or "generation failed")
    error.status, error.type = 502, "server_error"
    return error


async def _complete(request: web.Request, subscription: Subscription, shape: CompletionShape) -> web.Response:
    parts: list[str] = []
    async for chunk in subscription.chunks():
        if request.transport is None or request.transport.is_closing():
            # The client gave up waiting (the disconnect watch cancels the request).
            return web.Response(status=499)  # nginx's "client closed request": nobody reads it
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            if chunk.finish_reason == FinishReason.ERROR:
                raise _failed(chunk)
            return web.json_response(shape.final("".join(parts), chunk))
    raise AssertionError("a request's chunks always end with a final one")


async def _stream(request: web.Request, subscription: Subscription, shape: CompletionShape,
                  usage: _Usage) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": subscription.request_id})
    await response.prepare(request)
    first = True
    completion_tokens = 0
    try:
        async for chunk in subscription.chunks():
            events = []
            completion_tokens += len(chunk.token_ids or ())
            if chunk.text or first:
                events.append(shape.delta(chunk.text, None, first))
                first = False
            if chunk.finish_reason == FinishReason.ERROR:
                events.append(_failed(chunk).to_dict())
            elif chunk.finish_reason is not None:
                events.append(shape.delta("", _finish(chunk), False))
                completion_tokens = chunk.completion_tokens or completion_tokens
            if usage.continuous:
                for event in events:
                    if "choices" in event:
                        event["usage"] = shape.usage_so_far(completion_tokens)
            if chunk.finish_reason is not None and chunk.finish_reason != FinishReason.ERROR and usage.final:
                events.append(shape.usage_only(chunk))
            payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
            if chunk.finish_reason is not None:
                payload += "data: [DONE]\n\n"
            await response.write(payload.encode())
    except ConnectionError:
        return response  # the client dropped the stream (the disconnect watch cancels the request)
    except Exception as exc:  # after the headers: the error goes in the stream, which then ends
        await _end_with_error(response, subscription.request_id, exc)
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
