"""Finding jobs whose worker died, and claiming them for this worker.

A worker with free slots looks at the consumers of each of its models' streams (the shared one and
every engine's own) every
`reclaim_interval_s` (XINFO CONSUMERS). A consumer whose heartbeat key `worker:{id}` is missing
on two looks in a row is dead (one missing look may be a heartbeat lapsing across a Redis
restart); its pending entries are claimed with XCLAIM, up to the free slots. XCLAIM's min-idle
guard makes two reclaimers racing for the same entry harmless: the first claim resets the
idle time, so the second claims nothing. A live worker's jobs are never claimed, however long
they run. (Dead consumers with nothing pending are removed by the housekeeping sweep.)

A live worker also looks at its own pending entries (`lost_track`): an entry Redis says it holds
but it does not know of was read, or started, in a write whose reply it never got (a connection
dropped; a Redis failover, where the new primary has the read but the worker gave the batch up).
It takes such entries again; the start script tells whether to continue, skip or ack them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection

from redis.asyncio import Redis

from common import keys
from common.protocol import Job
from common.redis_conn import as_text
from worker.job_reader import Taken

log = logging.getLogger(__name__)


class Reclaimer:
    def __init__(self, redis: Redis, worker_id: str, *, min_idle_ms: int) -> None:
        self._redis = redis
        self._worker_id = worker_id
        self._min_idle_ms = min_idle_ms
        self._suspects: dict[str, set[str]] = defaultdict(set)  # stream -> consumers last seen without heartbeat

    async def claim(self, stream: str, count: int) -> list[Taken]:
        consumers = {as_text(c["name"]): int(c["pending"])
                     for c in await self._redis.xinfo_consumers(stream, keys.CONSUMER_GROUP)}
        consumers.pop(self._worker_id, None)
        if not consumers:
            self._suspects[stream] = set()
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in consumers:
                pipe.exists(keys.worker(name))
            alive = await pipe.execute()
        missing = {name for name, found in zip(consumers, alive, strict=True) if not found}
        dead, self._suspects[stream] = missing & self._suspects[stream], missing

        # A fair share of the orphans, not all of them: spread over the live workers, they do not
        # all die again together if this worker dies next.
        orphans = sum(consumers[name] for name in dead)
        count = min(count, -(-orphans // (len(consumers) - len(missing) + 1)))
        claimed: list[Taken] = []
        for name in sorted(dead):
            if consumers[name] == 0:
                continue
            if len(claimed) >= count:
                break
            rows = await self._redis.xpending_range(stream, keys.CONSUMER_GROUP, min="-", max="+",
                                                    count=count - len(claimed), consumername=name,
                                                    idle=self._min_idle_ms)
            if not rows:
                continue
            entries = await self._redis.xclaim(stream, keys.CONSUMER_GROUP, self._worker_id, self._min_idle_ms,
                                               [row["message_id"] for row in rows])
            for entry_id, fields in entries:
                if fields:  # a deleted entry (its request was cancelled) leaves the PEL unreturned
                    claimed.append(Taken(stream, entry_id, Job.unpack(fields[b"job"])))
            log.warning("reclaimed %d job(s) of dead worker %s", len(entries), name)
        return claimed

    async def lost_track(self, stream: str, held: Collection[bytes], count: int) -> list[Taken]:
        """Up to `count` entries pending to this worker in Redis that it does not hold."""
        rows = await self._redis.xpending_range(stream, keys.CONSUMER_GROUP, min="-", max="+",
                                                count=count + len(held), consumername=self._worker_id)
        lost = [row["message_id"] for row in rows if row["message_id"] not in held][:count]
        if not lost:
            return []
        log.warning("taking back %d job(s) this worker held in Redis but had lost track of", len(lost))
        entries = await self._redis.xclaim(stream, keys.CONSUMER_GROUP, self._worker_id, 0, lost)
        return [Taken(stream, entry_id, Job.unpack(fields[b"job"])) for entry_id, fields in entries if fields]
