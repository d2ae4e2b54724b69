"""Writes that count only once a replica has them (`WAIT`).

Redis replicates asynchronously: a primary that acknowledged a write and then died may take it with
it, and the replica Sentinel promotes never had it. So every write of a request's life (the
enqueue a 202 answers, a cancel, a worker's start, output and end; common/request_store.py) is
followed, on the same connection, by `WAIT 1 <replica_ack_timeout_ms>`: the write is acknowledged
only once a replica has it too. A write no replica confirmed in time raises `NotReplicatedError`:
the gateway answers 503 (and withdraws the job), a worker sends its flush again (appends are
idempotent), so a failover loses nothing that was acknowledged.

With Sentinel (a `redis+sentinel://` URL: high availability was asked for) a write always needs a
replica: a primary that has lost its replicas, as the old primary does on the wrong side of a
network partition, acknowledges nothing (the fleet answers 503 until a replica is back or Sentinel
has promoted one). With a plain URL the fleet waits only while the primary has replicas: one Redis
(a development fleet) has nothing to wait for. The replica count is looked up every `_LOOK_EVERY_S`
and again after a write came up short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelConnectionPool

from common.redis_conn import REDIS_UNAVAILABLE, NotReplicatedError, SentinelUrl
from common.supervision import Supervisor

log = logging.getLogger(__name__)
_LOOK_EVERY_S = 2.0


class Replication:
    def __init__(self, redis: Redis, *, timeout_ms: int, require_replica: bool) -> None:
        self._redis = redis
        self.timeout_ms = timeout_ms
        self.require_replica = require_replica  # Sentinel: never acknowledge what no replica has
        self.replicas = 0  # connected replicas of the primary, at the last look
        self._look_now = asyncio.Event()

    @property
    def acks_needed(self) -> int:
        return 1 if self.timeout_ms > 0 and (self.replicas or self.require_replica) else 0

    async def start(self, supervisor: Supervisor) -> None:
        """A first look before the process writes anything (Redis may not answer yet: the watcher
        looks again), then one every few seconds."""
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await self.look()
        supervisor.start("replication", self._watch)

    async def look(self) -> None:
        info = await self._redis.info("replication")
        replicas, before = int(info.get("connected_slaves", 0)), self.replicas
        self.replicas = replicas
        if replicas != before:
            stalled = self.require_replica and not replicas
            log.log(logging.WARNING if stalled else logging.INFO, "the Redis primary has %d connected replica(s); "
                    "writes %s", replicas, "are not acknowledged until one connects" if stalled
                    else "wait for one" if self.acks_needed else "do not wait")

    def check(self, acked: object, needed: int) -> None:
        """`acked` is the reply (or the error in its place) of a WAIT for `needed` replicas; raises
        unless that many have the writes."""
        if isinstance(acked, int) and acked >= needed:
            return
        self._look_now.set()  # the replicas may be gone (a failover): count them again
        if isinstance(acked, BaseException):
            raise acked
        raise NotReplicatedError(f"no replica confirmed the write within {self.timeout_ms} ms")

    async def _watch(self) -> None:
        while True:
            came_up_short = self._look_now.is_set()
            self._look_now.clear()
            with contextlib.suppress(*REDIS_UNAVAILABLE):
                if came_up_short:
                    await self._follow_primary()
                await self.look()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._look_now.wait(), _LOOK_EVERY_S)

    async def _follow_primary(self) -> None:
        """A write no replica confirmed may mean this process still talks to a primary the Sentinels
        have replaced (cut off from them by a partition, it answers, but can replicate to no one):
        ask them, and if the primary moved, drop every connection so the next ones go to the new one."""
        pool = self._redis.connection_pool
        if not isinstance(pool, SentinelConnectionPool):
            return
        before = pool.master_address
        now = await pool.get_master_address()
        if before is not None and now != before:
            log.warning("the Sentinels moved the primary from %s to %s; reconnecting", before, now)
            await pool.disconnect()


def replication_for(redis: Redis, url: str, *, timeout_ms: int) -> Replication:
    return Replication(redis, timeout_ms=timeout_ms, require_replica=SentinelUrl.parse(url) is not None)
