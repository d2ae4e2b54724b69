"""Submit-then-poll: POST /v1/generate, GET and DELETE /v1/requests/{id}."""

from __future__ import annotations

from aiohttp import web

from gateway.api_responses import Accepted, Cancelled
from gateway.api_types import GenerateBody, parse, parse_json_object
from gateway.auth import CALLER_KEY
from gateway.context import REQUEST_ID_KEY, Gateway, may_access, not_found
from gateway.idempotency import idempotency_of
from gateway.views import request_view


async def generate(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    body = parse_json_object(await request.read())
    job = await gateway.submitter.prepare(parse(GenerateBody, body).request(), request_id=request[REQUEST_ID_KEY])
    request_id = request[REQUEST_ID_KEY] = await gateway.submit(job, request.get(CALLER_KEY),
                                                                idempotency_of(request, body))
    accepted: Accepted = {"request_id": request_id, "status": "queued", "model": job.model}
    return web.json_response(accepted, status=202,
                             headers={"Location": f"/v1/requests/{request_id}"})


async def get_request(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    found = await Gateway.of(request).store.read(request_id)
    if found is None or not may_access(request.get(CALLER_KEY), found[0].get("owner", "")):
        raise not_found(request_id)
    return web.json_response(request_view(request_id, *found))


async def cancel_request(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    status = await Gateway.of(request).cancel(request_id, request.get(CALLER_KEY))
    reply: Cancelled = {"request_id": request_id, "status": status}  # type: ignore[typeddict-item]
    return web.json_response(reply)
