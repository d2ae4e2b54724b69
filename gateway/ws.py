"""GET /ws/generate: many requests per socket, streamed live, cancellable, re-attachable.

Client -> server: a generate request (the /v1/generate body, plus optional `id`,
`outlive_socket` and `idempotency_key`: a generate repeated with the same key is the first one,
as with the Idempotency-Key header of a POST), `{"type": "cancel", "request_id"}`,
`{"type": "attach", "request_id", "last_seq"}`.
Server -> client: accepted, chunk (with seq), done, error, cancelled. A chunk's `seq` is the last
stored piece of output it carries: seqs increase, and a client that fell behind (or re-attached to
output already stored) gets what waited in one chunk. A bad message gets an
`error` and the socket stays open. Closing the socket cancels its unfinished requests unless
they were submitted with `"outlive_socket": true`. A gateway that shuts down closes sockets
with 1001 and cancels nothing: the client re-attaches (to any gateway) with `last_seq`. With API
keys on, a key reaches only the requests it created (an admin key: all). Attaches count against
`ws_max_streams_per_socket` like submits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from common.errors import BadRequest, FleetError, Forbidden, Overloaded, Unprocessable
from common.protocol import TERMINAL_STATUSES, Chunk, FinishReason
from common.redis_conn import REDIS_UNAVAILABLE, unavailable
from common.request_store import Idempotency
from gateway.api_types import GenerateBody, WsGenerate, parse, parse_json_object
from gateway.auth import CALLER_KEY, WS_PROTOCOL, Caller
from gateway.context import Gateway
from gateway.idempotency import idempotency_for
from gateway.relay import Subscription
from gateway.views import native_logprobs, usage_of

log = logging.getLogger(__name__)

_WS_FIELDS = frozenset(WsGenerate.model_fields) - frozenset(GenerateBody.model_fields)  # what the socket adds
_OUTBOX_SIZE = 1024


async def websocket(request: web.Request) -> web.WebSocketResponse:
    gateway = Gateway.of(request)
    allowed = gateway.settings.ws_allowed_origins
    origin = request.headers.get("Origin")
    if allowed and origin is not None and origin not in allowed:
        raise Forbidden(f"WebSocket connections from origin {origin!r} are not allowed")
    ws = web.WebSocketResponse(max_msg_size=gateway.settings.ws_max_message_bytes, heartbeat=30.0,
                               protocols=(WS_PROTOCOL,))
    await ws.prepare(request)
    gateway.sockets.add(ws)
    try:
        await SocketSession(gateway, ws, request.get(CALLER_KEY)).run()
    finally:
        gateway.sockets.discard(ws)
    return ws


async def close_all(gateway: Gateway) -> None:
    """On shutdown: 1001 "going away" to every client; their requests run on (see `stopping`)."""
    for ws in list(gateway.sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway restarting; re-attach with last_seq")


class SocketSession:
    def __init__(self, gateway: Gateway, ws: web.WebSocketResponse, caller: Caller | None) -> None:
        self.gateway = gateway
        self.ws = ws
        self.caller = caller
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_OUTBOX_SIZE)
        self.streams: dict[str, asyncio.Task[None]] = {}
        self.cancel_on_close: set[str] = set()  # submitted here, unfinished, not outliving the socket

    async def run(self) -> None:
        writer = asyncio.create_task(self._write_loop())
        idle_s = self.gateway.settings.ws_idle_timeout_s
        try:
            while True:
                try:
                    message = await self.ws.receive(timeout=idle_s)
                except TimeoutError:
                    if self.streams:
                        continue  # quiet, but streaming: not idle
                    await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"idle timeout")
                    break
                if message.type == WSMsgType.TEXT:
                    await self._handle(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self._send_error(None, None, BadRequest("binary frames are not supported; send JSON text"))
                elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
        finally:
            for task in self.streams.values():
                task.cancel()
            if not self.gateway.stopping:
                await self._cancel_abandoned()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _handle(self, raw: str) -> None:
        client_id: Any = None
        request_id: str | None = None
        try:
            body = parse_json_object(raw)
            client_id = body.get("id")
            kind = body.get("type", "generate")
            if kind == "generate":
                request_id = await self._generate(body, client_id)
            elif kind == "cancel":
                request_id = _request_id(body)
                status = await self.gateway.cancel(request_id, self.caller)
                await self._send({"type": "cancelled", "request_id": request_id, "status": status}, client_id)
            elif kind == "attach":
                request_id = _request_id(body)
                await self._attach(request_id, body.get("last_seq", 0), client_id)
            else:
                raise Unprocessable(f"unknown message type {kind!r}: use generate, cancel or attach", param="type")
        except FleetError as exc:
            await self._send_error(request_id, client_id, exc)
        except REDIS_UNAVAILABLE as exc:
            await self._send_error(request_id, client_id, unavailable(exc))

    async def _attach(self, request_id: str, last_seq: Any, client_id: Any) -> None:
        """Stream the rest of a request after `last_seq`. A client that has it all (a finished request's
        last seq) gets its `done` again; one past the end is told so at once."""
        if isinstance(last_seq, bool) or not isinstance(last_seq, int) or last_seq < 0:
            raise Unprocessable("`last_seq` must be an integer >= 0", param="last_seq")
        self._check_stream_limit(replacing=request_id)
        # Subscribed before the request is read: no chunk can fall between the read and the stream.
        subscription = await self.gateway.relay.subscribe(request_id)
        try:
            meta = await self.gateway.request_for(request_id, self.caller)
            if last_seq > meta.seq:
                raise Unprocessable(f"last_seq {last_seq} is past the end: request {request_id} has sent up to "
                                    f"seq {meta.seq}", param="last_seq")
            if last_seq == meta.seq and meta.status in TERMINAL_STATUSES:
                [final] = await self.gateway.store.chunks_after(request_id, meta.seq - 1)
                await self._send_final(request_id, final, client_id)
                subscription.close()
                return
        except BaseException:
            subscription.close()
            raise
        self._start_stream(subscription, last_seq, client_id)

    def _check_stream_limit(self, replacing: str | None = None) -> None:
        limit = self.gateway.settings.ws_max_streams_per_socket
        if len(self.streams) - (replacing in self.streams) >= limit:
            raise Overloaded(f"this socket already streams {limit} unfinished requests (the limit); "
                             "wait for one to finish or open another socket", retry_after_s=1)

    async def _generate(self, body: dict[str, Any], client_id: Any) -> str:
        message = parse(WsGenerate, body)
        self._check_stream_limit()
        if self.caller is not None:
            await self.gateway.auth.check_rate(self.caller)
        job = await self.gateway.submitter.prepare(message.request())
        subscription = await self.gateway.submit_streaming(job, self.caller, self._idempotency(message, body))
        request_id = subscription.request_id  # a replay's: the earlier request's
        if not message.outlive_socket:
            self.cancel_on_close.add(request_id)
        await self._send({"type": "accepted", "request_id": request_id, "model": job.model}, client_id)
        self._start_stream(subscription, 0, client_id)
        return request_id

    def _idempotency(self, message: WsGenerate, body: dict[str, Any]) -> Idempotency | None:
        """`idempotency_key` in a generate message: what the Idempotency-Key header is to a POST."""
        if message.idempotency_key is None:
            return None
        request = {k: v for k, v in body.items() if k not in _WS_FIELDS}
        return idempotency_for(message.idempotency_key, request, route="WS /ws/generate",
                               owner=self.caller.digest if self.caller else "")

    def _start_stream(self, subscription: Subscription, last_seq: int, client_id: Any) -> None:
        request_id = subscription.request_id
        previous = self.streams.pop(request_id, None)
        if previous is not None:
            previous.cancel()  # attaching again replaces the earlier stream of that request
        task = asyncio.create_task(self._stream(subscription, last_seq, client_id))
        self.streams[request_id] = task

    async def _stream(self, subscription: Subscription, last_seq: int, client_id: Any) -> None:
        request_id = subscription.request_id
        try:
            async for chunk in subscription.chunks(last_seq):
                if chunk.text or chunk.logprobs:
                    message = {"type": "chunk", "request_id": request_id, "seq": chunk.seq, "text": chunk.text}
                    if chunk.logprobs:
                        message["logprobs"] = native_logprobs(chunk.token_ids or [], chunk.logprobs)
                    await self._send(message, client_id)
                if chunk.finish_reason is None:
                    continue
                self.cancel_on_close.discard(request_id)
                await self._send_final(request_id, chunk, client_id)
        except FleetError as exc:
            await self._send_error(request_id, client_id, exc)
        except REDIS_UNAVAILABLE as exc:
            await self._send_error(request_id, client_id, unavailable(exc))
        except Exception:  # a bug: the client hears of it rather than waiting forever
            log.exception("stream failed", extra={"request_id": request_id})
            await self._send_error(request_id, client_id, FleetError("internal error while streaming; re-attach"))
        finally:
            subscription.close()
            if self.streams.get(request_id) is asyncio.current_task():
                del self.streams[request_id]

    async def _send_final(self, request_id: str, chunk: Chunk, client_id: Any) -> None:
        if chunk.finish_reason == FinishReason.ERROR:
            await self._send({"type": "error", "request_id": request_id, "status": 502,
                              "message": chunk.error or "generation failed"}, client_id)
        else:
            await self._send({"type": "done", "request_id": request_id, "seq": chunk.seq,
                              "finish_reason": chunk.finish_reason, "usage": usage_of(chunk)}, client_id)

    async def _cancel_abandoned(self) -> None:
        for request_id in self.cancel_on_close:
            try:
                await self.gateway.cancel(request_id, self.caller)
                log.info("cancelled: its socket closed", extra={"request_id": request_id})
            except (FleetError, *REDIS_UNAVAILABLE) as exc:
                log.warning("could not cancel abandoned request: %s", exc, extra={"request_id": request_id})

    async def _send(self, message: dict[str, Any], client_id: Any) -> None:
        if client_id is not None:
            message["id"] = client_id
        await self.outbox.put(message)

    async def _send_error(self, request_id: str | None, client_id: Any, exc: FleetError) -> None:
        await self._send({"type": "error", "request_id": request_id, "status": exc.status,
                          "message": exc.message}, client_id)

    async def _write_loop(self) -> None:
        # One writer: frames of concurrent streams never interleave, and order per request holds.
        while True:
            message = await self.outbox.get()
            if self.ws.closed:
                continue
            try:
                await self.ws.send_json(message)
            except ConnectionError:
                continue


def _request_id(body: dict[str, Any]) -> str:
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id or len(request_id) > 128:
        raise Unprocessable("`request_id` must be a request id string", param="request_id")
    return request_id
