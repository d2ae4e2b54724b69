"""What an engine holds in its prefix cache, as the gateways route by it (common/affinity.py), for
engines that do not report it themselves (vLLM does: worker/kv_events.py).

Each job this worker starts leaves its prompt's blocks in the engine's KV cache: their hashes go to
`prefix:{model}:<engine>` scored by the time, and the set is trimmed to the engine's capacity in blocks,
least recently used first, as the cache itself evicts. Writes are batched: one pipeline per
`_FLUSH_INTERVAL_S` for every job started meanwhile, off the path that starts them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from redis.asyncio import Redis

from common import keys
from common.prefix_blocks import block_hashes
from common.redis_conn import REDIS_UNAVAILABLE, describe
from worker.engines.base import Engine

log = logging.getLogger(__name__)

_FLUSH_INTERVAL_S = 0.05


class PrefixRecorder:
    def __init__(self, redis: Redis, engine_id: str) -> None:
        self._redis = redis
        self._engine_id = engine_id
        self._pending: dict[str, tuple[int, dict[str, float]]] = {}  # key -> (capacity in blocks, hash -> time)
        self._wake = asyncio.Event()

    def record(self, engine: Engine, prompt_token_ids: Sequence[int]) -> None:
        block_size = engine.card.prefix_block_size
        if not block_size or engine.reports_prefix_events or len(prompt_token_ids) < block_size:
            return
        key = keys.prefix_blocks(engine.card.name, self._engine_id)
        _, blocks = self._pending.setdefault(key, (engine.kv_capacity_tokens // block_size, {}))
        now = time.time()
        blocks.update((str(h), now) for h in block_hashes(prompt_token_ids, block_size))
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, {}
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key, (capacity, blocks) in pending.items():
                        pipe.zadd(key, blocks)
                        pipe.zremrangebyrank(key, 0, -capacity - 1)
                    await pipe.execute()
            except REDIS_UNAVAILABLE as exc:  # a record is a hint: lost ones cost a cache miss, nothing more
                log.warning("recording prefix blocks failed: %s", describe(exc))
            await asyncio.sleep(_FLUSH_INTERVAL_S)
