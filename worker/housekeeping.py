"""Fleet-wide housekeeping, run as arq cron jobs: each tick runs on exactly one worker (arq's unique
cron job ids), whichever enqueues it first.

- sweep: drop expired workers from the `workers` set and dead consumers that hold nothing from
  the model groups (consumers that hold jobs stay: reclaimers claim them); warn about jobs held
  by dead workers of a model no live worker serves (nobody can reclaim them until one does);
  delete the own streams (prefix affinity) of dead engines once empty, and their prefix records; drop
  dead workers' consumers of the nudges stream.
- expire: queued jobs whose request expired (its `req:{id}` is gone: the client can no longer
  read a result) are marked skipped (`jobs:{model}:skip`), so they stop counting against
  `max_outstanding`; a worker that reads one acks it without running it. (Deleting an entry no
  worker has read would leave the group's lag, what KEDA scales on, undefined.) Skip marks of
  entries no longer in the stream are dropped; dead letters older than `dead_letter_ttl_s` are trimmed.
- dead_letter_stats: per model, the dead-letter count, how many arrived since the last run and
  the newest reason, in `stats:dead_letters` (shown by `llm-fleet status`), logged when it grows.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common import fleet_state, keys
from common.protocol import SERVING_STATES, Job, unpack
from common.redis_conn import as_text

log = logging.getLogger(__name__)

# A consumer must be silent this long, on top of a missing heartbeat, before it is deleted: a worker
# that just joined reads within a second, so this never races a newcomer.
_DEAD_CONSUMER_IDLE_MS = 60_000
# Queued entries looked at per model and run; a backlog beyond this is finished on later runs.
_EXPIRE_SCAN = 2_000


async def sweep(redis: Redis, *, dead_consumer_idle_ms: int = _DEAD_CONSUMER_IDLE_MS) -> dict[str, int]:
    workers = await fleet_state.live_workers(redis)  # prunes expired ids from `workers`
    live = {w.worker_id for w in workers}
    live_engines = {w.frontend_of or w.worker_id for w in workers}
    served = {name for w in workers for name, m in w.models.items() if m["state"] in SERVING_STATES}
    removed = stranded_total = streams_removed = 0
    models = await fleet_state.model_names(redis)
    for model, streams in (await fleet_state.model_streams(redis, models)).items():
        stranded = 0
        for stream in streams:
            for name, pending, idle_ms in await _dead_consumers(redis, stream, live):
                if pending:
                    if model not in served:
                        stranded += pending
                elif idle_ms >= dead_consumer_idle_ms:
                    await redis.xgroup_delconsumer(stream, keys.CONSUMER_GROUP, name)
                    removed += 1
            engine = keys.engine_of_job_stream(stream)
            if engine is not None and engine not in live_engines:
                streams_removed += await _drop_engine_stream(redis, model, stream, engine)
        # Of the nudges stream, dead workers' consumers go whatever they hold: a nudge is a wake-up, not a job.
        nudges = keys.idle_nudges(model)
        for name, _, idle_ms in await _dead_consumers(redis, nudges, live):
            if idle_ms >= dead_consumer_idle_ms:
                await redis.xgroup_delconsumer(nudges, keys.CONSUMER_GROUP, name)
                removed += 1
        if stranded:
            log.warning("%d job(s) of %s are held by dead workers and no live worker serves the model: "
                        "they wait until one loads it", stranded, model)
        stranded_total += stranded
    return {"live_workers": len(live), "consumers_removed": removed, "stranded_jobs": stranded_total,
            "engine_streams_removed": streams_removed}


async def _dead_consumers(redis: Redis, stream: str, live: set[str]) -> list[tuple[str, int, int]]:
    """(name, entries pending, ms idle) of the stream group's consumers that are not live workers."""
    try:
        consumers = await redis.xinfo_consumers(stream, keys.CONSUMER_GROUP)
    except ResponseError:  # no stream or group yet
        return []
    return [(as_text(c["name"]), int(c["pending"]), int(c["idle"])) for c in consumers
            if as_text(c["name"]) not in live]


