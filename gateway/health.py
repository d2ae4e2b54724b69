"""/health (process alive), /ready (Redis answers and a model is ready), /v1/models."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from common.protocol import ModelState
from common.redis_conn import REDIS_DOWN_ERRORS
from gateway.context import Gateway


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    try:
        await gateway.redis.ping()
        workers = await gateway.registry.live_workers()
    except REDIS_DOWN_ERRORS as exc:
        return web.json_response({"ready": False, "reason": f"Redis is unreachable: {exc}"}, status=503)
    ready_models = sorted({name for w in workers for name, m in w.models.items() if m["state"] == ModelState.READY})
    if not ready_models:
        failed = sorted({f"{name}: {m.get('error')}" for w in workers for name, m in w.models.items()
                         if m["state"] == ModelState.FAILED})
        reason = ("no live worker" if not workers else f"models failed to load: {'; '.join(failed)}" if failed
                  else "no worker has a model ready yet (loading)")
        return web.json_response({"ready": False, "reason": reason, "workers": len(workers)}, status=503)
    return web.json_response({"ready": True, "workers": len(workers), "models": ready_models})


async def models(request: web.Request) -> web.Response:
    """OpenAI's list shape, with each model's state on every live worker."""
    gateway = Gateway.of(request)
    workers = await gateway.registry.live_workers()
    cards = await gateway.registry.cards(fresh=True)
    data: list[dict[str, Any]] = []
    for name in sorted(set(cards) | {n for w in workers for n in w.models}):
        card = cards.get(name)
        serving = [{"worker_id": w.worker_id, **w.models[name]} for w in workers if name in w.models]
        states = {s["state"] for s in serving}
        state = next((s for s in (ModelState.READY, ModelState.LOADING, ModelState.FAILED) if s in states),
                     "unavailable")
        data.append({
            "id": name, "object": "model", "created": 0, "owned_by": "llm-fleet",
            "max_model_len": card.max_model_len if card else None,
            "engine": card.engine if card else None,
            "state": state, "workers": serving,
        })
    return web.json_response({"object": "list", "data": data})
