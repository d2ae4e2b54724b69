"""The worker's control plane: an arq worker on this worker's own queue, in the same event loop.

Targeted jobs: `load_model` / `unload_model` (enqueued by the gateway's admin API on
`arq:control:{worker_id}`), with results the caller can wait for. Cron: fleet housekeeping
(worker/housekeeping.py), each tick run once fleet-wide. arq's poll loop dies with its Redis
connection, so it is restarted with backoff: a Redis restart costs control jobs a few seconds,
never the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from arq import cron
from arq.worker import Worker as ArqWorker
from arq.worker import func

from common.control import LOAD_MODEL, UNLOAD_MODEL, arq_client, control_queue
from common.redis_conn import REDIS_UNAVAILABLE
from common.settings import WorkerSettings
from worker import housekeeping

log = logging.getLogger(__name__)


class ModelHost(Protocol):
    async def load(self, name: str) -> dict[str, object]: ...
    async def unload(self, name: str) -> dict[str, object]: ...


async def _load_model(ctx: dict[str, Any], name: str) -> dict[str, object]:
    return await ctx["host"].load(name)


async def _unload_model(ctx: dict[str, Any], name: str) -> dict[str, object]:
    return await ctx["host"].unload(name)


async def _sweep(ctx: dict[str, Any]) -> dict[str, int]:
    return await housekeeping.sweep(ctx["redis"])


async def _expire(ctx: dict[str, Any]) -> dict[str, int]:
    return await housekeeping.expire(ctx["redis"], dead_letter_ttl_s=ctx["settings"].dead_letter_ttl_s)


async def _dead_letter_stats(ctx: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return await housekeeping.dead_letter_stats(ctx["redis"])


FUNCTIONS = [func(_load_model, name=LOAD_MODEL), func(_unload_model, name=UNLOAD_MODEL)]
CRON_JOBS = [
    cron(_sweep, name="housekeeping:sweep", second=set(range(0, 60, 10)), max_tries=1),
    cron(_expire, name="housekeeping:expire", second=30, max_tries=1),
    cron(_dead_letter_stats, name="housekeeping:dead_letter_stats", second=45, max_tries=1),
]


async def run_control_plane(host: ModelHost, worker_id: str, settings: WorkerSettings) -> None:
    """Serve control jobs until cancelled."""
    delay = 0.25
    while True:
        started = time.monotonic()
        redis = arq_client(settings.redis_url, timeout_s=5.0)
        arq = ArqWorker(
            FUNCTIONS, cron_jobs=CRON_JOBS, queue_name=control_queue(worker_id), redis_pool=redis,
            ctx={"host": host, "settings": settings}, handle_signals=False,
            job_timeout=settings.control_job_timeout_s, max_tries=1, keep_result=3600, poll_delay=0.2,
            max_jobs=4,  # a load and an unload of different models may run side by side
        )
        try:
            await arq.main()
        except Exception as exc:  # Redis gone, or an arq error: restart, never take the worker down
            # Back off while it lasts; start over from 0.5 s after a run of a minute or more.
            delay = 0.5 if time.monotonic() - started > 60 else min(delay * 2, 10.0)
            log.warning("control plane stopped, restarting in %.1fs: %s", delay, exc,
                        exc_info=not isinstance(exc, REDIS_UNAVAILABLE))
        finally:
            for task in list(arq.tasks.values()):
                task.cancel()
            with contextlib.suppress(*REDIS_UNAVAILABLE):
                await redis.connection_pool.disconnect()
        await asyncio.sleep(delay)