# KEYS: the stream, the model's engine-streams set, the engine's prefix record, the waiting engine streams.
# Only an empty stream goes (the others take its entries first, worker/job_reader.py); a job routed there
# later re-creates it.
_DROP_ENGINE_STREAM = """
redis.call('DEL', KEYS[3])
if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[1])
redis.call('ZREM', KEYS[4], KEYS[1])
return 1
"""


async def _drop_engine_stream(redis: Redis, model: str, stream: str, engine: str) -> int:
    return int(await redis.eval(_DROP_ENGINE_STREAM, 4, stream, keys.engine_streams(model),
                                keys.prefix_blocks(model, engine), keys.waiting_engine_streams(model)))


async def expire(redis: Redis, *, dead_letter_ttl_s: int) -> dict[str, int]:
    expired = trimmed = 0
    min_id = f"{int((time.time() - dead_letter_ttl_s) * 1000)}-0"
    models = await fleet_state.model_names(redis)
    for model, streams in (await fleet_state.model_streams(redis, models)).items():
        for stream in streams:
            expired += await _expire_queued(redis, model, stream)
        for batch in (False, True):
            await _forget_skipped_gone(redis, model, keys.skipped_jobs(model, batch=batch))
        trimmed += await redis.xtrim(keys.dead_letters(model), minid=min_id, approximate=False)
    if expired or trimmed:
        log.info("housekeeping: %d expired queued job(s) removed, %d old dead letter(s) trimmed", expired, trimmed)
    return {"expired_jobs": expired, "dead_letters_trimmed": trimmed}


async def _expire_queued(redis: Redis, model: str, stream: str) -> int:
    """Entries after the group's last-delivered id were never read by a worker: those whose request
    expired are marked skipped. Delivered ones are the workers' and reclaimers' business."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no stream yet
        return 0
    entries = await fleet_state.unread_entries(redis, stream, groups, count=_EXPIRE_SCAN)
    if not entries:
        return 0
    request_ids = [Job.unpack(fields[b"job"]).request_id for _, fields in entries]
    async with redis.pipeline(transaction=False) as pipe:
        for request_id in request_ids:
            pipe.exists(keys.request(request_id))
        exists = await pipe.execute()
    gone = [keys.entry_ref(stream, entry_id) for (entry_id, _), found in zip(entries, exists, strict=True)
            if not found]
    if not gone:
        return 0
    return int(await redis.sadd(keys.skip_set_of(stream), *gone))


async def _forget_skipped_gone(redis: Redis, model: str, skipped: str) -> None:
    """Skip marks whose entry is no longer in its stream (removed some other way than a worker's ack)."""
    members = [as_text(m) for m in await redis.srandmember(skipped, _EXPIRE_SCAN) or []]
    if not members:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for ref in members:
            stream, entry_id = keys.stream_of_ref(model, ref)
            pipe.xrange(stream, min=entry_id, max=entry_id, count=1)
        found = await pipe.execute()
    gone = [ref for ref, rows in zip(members, found, strict=True) if not rows]
    if gone:
        await redis.srem(skipped, *gone)


async def dead_letter_stats(redis: Redis) -> dict[str, dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = {}
    previous = {k.decode(): unpack(v) for k, v in (await redis.hgetall(keys.DEAD_LETTER_STATS)).items()}
    for model in await fleet_state.model_names(redis):
        stream = keys.dead_letters(model)
        count = await redis.xlen(stream)
        newest = await redis.xrevrange(stream, count=1)
        fields = newest[0][1] if newest else {}
        stats[model] = {
            "count": count,
            "new": max(0, count - previous.get(model, {}).get("count", 0)),
            "newest_reason": as_text(fields[b"reason"]) if b"reason" in fields else None,
            "at": time.time(),
        }
        if stats[model]["new"]:
            log.warning("%d new dead letter(s) for %s (%d kept); newest: %s", stats[model]["new"], model, count,
                        stats[model]["newest_reason"])
    if stats:
        await redis.hset(keys.DEAD_LETTER_STATS, mapping={m: msgpack.packb(s) for m, s in stats.items()})
    return stats
