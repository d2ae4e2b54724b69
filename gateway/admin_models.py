"""Admin routes (admin API key) of the model control plane: list workers, load and unload models.

A load or unload becomes an arq job on each chosen worker's own queue (common/control.py). The
reply is 202 with the job ids at once; with `"wait": true` the call waits (up to
`control_wait_timeout_s`) and answers 200 with each worker's outcome. Models are loaded only from
a worker's catalogue: the name is checked against what live workers advertise, never used as a path.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from aiohttp import web

from common import control
from common.errors import Unprocessable
from gateway.api_types import B, LoadBody, UnloadBody, parse, parse_json_object
from gateway.context import Gateway


async def list_workers(request: web.Request) -> web.Response:
    workers = await Gateway.of(request).registry.live_workers()
    return web.json_response({"workers": [dataclasses.asdict(w) for w in
                                          sorted(workers, key=lambda w: w.worker_id)]})


async def load_model(request: web.Request) -> web.Response:
    gateway, model = Gateway.of(request), request.match_info["name"]
    body = _body(await request.read(), LoadBody)
    worker_ids, replicas = _worker_ids(body), body.replicas
    if worker_ids is not None and replicas is not None:
        raise Unprocessable("give `workers` or `replicas`, not both", param="replicas")
    targets = control.plan_load(await gateway.registry.live_workers(), model, worker_ids=worker_ids,
                                replicas=replicas)
    return await _dispatch(gateway, control.LOAD_MODEL, model, targets, wait=body.wait)


async def unload_model(request: web.Request) -> web.Response:
    gateway, model = Gateway.of(request), request.match_info["name"]
    body = _body(await request.read(), UnloadBody)
    targets = control.plan_unload(await gateway.registry.live_workers(), model, worker_ids=_worker_ids(body))
    return await _dispatch(gateway, control.UNLOAD_MODEL, model, targets, wait=body.wait)


async def _dispatch(gateway: Gateway, action: str, model: str, targets: list[str], *, wait: bool) -> web.Response:
    jobs = await control.send(gateway.arq, action, model, targets)
    reply: dict[str, Any] = {"model": model, "action": action}
    if not wait:
        reply["workers"] = [{"worker_id": w, "job_id": j.job_id} for w, j in zip(targets, jobs, strict=True)]
        return web.json_response(reply, status=202 if jobs else 200)
    outcomes = await asyncio.gather(*(control.outcome(j, gateway.settings.control_wait_timeout_s) for j in jobs))
    reply["workers"] = [{"worker_id": w, "job_id": j.job_id, **o} for w, j, o in zip(targets, jobs, outcomes,
                                                                                     strict=True)]
    return web.json_response(reply)


def _body(raw: bytes, model: type[B]) -> B:
    return parse(model, parse_json_object(raw) if raw.strip() else {})


def _worker_ids(body: UnloadBody) -> list[str] | None:
    return None if body.workers is None else list(dict.fromkeys(body.workers))
