"""OpenAI's Batch API: create (from an uploaded input file), retrieve, list, cancel. The batch runs through
the same queue as every request, at the batch priority (gateway/batch_runner.py)."""

from __future__ import annotations

import time

from aiohttp import web

from common.errors import BadRequest, Conflict, NotFound
from gateway.api_types import BatchBody, parse, parse_json_object
from gateway.auth import CALLER_KEY
from gateway.batch_store import FINAL_STATUSES, Batch, BatchStatus, new_batch_id
from gateway.context import Gateway, may_access
from gateway.files_api import file_for, list_response, page_query

_UNIT_S = {"s": 1, "m": 60, "h": 3600}
MAX_WINDOW_S = 7 * 24 * 3600


def completion_window_s(value: str) -> int:
    """OpenAI's `completion_window` ("24h", its pattern checked by BatchBody); this fleet also takes seconds or
    minutes ("90s", "30m"), up to 7 days."""
    seconds = int(value[:-1]) * _UNIT_S[value[-1]]
    if seconds > MAX_WINDOW_S:
        raise BadRequest("`completion_window` must be at most 7 days", param="completion_window")
    return seconds


async def create_batch(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    body = parse(BatchBody, parse_json_object(await request.read()), unknown=BadRequest, invalid=BadRequest)
    endpoint = body.endpoint
    window_s = completion_window_s(body.completion_window)
    stored = await file_for(request, body.input_file_id)
    if stored.purpose != "batch":
        raise BadRequest(f"file {stored.id} is not a batch input file (purpose {stored.purpose})",
                         param="input_file_id")
    if stored.endpoint != endpoint:
        raise BadRequest(f"the file's lines are for {stored.endpoint}, not {endpoint}", param="endpoint")
    card = await gateway.registry.resolve(stored.model)  # 404 for a model this fleet does not know
    now = int(time.time())
    caller = request.get(CALLER_KEY)
    batch = Batch(id=new_batch_id(), owner=caller.digest if caller else "", endpoint=endpoint, model=card.name,
                  input_file_id=stored.id, completion_window=body.completion_window, created_at=now,
                  expires_at=now + window_s, metadata=body.metadata, total=stored.lines)
    await gateway.batches.create(batch)
    return web.json_response(batch.to_openai())


async def get_batch(request: web.Request) -> web.Response:
    return web.json_response((await _batch_for(request)).to_openai())


async def list_batches(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    limit, after = page_query(request)
    caller = request.get(CALLER_KEY)
    batches, more = await gateway.batches.page(caller.digest if caller else "", limit=limit, after=after)
    return list_response([b.to_openai() for b in batches], more)


async def cancel_batch(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    batch = await _batch_for(request)
    if batch.status in FINAL_STATUSES:
        raise Conflict(f"batch {batch.id} is {batch.status} already", param="batch_id")
    if batch.status != BatchStatus.CANCELLING:
        await gateway.batches.cancel(batch)
    return web.json_response((await _batch_for(request)).to_openai())


async def _batch_for(request: web.Request) -> Batch:
    batch_id = request.match_info["batch_id"]
    batch = await Gateway.of(request).batches.get(batch_id)
    if batch is None or not may_access(request.get(CALLER_KEY), batch.owner):
        raise NotFound(f"batch {batch_id} does not exist", param="batch_id")
    return batch
