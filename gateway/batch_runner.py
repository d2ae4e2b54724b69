"""Carries batches on: every gateway runs one; each active batch is carried by whichever gateway holds its
lease (renewed every tick, taken over by another gateway when its holder dies), so a batch outlives any
one gateway. A step of a batch:

- collect: its lines' requests that ended are written to the output file (completed) or the error file
  (failed, cancelled), each exactly once (gateway/batch_store.py);
- feed: input lines become ordinary jobs of the batch class (common/protocol.py Priority), `batch_window`
  in flight at most, so a million-line batch never is a million-entry stream; each with an idempotency
  key of its own, so a line fed again after its runner died is the same request; a line that is no valid
  request goes to the error file with the status and error the endpoint would have answered;
- stop: a cancelled batch cancels its lines in flight; one whose window passed does too, and reports every
  line not run as `batch_expired` (OpenAI's behaviour); once nothing is in flight the batch ends, its
  output and error files published.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.asyncio import Redis

from common import keys
from common.errors import BadRequest, FleetError, Overloaded, Unavailable
from common.protocol import TERMINAL_STATUSES, Chunk, Priority, RequestStatus
from common.redis_conn import REDIS_UNAVAILABLE, describe
from common.request_store import RequestStore
from common.settings import GatewaySettings
from gateway.api_types import ChatBody, CompletionBody, GenerateBody, parse
from gateway.batch_input import parse_line
from gateway.batch_store import Batch, BatchStatus, BatchStore, InFlight
from gateway.file_store import FileStore
from gateway.idempotency import idempotency_for
from gateway.openai_api import CompletionShape, parse_openai_body
from gateway.submit import Submitter
from gateway.tool_calls import ToolCallShape
from gateway.views import request_view

log = logging.getLogger(__name__)

_STOP_MESSAGES = {
    "cancel": ("batch_cancelled", "The batch was cancelled before this request completed."),
    "expire": ("batch_expired", "This request could not be executed before the completion window expired."),
}


class BatchRunner:
    def __init__(self, redis: Redis, settings: GatewaySettings, store: RequestStore, submitter: Submitter,
                 files: FileStore, batches: BatchStore) -> None:
        self._redis = redis
        self._settings = settings
        self._store = store
        self._submitter = submitter
        self._files = files
        self._batches = batches
        self.runner_id = uuid.uuid4().hex  # this process, as lease holder
        self._stopping_sent: set[str] = set()  # batches whose in-flight requests this runner cancelled

    async def run(self) -> None:
        while True:
            try:
                for batch_id in await self._batches.active():
                    if await self._batches.lease(batch_id, self.runner_id, self._settings.batch_lease_ms):
                        await self._step_alone(batch_id)
            except REDIS_UNAVAILABLE as exc:
                log.warning("batch runner: %s", describe(exc))
            await asyncio.sleep(self._settings.batch_tick_s)

    async def _step_alone(self, batch_id: str) -> None:
        """One batch's step, whose failure is that batch's alone: a batch that cannot go on (its input file
        was deleted, ...) ends `failed` with the reason, and the others go on."""
        try:
            await self.step(batch_id)
        except REDIS_UNAVAILABLE:
            raise
        except Exception as exc:
            log.exception("batch %s cannot go on; it fails", batch_id)
            batch = await self._batches.get(batch_id)
            if batch is not None:
                for request_id in await self._batches.inflight(batch_id):
                    await self._store.cancel(request_id, batch.model, result_ttl_s=self._settings.result_ttl_s)
                await self._batches.ended(batch, status=BatchStatus.FAILED, failed_at=int(time.time()),
                                          errors={"object": "list", "data": [
                                              {"code": "batch_failed", "message": str(exc), "param": None,
                                               "line": batch.fed + 1}]})

    async def step(self, batch_id: str) -> None:
        batch = await self._batches.get(batch_id)
        if batch is None:
            return
        now = int(time.time())
        if batch.status == BatchStatus.VALIDATING:
            batch.status, batch.in_progress_at = BatchStatus.IN_PROGRESS, now
            await self._batches.update(batch.id, status=batch.status, in_progress_at=now)
        if not batch.stopping and now >= batch.expires_at:
            batch.stopping = "expire"
            await self._batches.update(batch.id, stopping="expire")
        inflight = await self._collect(batch)
        if batch.stopping:
            await self._stop(batch, inflight)
        elif not await self._feed(batch, self._settings.batch_window - len(inflight)) and not inflight \
                and batch.fed >= batch.total:
            await self._finish(batch, BatchStatus.COMPLETED, "completed_at")

    async def _collect(self, batch: Batch) -> dict[str, InFlight]:
        """Write the results of the batch's requests that ended; the ones still in flight."""
        inflight = await self._batches.inflight(batch.id)
        if not inflight:
            return inflight
        request_ids = list(inflight)
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.hget(keys.request(request_id), "status")
            statuses = await pipe.execute()
        ended = [request_id for request_id, status in zip(request_ids, statuses, strict=True)
                 if status is None or status.decode() in TERMINAL_STATUSES]
        if not ended:
            return inflight
        results = await self._store.read_many(ended)  # a round trip for all of them, and one to write them
        token_text = None
        if any((inflight[r].options or {}).get("logprobs") is not None for r in ended):
            token_text = (await self._submitter.encoder(batch.model)).token_text
        await self._batches.record_ended(batch, [
            (request_id, *self._result_line(batch, request_id, inflight.pop(request_id), found, token_text))
            for request_id, found in zip(ended, results, strict=True)])
        return inflight

    def _result_line(self, batch: Batch, request_id: str, line: InFlight,
                     found: tuple[dict[str, str], list[Chunk]] | None,
                     token_text: Callable[[int], str] | None) -> tuple[bytes, bool]:
        """The output line (True) or error line (False) of a request that ended (`found`: its state and
        chunks; None: its result expired)."""
        record: dict[str, Any] = {"id": f"batch_req_{request_id}", "custom_id": line.custom_id}
        if found is None:
            record.update(response=None, error={"code": "request_expired",
                                                "message": "the request's result expired before it was collected"})
            return _jsonl(record), False
        state, chunks = found
        status = state.get("status")
        if status == RequestStatus.CANCELLED:
            code, message = _STOP_MESSAGES.get(batch.stopping, ("cancelled", "The request was cancelled."))
            record.update(response=None, error={"code": code, "message": message})
            return _jsonl(record), False
        if status == RequestStatus.FAILED:
            error = {"error": {"message": state.get("error") or "generation failed", "type": "server_error",
                               "param": None, "code": 500}}
            record.update(response={"status_code": 500, "request_id": request_id, "body": error}, error=None)
            return _jsonl(record), False
        if batch.endpoint == "/v1/generate":
            body = request_view(request_id, state, chunks)
        else:
            shape = CompletionShape(batch.endpoint == "/v1/chat/completions", request_id, batch.model,
                                    int(state.get("prompt_tokens", 0)))
            options = line.options or {}
            if (mode := options.get("tool_call")) is not None:
                shape.tools = ToolCallShape(request_id, mode, options.get("tool_call_parser", ""))
            if options.get("logprobs") is not None:
                shape.token_text, shape.top_logprobs = token_text, options["logprobs"]
            body = shape.final([chunks])
        record.update(response={"status_code": 200, "request_id": request_id, "body": body}, error=None)
        return _jsonl(record), True

    async def _unfed(self, batch: Batch) -> AsyncIterator[tuple[bytes, int, int]]:
        """The batch's input lines from its cursor on: (the line, and the cursor after it: part, line). The
        caller moves the cursor (record_fed) before it asks for the next one."""
        part: list[bytes] | None = None
        while batch.fed < batch.total:
            if part is None:
                raw_part = await self._files.part(batch.input_file_id, batch.next_part)
                if raw_part is None:
                    raise RuntimeError(f"its input file {batch.input_file_id} was deleted before line "
                                       f"{batch.fed + 1} was read")
                part = raw_part.split(b"\n")[:-1]
            last_of_part = batch.next_line + 1 >= len(part)
            yield (part[batch.next_line], *((batch.next_part + 1, 0) if last_of_part
                                            else (batch.next_part, batch.next_line + 1)))
            if last_of_part:
                part = None

    async def _feed(self, batch: Batch, room: int) -> int:
        """Input lines into the queue, up to `room` requests; how many went in."""
        fed = 0
        async for raw, next_part, next_line in self._unfed(batch):
            if fed >= room:
                break
            number = batch.fed + 1
            try:
                request = await self._submit(batch, raw, number)
            except (Overloaded, Unavailable):
                break  # the batch class is at its cap, or no worker serves the model now: the next tick goes on
            except FleetError as exc:
                error_line = _jsonl({"id": f"batch_req_line_{number}", "custom_id": _custom_id(raw),
                                     "response": {"status_code": exc.status, "request_id": None,
                                                  "body": exc.to_dict()}, "error": None})
                if not await self._batches.record_fed(batch, next_part=next_part, next_line=next_line,
                                                      request=None, error_line=error_line):
                    break  # another runner carries it now
            else:
                if not await self._batches.record_fed(batch, next_part=next_part, next_line=next_line,
                                                      request=request):
                    break
                fed += 1
        return fed

    async def _submit(self, batch: Batch, raw: bytes, number: int) -> tuple[str, InFlight]:
        """Line `number` as a batch-class job in the queue: its request id, and what the batch records of it."""
        line = parse_line(raw, number)
        body = {k: v for k, v in line.body.items() if k != "priority"}
        parsed = parse(GenerateBody, body) if batch.endpoint == "/v1/generate" else parse_openai_body(
            body, chat=batch.endpoint == "/v1/chat/completions")
        options: dict[str, Any] = {}
        if isinstance(parsed, ChatBody | CompletionBody):
            if parsed.n > 1 or (isinstance(parsed, CompletionBody) and parsed.echo):
                raise BadRequest("a batch line is one completion: `n` above 1 and `echo` are not taken in batches",
                                 param="n" if parsed.n > 1 else "echo")
        request = parsed.request()
        request.priority = Priority.BATCH
        job = await self._submitter.prepare(request)
        if isinstance(parsed, ChatBody) and parsed.tools:
            parser = (await self._submitter.card(job.model)).tool_call_parser
            if (mode := parsed.tool_mode(parser)) is not None:
                options["tool_call"] = mode
                if mode == "auto":
                    options["tool_call_parser"] = parser
        if job.params.logprobs is not None:
            options["logprobs"] = job.params.logprobs
        idempotency = idempotency_for(f"{batch.id} line {number}", line.body, route="batch", owner=batch.owner)
        request_id = await self._submitter.enqueue(job, owner=batch.owner, idempotency=idempotency)
        return request_id, InFlight(number, line.custom_id, options or None)

    async def _stop(self, batch: Batch, inflight: dict[str, InFlight]) -> None:
        """Cancel what is in flight (once per runner; what ends is collected as it ends); an expiring batch
        reports every line not fed; then the batch ends."""
        if inflight and batch.id not in self._stopping_sent:
            self._stopping_sent.add(batch.id)
            for request_id in inflight:
                await self._store.cancel(request_id, batch.model, result_ttl_s=self._settings.result_ttl_s)
        if inflight:
            return
        if batch.stopping == "expire":
            code, message = _STOP_MESSAGES["expire"]
            async for raw, next_part, next_line in self._unfed(batch):
                error_line = _jsonl({"id": f"batch_req_line_{batch.fed + 1}", "custom_id": _custom_id(raw),
                                     "response": None, "error": {"code": code, "message": message}})
                if not await self._batches.record_fed(batch, next_part=next_part, next_line=next_line,
                                                      request=None, error_line=error_line):
                    return
            await self._finish(batch, BatchStatus.EXPIRED, "expired_at")
        else:
            await self._finish(batch, BatchStatus.CANCELLED, "cancelled_at")
        self._stopping_sent.discard(batch.id)

    async def _finish(self, batch: Batch, status: BatchStatus, at_field: str) -> None:
        """Publish the output and error files (those with lines), then the final status."""
        now = int(time.time())
        await self._batches.update(batch.id, status=BatchStatus.FINALIZING, finalizing_at=now)
        fields: dict[str, Any] = {"status": status, "finalizing_at": now, at_field: now}
        for file_id, kind, name in ((batch.output_id, "output", "output_file_id"),
                                    (batch.error_id, "errors", "error_file_id")):
            stored = await self._batches.result_file(batch, file_id, kind)
            if stored is not None:
                await self._files.publish(stored)
                fields[name] = file_id
        await self._batches.ended(batch, **fields)
        log.info("batch %s %s (%d lines)", batch.id, status, batch.total)


def _custom_id(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _jsonl(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"
