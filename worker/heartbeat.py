"""The worker's heartbeat: `worker:{id}` with a TTL, listed in the `workers` set.

A worker whose key expired is dead to the fleet: gateways stop counting it, and (later)
its pending jobs may be reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from common import keys
from common.protocol import WorkerStatus
from common.redis_conn import REDIS_UNAVAILABLE

log = logging.getLogger(__name__)


async def heartbeat(
    redis: Redis, status: Callable[[], Awaitable[WorkerStatus]], interval_s: float, ttl_s: float,
    wake: asyncio.Event | None = None,
) -> None:
    """Beat every `interval_s`, and at once when `wake` is set (a model's state changed)."""
    wake = wake or asyncio.Event()
    while True:
        wake.clear()
        current = await status()
        current.heartbeat_at = time.time()
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.set(keys.worker(current.worker_id), current.pack(), px=int(ttl_s * 1000))
                pipe.sadd(keys.WORKERS, current.worker_id)
                await pipe.execute()
        except REDIS_UNAVAILABLE as exc:
            log.warning("heartbeat failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval_s)


async def remove(redis: Redis, worker_id: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(keys.worker(worker_id))
        pipe.srem(keys.WORKERS, worker_id)
        await pipe.execute()


def model_statuses(statuses: dict[str, object]) -> dict[str, dict[str, object]]:
    return {name: dataclasses.asdict(s) for name, s in statuses.items()}  # type: ignore[call-overload]
