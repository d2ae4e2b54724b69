"""What the fleet looks like right now, read from Redis: live workers, and per model the queue.

Shared by the gateway (/ready, /v1/models) and `llm-fleet status`.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common import keys
from common.protocol import WorkerStatus


async def live_workers(redis: Redis) -> list[WorkerStatus]:
    """Workers whose heartbeat has not expired; expired ones are pruned from the set."""
    ids = [i.decode() for i in await redis.smembers(keys.WORKERS)]
    if not ids:
        return []
    raw = await redis.mget([keys.worker(i) for i in ids])
    dead = [i for i, r in zip(ids, raw, strict=True) if r is None]
    if dead:
        await redis.srem(keys.WORKERS, *dead)
    return [WorkerStatus.unpack(r) for r in raw if r is not None]


async def model_names(redis: Redis) -> list[str]:
    """Every model a worker ever registered (the card outlives an unload)."""
    return sorted(name.decode() for name in await redis.hkeys(keys.MODELS))


async def queues(redis: Redis) -> dict[str, dict[str, Any]]:
    """Per registered model: outstanding jobs (XLEN), of which held by workers (pending), dead letters."""
    names = await model_names(redis)
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.xlen(keys.job_stream(name))
            pipe.xpending(keys.job_stream(name), keys.CONSUMER_GROUP)
            pipe.xlen(keys.dead_letters(name))
        replies = await pipe.execute(raise_on_error=False)
    result = {}
    for i, name in enumerate(names):
        outstanding, pending, dead = replies[3 * i: 3 * i + 3]
        held = 0 if isinstance(pending, ResponseError) else int(pending["pending"])
        result[name] = {"outstanding": int(outstanding), "held_by_workers": held,
                        "waiting": max(0, int(outstanding) - held), "dead_letters": int(dead)}
    return result
