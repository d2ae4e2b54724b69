"""What the fleet looks like right now, read from Redis: live workers, and per model the queue.

Shared by the gateway (/ready, /v1/models) and `llm-fleet status`.
"""

from __future__ import annotations

import time
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
    """Per registered model: outstanding jobs (XLEN), of which held by workers (pending) and waiting
    (unread), the age of the oldest unread job, dead letters."""
    names = await model_names(redis)
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.xlen(keys.job_stream(name))
            pipe.xpending(keys.job_stream(name), keys.CONSUMER_GROUP)
            pipe.xlen(keys.dead_letters(name))
            pipe.xinfo_groups(keys.job_stream(name))
        replies = await pipe.execute(raise_on_error=False)
    result = {}
    now_ms = time.time() * 1000
    for i, name in enumerate(names):
        outstanding, pending, dead, groups = replies[4 * i: 4 * i + 4]
        held = 0 if isinstance(pending, ResponseError) else int(pending["pending"])
        result[name] = {"outstanding": int(outstanding), "held_by_workers": held,
                        "waiting": max(0, int(outstanding) - held), "dead_letters": int(dead),
                        "oldest_waiting_s": 0.0}
        if result[name]["waiting"]:
            oldest = await _oldest_unread(redis, name, groups)
            if oldest is not None:
                result[name]["oldest_waiting_s"] = round(max(0.0, now_ms - oldest) / 1000, 3)
    return result


async def _oldest_unread(redis: Redis, model: str, groups: Any) -> int | None:
    """The ms timestamp of the first entry after the group's last-delivered id (stream ids are times)."""
    group = None if isinstance(groups, ResponseError) else next(
        (g for g in groups if g["name"] in (keys.CONSUMER_GROUP, keys.CONSUMER_GROUP.encode())), None)
    start = "-" if group is None else "(" + _text(group["last-delivered-id"])
    entries = await redis.xrange(keys.job_stream(model), min=start, max="+", count=1)
    return int(_text(entries[0][0]).split("-")[0]) if entries else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
