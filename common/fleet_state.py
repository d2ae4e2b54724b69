"""What the fleet looks like right now, read from Redis: live workers, and per model the queue.

Shared by the gateway (/ready, /v1/models, the console's /v1/fleet) and `llm-fleet status`.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError
from typing_extensions import TypedDict

from common import keys
from common.protocol import WorkerStatus
from common.redis_conn import as_text


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


def worker_rows(workers: list[WorkerStatus], before: list[WorkerStatus]) -> list[dict[str, Any]]:
    """One row per live worker; tokens/s from two heartbeats' output token counts (`before`: earlier ones)."""
    earlier_by_id = {w.worker_id: w for w in before}
    rows = []
    for worker in sorted(workers, key=lambda w: w.worker_id):
        earlier = earlier_by_id.get(worker.worker_id)
        elapsed = worker.heartbeat_at - earlier.heartbeat_at if earlier else 0.0
        rate = (worker.tokens_out - earlier.tokens_out) / elapsed if earlier and elapsed > 0 else None
        rows.append({"worker_id": worker.worker_id, "host": worker.host, "pid": worker.pid, "state": worker.state,
                     "uptime_s": round(time.time() - worker.started_at, 1), "tokens_out": worker.tokens_out,
                     "tokens_per_s": None if rate is None else round(rate, 1), "models": worker.models,
                     "catalogue": worker.catalogue, "gpu": worker.gpu})
    return rows


class HeartbeatHistory:
    """Each worker's previous heartbeat, for rates between looks of any cadence (the console polls
    every few seconds, and may look twice within one heartbeat)."""

    def __init__(self) -> None:
        self._beats: dict[str, tuple[WorkerStatus, WorkerStatus | None]] = {}  # id -> (newest, the one before)

    def earlier(self, workers: list[WorkerStatus]) -> list[WorkerStatus]:
        """Record `workers` (a fresh look); the heartbeat of each that came before its current one."""
        beats = {}
        for worker in workers:
            newest, before = self._beats.get(worker.worker_id, (None, None))
            if newest is None or worker.heartbeat_at > newest.heartbeat_at:
                newest, before = worker, newest
            beats[worker.worker_id] = (newest, before)
        self._beats = beats  # workers no longer live are forgotten
        return [before for _, before in beats.values() if before is not None]


async def model_names(redis: Redis) -> list[str]:
    """Every model a worker ever registered (the card outlives an unload)."""
    return sorted(name.decode() for name in await redis.hkeys(keys.MODELS))


async def model_streams(redis: Redis, models: list[str]) -> dict[str, list[str]]:
    """Per model, every stream of it: the shared one, the batch one, then each engine's own (prefix affinity)."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in models:
            pipe.smembers(keys.engine_streams(name))
        members = await pipe.execute()
    return {name: [keys.job_stream(name), keys.batch_stream(name), *sorted(as_text(s) for s in engines)]
            for name, engines in zip(models, members, strict=True)}


class QueueState(TypedDict):
    """A model's queue over all its streams (see `queues`); also the body of the gateway's GET /queue/{model}."""

    outstanding: int
    held_by_workers: int
    waiting: int
    waiting_in_engine_streams: int
    batch_outstanding: int
    batch_waiting: int
    dead_letters: int
    lag: int | None
    oldest_waiting_s: float


async def queues(redis: Redis, models: list[str] | None = None) -> dict[str, QueueState]:
    """Per registered model (or per one of `models`), over all its streams (the shared one, the batch one
    and each engine's own): outstanding jobs (XLEN less the skipped: cancelled or expired while queued), of
    which held by workers (pending) and waiting (unread), how many of those wait in engines' own streams, the
    batch class's share (`batch_outstanding`, `batch_waiting`), the age of the oldest unread entry, dead
    letters, and `lag` (XINFO GROUPS; skipped entries count until a worker reads them)."""
    streams = await model_streams(redis, await model_names(redis) if models is None else models)
    async with redis.pipeline(transaction=False) as pipe:
        for name, stream_names in streams.items():
            pipe.xlen(keys.dead_letters(name))
            pipe.scard(keys.skipped_jobs(name))
            pipe.scard(keys.skipped_jobs(name, batch=True))
            for stream in stream_names:
                pipe.xlen(stream)
                pipe.xpending(stream, keys.CONSUMER_GROUP)
                pipe.xinfo_groups(stream)
        replies = iter(await pipe.execute(raise_on_error=False))
    result = {}
    now_ms = time.time() * 1000
    for name, stream_names in streams.items():
        dead, skipped, batch_skipped = next(replies), next(replies), next(replies)
        length = held = lag = engine_waiting = batch_length = batch_held = 0
        lag_known, oldest_ms = False, None
        for stream in stream_names:
            stream_length, pending, groups = next(replies), next(replies), next(replies)
            stream_held = 0 if isinstance(pending, ResponseError) else int(pending["pending"])
            length, held = length + int(stream_length), held + stream_held
            if keys.is_batch_stream(stream):
                batch_length, batch_held = int(stream_length), stream_held
            elif stream != keys.job_stream(name):
                engine_waiting += max(0, int(stream_length) - stream_held)
            group = None if isinstance(groups, ResponseError) else _workers_group(groups)
            if group is not None and group.get("lag") is not None:
                lag, lag_known = lag + int(group["lag"]), True
            if int(stream_length) > stream_held and not isinstance(groups, ResponseError):
                oldest = await unread_entries(redis, stream, groups, count=1)
                if oldest:  # stream ids are millisecond times
                    added_ms = int(as_text(oldest[0][0]).split("-")[0])
                    oldest_ms = added_ms if oldest_ms is None else min(oldest_ms, added_ms)
        outstanding = max(0, length - int(skipped) - int(batch_skipped))
        batch_outstanding = max(0, batch_length - int(batch_skipped))
        result[name] = QueueState(
            outstanding=outstanding, held_by_workers=held, waiting=max(0, outstanding - held),
            waiting_in_engine_streams=engine_waiting, batch_outstanding=batch_outstanding,
            batch_waiting=max(0, batch_outstanding - batch_held), dead_letters=int(dead),
            lag=lag if lag_known else None,
            oldest_waiting_s=0.0 if oldest_ms is None else round(max(0.0, now_ms - oldest_ms) / 1000, 3))
    return result


async def unread_entries(redis: Redis, stream: str, groups: list[dict[str, Any]], *,
                         count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The first `count` entries no worker has read yet: those after the workers group's last-delivered
    id (`groups` is XINFO GROUPS of the stream; without the group, every entry is unread)."""
    group = _workers_group(groups)
    start = "-" if group is None else "(" + as_text(group["last-delivered-id"])
    return await redis.xrange(stream, min=start, max="+", count=count)


def _workers_group(groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((g for g in groups if as_text(g["name"]) == keys.CONSUMER_GROUP), None)
