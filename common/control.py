"""The model control plane's shared names: arq functions and per-worker queues.

The gateway's admin API enqueues `load_model` / `unload_model` on one worker's own arq queue
(a targeted job with a result); the worker runs them in its control plane (worker/control_plane.py).
"""

from __future__ import annotations

from typing import Any

from arq.connections import ArqRedis
from arq.jobs import Job

from common.errors import NotFound, Unprocessable
from common.protocol import SERVING_STATES, WorkerStatus
from common.redis_conn import connection_pool

LOAD_MODEL = "load_model"
UNLOAD_MODEL = "unload_model"


def control_queue(worker_id: str) -> str:
    return f"arq:control:{{{worker_id}}}"


def arq_client(url: str, *, timeout_s: float, max_connections: int = 32) -> ArqRedis:
    return ArqRedis(connection_pool(url, timeout_s=timeout_s, max_connections=max_connections))


def plan_load(workers: list[WorkerStatus], model: str, *, worker_ids: list[str] | None,
              replicas: int | None) -> list[str]:
    """The workers that should load `model`: the named ones, or enough more to make `replicas` serve it
    (those serving fewest models first). Raises NotFound / Unprocessable with the reason."""
    workers = _controllable(workers)
    by_id = {w.worker_id: w for w in workers}
    able = [w for w in workers if model in w.catalogue]
    if not able:
        raise NotFound(f"no live worker has model {model!r} in its catalogue", param="model")
    if worker_ids is not None:
        unknown = [i for i in worker_ids if i not in by_id]
        if unknown:
            raise NotFound(f"no live worker with id {unknown[0]!r}", param="workers")
        unable = [i for i in worker_ids if model not in by_id[i].catalogue]
        if unable:
            raise Unprocessable(f"worker {unable[0]!r} cannot load {model!r}: not in its catalogue", param="workers")
        return [i for i in worker_ids if not _serves(by_id[i], model)]
    wanted = 1 if replicas is None else replicas
    serving = [w for w in able if _serves(w, model)]
    idle = sorted((w for w in able if not _serves(w, model)), key=lambda w: (len(w.models), w.worker_id))
    missing = wanted - len(serving)
    if missing > len(idle):
        raise Unprocessable(f"{wanted} replicas of {model!r} asked for; only {len(able)} live worker(s) can load it",
                            param="replicas")
    return [w.worker_id for w in idle[:max(0, missing)]]


def plan_unload(workers: list[WorkerStatus], model: str, *, worker_ids: list[str] | None) -> list[str]:
    """The workers that should unload `model`: the named ones, or every one that has it."""
    workers = _controllable(workers)
    by_id = {w.worker_id: w for w in workers}
    if worker_ids is None:
        return [w.worker_id for w in workers if model in w.models]
    unknown = [i for i in worker_ids if i not in by_id]
    if unknown:
        raise NotFound(f"no live worker with id {unknown[0]!r}", param="workers")
    return [i for i in worker_ids if model in by_id[i].models]


async def send(arq: ArqRedis, action: str, model: str, worker_ids: list[str]) -> list[Job]:
    """Enqueue one control job per worker, on that worker's own queue."""
    jobs = []
    for worker_id in worker_ids:
        job = await arq.enqueue_job(action, model, _queue_name=control_queue(worker_id))
        assert job is not None  # only a caller-chosen duplicate _job_id returns None
        jobs.append(job)
    return jobs


async def outcome(job: Job, timeout_s: float) -> dict[str, Any]:
    """A control job's result as `{ok, result}` or `{ok: false, error}` (the worker's exception message)."""
    try:
        result = await job.result(timeout=timeout_s, poll_delay=0.2)
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {timeout_s:g}s; the job may still be running"}
    except Exception as exc:  # the worker's exception, re-raised by arq: its message is the reason
        return {"ok": False, "error": str(exc) or type(exc).__name__}
    return {"ok": True, "result": result}


def _controllable(workers: list[WorkerStatus]) -> list[WorkerStatus]:
    """Workers that take control jobs: a front-end process loads and unloads with its worker's model."""
    return [w for w in workers if not w.frontend_of]


def _serves(worker: WorkerStatus, model: str) -> bool:
    state = worker.models.get(model, {}).get("state")
    return state in SERVING_STATES
