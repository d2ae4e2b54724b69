"""GET /v1/fleet: the console's read-only look at the fleet.

Workers (state, models with KV use and load progress, GPU, tokens/s), and per model the queue
(outstanding, waiting, the oldest wait, dead letters) and the 429s it has refused. Readable with
any API key (the admin actions it offers go through /admin/*, which need an admin key).
"""

from __future__ import annotations

import time

from aiohttp import web

from common import fleet_state
from gateway.context import Gateway


async def fleet(request: web.Request) -> web.Response:
    gateway = Gateway.of(request)
    workers = await gateway.registry.live_workers()
    rejected = await gateway.rejections.totals()
    queues = {model: {**queue, "rejected": rejected.get(model, 0)}
              for model, queue in (await fleet_state.queues(gateway.redis)).items()}
    return web.json_response({
        "at": time.time(),
        "workers": fleet_state.worker_rows(workers, gateway.heartbeats.earlier(workers)),
        "queues": queues,
    })
