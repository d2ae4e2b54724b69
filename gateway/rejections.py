"""Fleet-wide counts of 429s (a model's queue full), for the console.

A refusal counts in this process at once (a dict add: refusals come in floods, and a Redis round
trip each would load Redis exactly when it is busiest). A supervised task adds the counts into one
Redis hash every `_FLUSH_S`, so any gateway's console shows the whole fleet's totals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from redis.asyncio import Redis

from common import keys
from common.redis_conn import REDIS_UNAVAILABLE
from common.supervision import Supervisor

_FLUSH_S = 2.0


class RejectionTally:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._unflushed: Counter[str] = Counter()

    def add(self, model: str) -> None:
        self._unflushed[model] += 1

    def start(self, supervisor: Supervisor) -> None:
        supervisor.start("rejection_tally", self._loop)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_S)
            with contextlib.suppress(*REDIS_UNAVAILABLE):  # kept for the next flush
                await self.flush()

    async def flush(self) -> None:
        if not self._unflushed:
            return
        counts, self._unflushed = self._unflushed, Counter()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for model, count in counts.items():
                    pipe.hincrby(keys.REJECTIONS, model, count)
                await pipe.execute()
        except BaseException:
            self._unflushed.update(counts)
            raise

    async def totals(self) -> dict[str, int]:
        """Per model: every gateway's flushed count, plus this one's not yet flushed."""
        stored = await self._redis.hgetall(keys.REJECTIONS)
        totals = Counter({model.decode(): int(count) for model, count in stored.items()})
        totals.update(self._unflushed)
        return dict(totals)
