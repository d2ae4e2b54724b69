"""OpenAI-compatible front end: /v1/completions and /v1/chat/completions over the same queue.

Every request is admitted, enqueued, pollable (GET /v1/requests/{id}, the id is in
X-Request-Id) and cancellable exactly like a native one. Parameters that would change the output
and that we do not implement are refused with a 400 naming them, never silently ignored.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from common.errors import BadRequest, FleetError, Unprocessable
from common.protocol import Chunk, FinishReason
from gateway.auth import CALLER_KEY
from gateway.context import REQUEST_ID_KEY, Gateway
from gateway.relay import Subscription
from gateway.validation import GenerateRequest, check_messages, int_field, parse_json_object, sampling_fields

# Accepted with no effect on the output (or only with their no-op value, see _NOOP_VALUES).
_IGNORED = frozenset({"user", "stream_options", "stream", "n", "model", "max_tokens", "max_completion_tokens",
                      "temperature", "top_p", "stop", "seed", "ignore_eos", "min_tokens"})
_NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logprobs": (None, False),
    "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1), "logit_bias": (None, {}),
    "suffix": (None,), "parallel_tool_calls": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"), "store": (None, False),
    "metadata": (None,),
    # vLLM's sampling extensions, at their neutral values (`vllm bench serve` sends repetition_penalty=1.0).
    "repetition_penalty": (None, 1, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0, 0.0),
}


def _parse(body: dict[str, Any], *, chat: bool) -> tuple[GenerateRequest, bool, bool]:
    """(request, stream, include_usage); 400 for what we do not support."""
    text_field = "messages" if chat else "prompt"
    allowed = _IGNORED | {text_field}
    unsupported = sorted(k for k in body if k not in allowed and body[k] not in _NOOP_VALUES.get(k, (object(),)))
    if unsupported:
        raise BadRequest(f"unsupported parameter(s): {', '.join(unsupported)}", param=unsupported[0])
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("`stream` must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise BadRequest("`stream_options` supports only include_usage", param="stream_options")
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
    request = GenerateRequest(
        model=model, prompt=prompt, messages=messages, max_tokens=max_tokens, **sampling_fields(body))
    return request, stream, bool(options.get("include_usage"))


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
    generate, stream, include_usage = _parse(parse_json_object(await request.read()), chat=chat)
    job = await gateway.submitter.prepare(generate, request_id=request[REQUEST_ID_KEY])
    subscription = await gateway.submit_streaming(job, request.get(CALLER_KEY))
    try:
        shape = _Shape(chat, job.request_id, job.model)
        if stream:
            return await _stream(request, gateway, subscription, shape, include_usage)
        return await _complete(request, gateway, subscription, shape)
    finally:
        subscription.close()


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = int(time.time())

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
                "usage": _usage(chunk)}

    def delta(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        return {**self._chunk_base(), "choices": [choice]}

    def usage_only(self, chunk: Chunk) -> dict[str, Any]:
        return {**self._chunk_base(), "choices": [], "usage": _usage(chunk)}


def _finish(chunk: Chunk) -> str:
    # OpenAI has no "cancelled"; vLLM reports an aborted request as "abort".
    return "abort" if chunk.finish_reason == FinishReason.CANCELLED else str(chunk.finish_reason)


def _usage(chunk: Chunk) -> dict[str, int]:
    prompt, completion = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _failed(chunk: Chunk) -> FleetError:
    error = FleetError(chunk.error or "generation failed")
    error.status, error.type = 502, "server_error"
    return error


async def _complete(request: web.Request, gateway: Gateway, subscription: Subscription,
                    shape: _Shape) -> web.Response:
    parts: list[str] = []
    async for chunk in subscription.chunks():
        if request.transport is None or request.transport.is_closing():
            await gateway.cancel(subscription.request_id)  # the client gave up waiting
            return web.Response(status=499)  # nginx's "client closed request": nobody reads it
        parts.append(chunk.text)
        if chunk.finish_reason is not None:
            if chunk.finish_reason == FinishReason.ERROR:
                raise _failed(chunk)
            return web.json_response(shape.final("".join(parts), chunk))
    raise AssertionError("a request's chunks always end with a final one")


async def _stream(request: web.Request, gateway: Gateway, subscription: Subscription, shape: _Shape,
                  include_usage: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": subscription.request_id})
    await response.prepare(request)
    first = True
    try:
        async for chunk in subscription.chunks():
            events = []
            if chunk.text or first:
                events.append(shape.delta(chunk.text, None, first))
                first = False
            if chunk.finish_reason == FinishReason.ERROR:
                events.append(_failed(chunk).to_dict())
            elif chunk.finish_reason is not None:
                events.append(shape.delta("", _finish(chunk), False))
                if include_usage:
                    events.append(shape.usage_only(chunk))
            payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
            if chunk.finish_reason is not None:
                payload += "data: [DONE]\n\n"
            await response.write(payload.encode())
    except ConnectionError:
        # The client dropped the stream: stop the generation and free its KV budget.
        await gateway.cancel(subscription.request_id)
        return response
    await response.write_eof()
    return response
