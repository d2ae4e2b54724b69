"""/health (process alive), /ready (this gateway can take requests), /v1/models.

/ready does not depend on workers: with every worker group scaled to zero the gateways must stay
in their Service, or no request reaches a stream, the queue's lag stays 0 and KEDA never scales
up. It is 503 only while Redis does not answer or a long-lived task of the gateway has failed.
Which models are ready is in its body (`models`, `models_reason`) and on /v1/models.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from common.protocol import ModelState
from common.redis_conn import REDIS_UNAVAILABLE, describe
from gateway.api_responses import ModelList, ModelObject, ModelOnWorker
from gateway.context import Gateway


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    if gateway.supervisor.failed:
        failed = "; ".join(f"{task}: {error}" for task, error in gateway.supervisor.failed.items())
        return web.json_response({"ready": False, "reason": f"a gateway task failed ({failed})"}, status=503)
    try:
        await gateway.redis.ping()
        workers = await gateway.registry.live_workers()
    except REDIS_UNAVAILABLE as exc:
        return web.json_response({"ready": False, "reason": describe(exc)}, status=503)
    ready_models = sorted({name for w in workers for name, m in w.models.items() if m["state"] == ModelState.READY})
    body: dict[str, Any] = {"ready": True, "workers": len(workers), "models": ready_models}
    if not ready_models:
        failed = sorted({f"{name}: {m.get('error')}" for w in workers for name, m in w.models.items()
                         if m["state"] == ModelState.FAILED})
        body["models_reason"] = ("no live worker (requests queue until one starts)" if not workers
                                 else f"models failed to load: {'; '.join(failed)}" if failed
                                 else "no worker has a model ready yet (loading)")
    return web.json_response(body)


async def models(request: web.Request) -> web.Response:
    """OpenAI's list shape, with each model's state on every live worker."""
    gateway = Gateway.of(request)
    workers = await gateway.registry.live_workers()
    cards = await gateway.registry.cards(fresh=True)
    data: list[ModelObject] = []
    for name in sorted(set(cards) | {n for w in workers for n in w.models}):
        card = cards.get(name)
        serving: list[ModelOnWorker] = [{"worker_id": w.worker_id, **w.models[name]}  # type: ignore[typeddict-item]
                                        for w in workers if name in w.models]
        states = {s["state"] for s in serving}
        state = next((s for s in (ModelState.READY, ModelState.LOADING, ModelState.FAILED) if s in states),
                     "unavailable")
        data.append({
            "id": name, "object": "model", "created": 0, "owned_by": "llm-fleet",
            "max_model_len": card.max_model_len if card else None,
            "engine": card.engine if card else None,
            "unsupported_parameters": card.unsupported if card else [],
            "tool_call_parser": (card.tool_call_parser or None) if card else None,
            "state": state, "workers": serving,
        })
    reply: ModelList = {"object": "list", "data": data}
    return web.json_response(reply)
