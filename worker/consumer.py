"""The worker's life, top to bottom (after arq's Worker):

main -> load (per model, at start or from a control job) -> _serve_model (register; reclaim dead
        workers' jobs, take jobs (worker/job_reader.py: the engine's own stream, the shared one, other
        engines' waiting too long, then the batch stream), as the KV budget allows; record the prompts'
        prefix blocks; while batch jobs fill the engine, take interactive ones anyway and preempt batch
        jobs for them: _yield_to_interactive)
     -> _run_job (engine stream -> publisher -> finish -> XACK+XDEL)
plus heartbeat, the cancel listener, the control plane (arq: load/unload, housekeeping cron), and
a SIGTERM path: stop reading, let in-flight jobs finish for `drain_timeout_s`, hand back (re-queue,
to be continued elsewhere) what is left, exit. Unloading one model is the same path for one model.

Every stream entry this worker holds (read or claimed, not yet acked) is in `_held`, so a drain
knows what to hand back. Every long-lived task runs under `common.supervision`: a crash is logged,
counted and restarted, and one that keeps crashing stops the worker with exit 1 (its supervisor
restarts it; its jobs are handed back or reclaimed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from redis.asyncio import Redis
from tokenizers import Tokenizer

from common import heap, keys
from common.protocol import FinishReason, Job, ModelState, WorkerStatus
from common.redis_conn import REDIS_UNAVAILABLE, as_text, connect, describe
from common.replication import replication_for
from common.request_store import RequestStore
from common.settings import ModelSpec, WorkerSettings
from common.supervision import Supervisor
from worker import heartbeat, http_server, kv_events
from worker.continuation import Continuation, Decode, fresh, resume
from worker.control_plane import run_control_plane
from worker.engines.base import Engine, EngineOutput
from worker.frontends import FrontendProcess
from worker.gpu_stats import GpuProbe
from worker.job_reader import JobReader, Taken, ensure_groups
from worker.kv_budget import KvBudget
from worker.loader import ModelLoader, frontend_share
from worker.metrics import WorkerMetrics
from worker.prefix_recorder import PrefixRecorder
from worker.publisher import ChunkPublisher
from worker.reclaimer import Reclaimer

log = logging.getLogger(__name__)

# The most jobs one XREADGROUP takes; the KV budget usually allows fewer.
_MAX_READ_BATCH = 64
# Unread jobs of the engine's own stream moved to the shared stream when it stops serving a model: more
# than the gateways route to one engine (affinity_queue_batches x its max_num_seqs) before they see it go.
_RELEASE_COUNT = 10_000
# After the drain's grace period: how long handing back the remaining jobs may take.
_HAND_BACK_TIMEOUT_S = 10.0
# How long a cancelled task may take to end before a stop goes on without it.
_CANCEL_TIMEOUT_S = 5.0
# How often the worker checks that its engines (and their front-end processes) are alive.
_ENGINE_CHECK_INTERVAL_S = 1.0
# While interactive work is on an engine, a running batch job beyond the batch's share with more than this
# many tokens to go is preempted (parked, continued later): the engine is free of batch work within this many
# steps, not after the longest answer a batch line asked for; a job closer to its end finishes instead.
_DRAIN_TOKENS = 64
# How often a worker running batch jobs looks whether interactive work came to its engine (on any front-end).
_DRAIN_CHECK_S = 0.01

T = TypeVar("T")


class _AfterAbort(enum.Enum):
    HAND_BACK = enum.auto()
    PARK = enum.auto()


class Worker:
    def __init__(self, settings: WorkerSettings, catalogue: dict[str, ModelSpec],
                 frontend: FrontendProcess | None = None) -> None:
        unknown = [name for name in settings.models if name not in catalogue]  # fail at start, not at load
        if unknown:
            raise ValueError(f"models not in the catalogue: {', '.join(unknown)}")
        self.settings = settings
        self.catalogue = catalogue
        self.worker_id = settings.worker_id
        self.redis: Redis = connect(settings.redis_url, timeout_s=5.0, blocking_ms=settings.read_block_ms)
        self.replication = replication_for(self.redis, settings.redis_url, timeout_ms=settings.replica_ack_timeout_ms)
        self.store = RequestStore(self.redis, self.replication)
        # A front-end process of another worker's model (worker/frontends.py): it serves that one model
        # and takes no control jobs; its worker loads, unloads and stops it.
        self.frontend = frontend
        # The engine this process feeds: a worker and its front-end processes share one (and its cache).
        self.engine_id = frontend.parent_id if frontend else self.worker_id
        self.prefixes = PrefixRecorder(self.redis, self.engine_id)
        self.loader = ModelLoader(settings, on_loaded=lambda engine: self._retrying(lambda: self._register(engine)),
                                  role=frontend.role if frontend else None)
        self.publisher = ChunkPublisher(
            self.redis, self.store, self.worker_id,
            flush_interval_s=settings.flush_interval_ms / 1000,
            request_ttl_s=settings.request_ttl_s,
            result_ttl_s=settings.result_ttl_s,
            on_lost=self._abort,
        )
        self.supervisor = Supervisor(on_crash=lambda task: self.metrics.task_crashes.labels(task).inc(),
                                     on_failed=self._task_failed)
        self.reclaimer = Reclaimer(self.redis, self.worker_id, min_idle_ms=settings.reclaim_min_idle_ms)
        self.budgets: dict[str, KvBudget] = {}
        self._running: dict[str, Engine] = {}  # request id -> the engine generating it
        self._running_batch: dict[str, Job] = {}  # request id -> its job, for running batch jobs
        self._held: dict[str, dict[bytes, Job]] = {}  # stream -> entries read or claimed, not yet acked
        # Request ids aborted on purpose -> what their _run_job does after: hand the job back to its stream
        # (a stop's drain), or park it (a batch job making way for interactive work).
        self._aborted: dict[str, _AfterAbort] = {}
        # model -> preempted batch jobs, still held (their entries not acked), to run again first when batch
        # room returns: continued from their stored output, ahead of the batch's later lines.
        self._parked: dict[str, list[Taken]] = {}
        self._decoders: dict[str, Decode] = {}  # model -> detokenizer, for continuations
        self._readers: dict[str, asyncio.Task[None]] = {}  # model -> its _serve_model task
        self._job_readers: dict[str, JobReader] = {}  # model -> where its _serve_model takes jobs from
        self._event_followers: dict[str, asyncio.Task[None]] = {}  # model -> its engine's KV cache events
        self._yielders: dict[str, asyncio.Task[None]] = {}  # model -> its _yield_to_interactive task
        self._closing: set[str] = set()  # models whose reader is to stop after its current read
        self._in_redis: dict[str, int] = {}  # model -> its reader loops in a stream read or claim now
        self._out_of_redis: dict[str, asyncio.Event] = {}  # model -> set while none of them is
        self._jobs: dict[str, set[asyncio.Task[None]]] = {}  # model -> its running _run_job tasks
        self._state = "starting"
        self._started_at = time.time()
        self._stop = asyncio.Event()
        self._beat_now = asyncio.Event()  # set: heartbeat at once (a model's state changed)
        self._gpu = GpuProbe()
        self.exit_code = 0  # 1 once an engine died: the supervisor (fleet, Kubernetes) restarts us
        self.metrics = WorkerMetrics(self.worker_id)
        self.http_port: int | None = None  # where /health, /ready, /metrics listen (when http_port is set)

    # -- life ---------------------------------------------------------------------------
    async def main(self, *, handle_signals: bool = True) -> None:
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, self.stop)
        log.info("worker %s starting, models: %s", self.worker_id, self.settings.models)
        http = None
        if self.settings.http_port is not None:
            http = await http_server.serve(
                self.settings.http_host, self.settings.http_port, self.status, self.metrics,
                lambda: [url for group in self.loader.frontends.values() for url in group.metrics_urls])
            self.http_port = http_server.bound_port(http)
            log.info("worker HTTP (/health, /ready, /metrics) on %s:%d", self.settings.http_host, self.http_port)
        await self.replication.start(self.supervisor)
        for name in self.settings.models:
            self._start_model(name)
        self.supervisor.start("heartbeat", lambda: heartbeat.heartbeat(
            self.redis, self.status, self.settings.heartbeat_interval_s, self.settings.heartbeat_ttl_s, self._beat_now))
        self.supervisor.start("publisher", self.publisher.run)
        self.supervisor.start("prefix_recorder", self.prefixes.run)
        self.supervisor.start("cancel_listener", self._listen_for_cancels)
        self.supervisor.start("engine_watch", self._watch_engines)
        control = None if self.frontend else self.supervisor.start(
            "control_plane", lambda: run_control_plane(self, self.worker_id, self.settings))
        self._state = "serving"
        await self._stop.wait()

        self._state = "draining"
        if control is not None:
            await _cancel(control)  # no loads during a drain
        log.info("draining %d in-flight jobs", sum(len(jobs) for jobs in self._jobs.values()))
        await asyncio.gather(*(self._stop_model(name) for name in list(self._readers)))
        await self.supervisor.stop()
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await heartbeat.remove(self.redis, self.worker_id)
        await self.loader.close()
        if http is not None:
            await http.cleanup()
        await self.redis.aclose()
        log.info("worker %s stopped", self.worker_id)

    async def _stop_model(self, name: str) -> None:
        """Stop reading the model's stream, let its jobs finish for `drain_timeout_s`, then abort what
        still runs and re-queue every held job, with what it emitted so far, so another worker
        continues it. Scaling in or unloading loses nothing."""
        self.loader.begin_unload(name)
        reader = self._readers.pop(name, None)
        yielder = self._yielders.pop(name, None)
        if reader is not None:
            # Let a read in flight return (XREADGROUP blocks read_block_ms at most) rather than cancel it:
            # redis-py 5 can lose the cancellation of a blocked read and hang. The reader loops waiting for KV
            # room are woken and return.
            self._closing.add(name)
            if name in self.budgets:
                self.budgets[name].wake()  # a loop waiting for room sees `_closing` and returns
            if self._in_redis.get(name):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._out_of_redis[name].wait(), self.settings.read_block_ms / 1000 + 2.0)
            # Ended, not cancelled, where possible: a cancelled task keeps its frames (and the engine) alive.
            await asyncio.wait({t for t in (reader, yielder) if t is not None}, timeout=1.0)
            await _cancel(reader)
        if yielder is not None:
            await _cancel(yielder)
        jobs = self._jobs.get(name, set())
        if jobs:
            await asyncio.wait(jobs, timeout=self.settings.drain_timeout_s)
        if jobs:
            log.warning("handing back %d unfinished %s job(s)", len(jobs), name)
            for request_id, engine in list(self._running.items()):
                if engine.card.name == name:
                    self._aborted[request_id] = _AfterAbort.HAND_BACK
                    engine.abort(request_id)  # its _run_job flushes what it has, then hands it back
            _, late = await asyncio.wait(jobs, timeout=_HAND_BACK_TIMEOUT_S)
            for task in late:
                task.cancel()
        follower = self._event_followers.pop(name, None)
        if follower is not None:
            await _cancel(follower)
        reader = self._job_readers.pop(name, None)
        if reader is not None:  # routed here and not read yet: to the shared stream, for whoever has room
            with contextlib.suppress(*REDIS_UNAVAILABLE):
                for taken in await self._parse(await reader.unread_own(_RELEASE_COUNT)):
                    self._hold(taken)
        self._parked.pop(name, None)  # held: handed back with the rest
        for taken in self._held_of(name):  # read, never started (no KV room), or parked
            with contextlib.suppress(*REDIS_UNAVAILABLE):
                await self._hand_back(taken)

    # -- models: load at start or on a control job, unload on a control job ------------------
    def _start_model(self, name: str) -> None:
        self._closing.discard(name)
        self.loader.start(self.catalogue[name])
        spec = self.catalogue[name]
        self._readers[name] = self.supervisor.start(f"reader:{name}", lambda: self._serve_model(spec))

    async def load(self, name: str) -> dict[str, object]:
        """Load a catalogue model (a no-op when it is loaded or loading) and serve it once ready.
        Returns the model's status; raises with the reason when the load fails."""
        if name not in self.catalogue:
            raise ValueError(f"model {name!r} is not in this worker's catalogue "
                             f"({', '.join(sorted(self.catalogue))})")
        if self._stop.is_set():
            raise RuntimeError("the worker is shutting down")
        status = self.loader.status.get(name)
        if status is not None and status.state == ModelState.UNLOADING:
            raise RuntimeError(f"model {name!r} is unloading; load it again once that is done")
        if status is None or status.state == ModelState.FAILED:
            if status is not None:
                await self._stop_model(name)
                await self.loader.unload(name)
            log.info("loading model %s", name)
            self._start_model(name)
        self._beat_now.set()
        try:
            await self.loader.ready(name)
        finally:
            self._beat_now.set()
        return dataclasses.asdict(self.loader.status[name])

    async def unload(self, name: str) -> dict[str, object]:
        """Stop serving a model: its running jobs finish within `drain_timeout_s` or are handed back
        to be continued elsewhere; then the engine is freed. The card stays in `models` (the gateway
        keeps knowing the model and answers 503 while no worker serves it)."""
        status = self.loader.status.get(name)
        if status is None:
            return {"state": "not loaded"}
        log.info("unloading model %s", name)
        status.state = ModelState.UNLOADING
        self._beat_now.set()
        await self._stop_model(name)
        await self.loader.unload(name)
        self.budgets.pop(name, None)
        self._decoders.pop(name, None)
        # The engine's objects were frozen with it: let them go, once this call's frames (which may still
        # reach them through a traceback) are gone.
        asyncio.get_running_loop().call_soon(heap.refreeze)
        self._beat_now.set()
        log.info("model %s unloaded", name)
        return {"state": "unloaded"}

    def stop(self) -> None:
        self._stop.set()

    def _task_failed(self, task: str) -> None:
        """A long-lived task kept crashing: this worker cannot serve; its supervisor restarts it."""
        log.error("task %s cannot recover; stopping the worker so that it is restarted", task)
        self.exit_code = 1
        self.stop()

    async def status(self) -> WorkerStatus:
        models = {}
        for name, status in self.loader.status.items():
            budget = self.budgets.get(name)
            if budget is not None:
                status.kv_used_tokens, status.running = budget.used_tokens, budget.held_seqs
                status.running_batch = len(budget.batch_jobs)
            engine = self.loader.engines.get(name)
            if engine is not None:
                stats = engine.stats()
                status.engine_running, status.engine_waiting, status.engine_kv_usage = (
                    stats.running, stats.waiting, stats.kv_usage)
            models[name] = status
        return WorkerStatus(
            worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(), state=self._state,
            started_at=self._started_at, heartbeat_at=time.time(), models=heartbeat.model_statuses(models),
            gpu=await asyncio.to_thread(self._gpu.read), tokens_out=self.publisher.tokens_out,
            catalogue=[] if self.frontend else sorted(self.catalogue),
            frontend_of=self.frontend.parent_id if self.frontend else "",
        )

    # -- one model's streams ------------------------------------------------------------
    async def _serve_model(self, spec: ModelSpec) -> None:
        try:
            engine = await self.loader.ready(spec.name)
        except Exception:
            if self.frontend is not None:  # a front-end is its model or nothing: its worker restarts the group
                self.exit_code = 1
                self.stop()
            return  # the loader logged it; the heartbeat reports the model as failed
        heap.freeze()  # the engine's objects live as long as the model: out of the collector's sight
        budget = self.budgets.get(spec.name)
        if budget is None:
            budget = self.budgets[spec.name] = KvBudget(*frontend_share(engine, spec), engine.kv_block_size,
                                                        oversubscription=spec.kv_oversubscription,
                                                        batch_share=self.settings.batch_share_with_interactive,
                                                        board=self.loader.boards.get(spec.name))
            log.info("model %s ready: %d KV tokens, %d sequences", spec.name, budget.capacity_tokens,
                     budget.max_seqs)
        if engine.prefix_events_endpoint is not None and spec.name not in self._event_followers:
            endpoint = engine.prefix_events_endpoint
            self._event_followers[spec.name] = self.supervisor.start(
                f"kv_events:{spec.name}", lambda: kv_events.follow(self.redis, endpoint, spec.name, self.engine_id))
        reader = self._job_readers[spec.name] = JobReader(
            self.redis, self.worker_id, self.engine_id, spec.name, wait_ms=self.settings.affinity_wait_ms,
            block_ms=self.settings.read_block_ms)
        await self._hand_back_unstarted(spec.name, budget)  # what an earlier run of this reader left (a crash)
        earlier = self._yielders.pop(spec.name, None)  # of a run of this reader that crashed
        if earlier is not None:
            await _cancel(earlier)
        self._yielders[spec.name] = self.supervisor.start(
            f"yield:{spec.name}", lambda: self._yield_to_interactive(spec, engine, budget, reader))
        await self._take_jobs(spec, engine, budget, reader)

    async def _take_jobs(self, spec: ModelSpec, engine: Engine, budget: KvBudget, reader: JobReader) -> None:
        """Fill free slots: reclaimed jobs, then interactive ones, then batch ones."""
        next_reclaim = 0.0
        while spec.name not in self._closing:
            await budget.wait_until(lambda: spec.name in self._closing or budget.free_seqs > 0)
            if spec.name in self._closing:
                return
            free = min(budget.free_seqs, _MAX_READ_BATCH)
            try:
                claimed: list[Taken] = []
                if time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + self.settings.reclaim_interval_s
                    with self._redis_call(spec.name):
                        claimed = await self._reclaim(reader, free)
                if claimed:
                    for taken in claimed:
                        self._hold(taken)
                    self.metrics.reclaimed.labels(spec.name).inc(len(claimed))
                    await self._start_jobs(engine, budget, claimed)
                    continue
                batch_room = budget.batch_room()
                parked = self._parked.get(spec.name)
                if parked and batch_room > 0:
                    count = min(batch_room, free)
                    resumed, parked[:] = parked[:count], parked[count:]
                    await self._start_jobs(engine, budget, resumed)
                    continue
                # Kept from batch jobs for now: look again once interactive work is served.
                quiet_ms = int(budget.interactive_quiet_in() * 1000) + 1 if batch_room < free else None
                with self._redis_call(spec.name):
                    entries = await reader.read(free, batch=batch_room, block_ms=quiet_ms)
            except REDIS_UNAVAILABLE as exc:
                log.warning("taking jobs of %s failed: %s", spec.name, describe(exc))
                await asyncio.sleep(1.0)
                continue
            jobs = await self._held_jobs(reader, entries)
            if spec.name in self._closing:
                return  # _stop_model hands back what was just read
            await self._start_jobs(engine, budget, await self._within_batch_room(budget, jobs))

    async def _within_batch_room(self, budget: KvBudget, jobs: list[Taken]) -> list[Taken]:
        """The jobs to start: a blocking read may return batch jobs that arrived after interactive work came
        to the engine (on another of its front-ends); those beyond the batch's room go back to its stream."""
        room = budget.batch_room()
        kept: list[Taken] = []
        for taken in jobs:
            if taken.job.is_batch and room <= 0:
                await self._retrying(lambda taken=taken: self._hand_back(taken))
                continue
            room -= taken.job.is_batch
            kept.append(taken)
        return kept

    async def _yield_to_interactive(self, spec: ModelSpec, engine: Engine, budget: KvBudget,
                                    reader: JobReader) -> None:
        """Running batch jobs make way for interactive ones: in a full engine (`_take_into_full_engine`), and
        beyond the batch's share once interactive work is on the engine (`_drain_batch_jobs`). A preempted job
        is parked with its output so far stored, and continued from there when batch room returns."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._take_into_full_engine(spec, engine, budget, reader))
            group.create_task(self._drain_batch_jobs(spec, budget))

    async def _take_into_full_engine(self, spec: ModelSpec, engine: Engine, budget: KvBudget,
                                     reader: JobReader) -> None:
        """While batch jobs fill every slot, interactive jobs are taken anyway, as many as there are batch
        jobs to preempt; each preempted job's slot is reserved for an interactive one."""
        while spec.name not in self._closing:
            await budget.wait_until(lambda: spec.name in self._closing
                                    or (budget.free_seqs <= 0 and bool(self._preemptible(budget))))
            if spec.name in self._closing:
                return
            try:
                with self._redis_call(spec.name):
                    entries = await reader.read_interactive(len(self._preemptible(budget)))
            except REDIS_UNAVAILABLE as exc:
                log.warning("looking for interactive jobs of %s failed: %s", spec.name, describe(exc))
                await asyncio.sleep(1.0)
                continue
            jobs = await self._held_jobs(reader, entries)
            if spec.name in self._closing:
                return  # _stop_model hands back what was just read
            if not jobs:
                continue
            short = max(0, len(jobs) - max(0, budget.free_seqs))  # slots may have freed while the read blocked
            budget.reserve(len(jobs))
            for request_id in self._preemptible(budget)[:short]:
                self._preempt(spec, budget, request_id)
            await self._start_jobs(engine, budget, jobs, reserved=True)

    async def _drain_batch_jobs(self, spec: ModelSpec, budget: KvBudget) -> None:
        """While interactive work is on the engine (here or on another of its front-ends), running batch jobs
        beyond the share with more than _DRAIN_TOKENS to go are preempted, the most to go first: a batch of
        long answers would otherwise hold the engine's steps long for as long as they take."""
        while spec.name not in self._closing:
            await budget.wait_until(lambda: spec.name in self._closing or len(budget.batch_jobs) > budget.batch_limit)
            if spec.name in self._closing:
                return
            if budget.interactive_quiet_in() > 0.0:
                to_go = {request_id: self._tokens_to_go(request_id) for request_id in self._preemptible(budget)}
                long = sorted((r for r, n in to_go.items() if n > _DRAIN_TOKENS), key=to_go.__getitem__, reverse=True)
                for request_id in long[:len(budget.batch_jobs) - budget.batch_limit]:
                    self._preempt(spec, budget, request_id)
            await asyncio.sleep(_DRAIN_CHECK_S)

    def _tokens_to_go(self, request_id: str) -> int:
        job = self._running_batch[request_id]
        return int(job.sampling["max_tokens"]) - self.publisher.completion_tokens(request_id)

    def _preempt(self, spec: ModelSpec, budget: KvBudget, request_id: str) -> None:
        """Abort a running batch job; its _run_job stores its output so far and parks it."""
        log.info("preempting batch job for interactive work", extra={"request_id": request_id})
        self._aborted[request_id] = _AfterAbort.PARK
        self._running[request_id].abort(request_id)
        # Its slot is free now, not once its output is stored: the engine drops the aborted sequence at its
        # next step, so it runs one over its limit for a step at most.
        budget.release(request_id)
        self.metrics.preempted.labels(spec.name).inc()

    async def _held_jobs(self, reader: JobReader, entries: list[tuple[str, bytes, dict[bytes, bytes]]]) -> list[Taken]:
        """The jobs of entries just read, held (and counted by where they came from)."""
        jobs = await self._parse(entries)
        for taken in jobs:
            self._hold(taken)
            self.metrics.jobs_taken.labels(reader.model, _source(reader, taken.stream)).inc()
        return jobs

    def _preemptible(self, budget: KvBudget) -> list[str]:
        """Batch jobs running here that are not aborted already, the last admitted first."""
        return [request_id for request_id in budget.batch_jobs
                if request_id in self._running and request_id not in self._aborted]

    async def _reclaim(self, reader: JobReader, count: int) -> list[Taken]:
        """Entries of the model's streams this worker holds in Redis but lost track of, else a dead worker's."""
        streams = await reader.streams()
        for stream in streams:
            claimed = await self.reclaimer.lost_track(stream, self._held.get(stream, {}).keys(), count)
            if claimed:
                return claimed
        for stream in streams:
            claimed = await self.reclaimer.claim(stream, count)
            if claimed:
                return claimed
        return []

    def _hold(self, taken: Taken) -> None:
        self._held.setdefault(taken.stream, {})[taken.entry_id] = taken.job

    def _held_of(self, model: str) -> list[Taken]:
        """Every entry of the model's streams this worker holds, as a list (handing back changes `_held`)."""
        return [Taken(stream, entry_id, job) for stream, held in self._held.items()
                if keys.model_of_job_stream(stream) == model for entry_id, job in held.items()]

    async def _parse(self, entries: list[tuple[str, bytes, dict[bytes, bytes]]]) -> list[Taken]:
        """The entries' jobs; an entry that is not a job (written by something else, corrupted) is
        logged and removed rather than crashing the reader over and over."""
        jobs = []
        for stream, entry_id, fields in entries:
            try:
                jobs.append(Taken(stream, entry_id, Job.unpack(fields[b"job"])))
            except Exception as exc:
                log.error("removing stream entry %s of %s: not a job (%s: %s)", as_text(entry_id), stream,
                          type(exc).__name__, exc)
                await self._retrying(lambda stream=stream, entry_id=entry_id: self._ack(stream, entry_id))
        return jobs

    async def _hand_back_unstarted(self, model: str, budget: KvBudget) -> None:
        """Entries held but not running: read or claimed by an earlier run of this model's reader that
        crashed before starting them. Re-queued, so they run (here or elsewhere) rather than sit in
        this live worker's pending list, where no reclaimer would ever look. Parked jobs among them too."""
        self._parked.pop(model, None)
        for taken in self._held_of(model):
            if taken.job.request_id not in self._running:
                budget.release(taken.job.request_id)
                await self._retrying(lambda taken=taken: self._hand_back(taken))

    @contextlib.contextmanager
    def _redis_call(self, model: str) -> Iterator[None]:
        """Marks one of the model's reader loops as inside a stream read or claim (see _stop_model)."""
        self._in_redis[model] = self._in_redis.get(model, 0) + 1
        self._out_of_redis.setdefault(model, asyncio.Event()).clear()
        try:
            yield
        finally:
            self._in_redis[model] -= 1
            if not self._in_redis[model]:
                self._out_of_redis[model].set()

    async def _register(self, engine: Engine) -> None:
        """Publish the model card and tokenizer, so gateways can validate and tokenize (before the model
        reports ready: a gateway that sees it ready finds its card)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.MODELS, engine.card.name, engine.card.pack())
            pipe.set(keys.tokenizer(engine.card.name), engine.tokenizer.pack())
            await pipe.execute()
        await ensure_groups(self.redis, engine.card.name, keys.job_stream(engine.card.name, self.engine_id))

    async def _start_jobs(self, engine: Engine, budget: KvBudget, jobs: list[Taken], *,
                          reserved: bool = False) -> None:
        """Admit jobs in the order taken against the KV budget; start each admitted run in one round trip.
        `reserved`: each job has a slot reserved for it (budget.reserve)."""
        admitted: list[Taken] = []
        for taken in jobs:
            job = taken.job
            if budget.never_fits(job.token_budget):
                if reserved:
                    budget.unreserve()
                await self._refuse(taken, f"the request needs {job.token_budget} KV tokens "
                                   f"(prompt + max_tokens); this worker holds at most {budget.capacity_tokens}")
                continue
            if not budget.try_admit(job.request_id, job.token_budget, batch=job.is_batch, reserved=reserved):
                await self._launch(engine, budget, admitted)
                admitted = []
                # Waiting here stops this model's reads: backpressure flows back into the stream.
                await budget.admit(job.request_id, job.token_budget, batch=job.is_batch, reserved=reserved)
            admitted.append(taken)
        await self._launch(engine, budget, admitted)

    async def _launch(self, engine: Engine, budget: KvBudget, jobs: list[Taken]) -> None:
        if not jobs:
            return
        request_ids = [taken.job.request_id for taken in jobs]
        try:
            started = await self.store.start(request_ids, self.worker_id, max_attempts=self.settings.max_attempts)
        except REDIS_UNAVAILABLE as exc:
            # Not retried: after a failover the new primary may not have this read, and then another
            # worker reads these entries. What Redis does say this worker holds, it takes back on its
            # next look (Reclaimer.lost_track): the start script is idempotent for the same worker.
            log.warning("starting %d job(s) failed; left to the next look: %s", len(jobs), describe(exc))
            for taken in jobs:
                budget.release(taken.job.request_id)
                self._held[taken.stream].pop(taken.entry_id, None)
            return
        for taken, start in zip(jobs, started, strict=True):
            job = taken.job
            if start.status == "poison":
                budget.release(job.request_id)
                await self._dead_letter(taken, reason=_gave_up(start.last_seq))
                continue
            if start.status != "running":  # cancelled while queued, or expired: never runs
                budget.release(job.request_id)
                await self._retrying(lambda taken=taken: self._ack(taken.stream, taken.entry_id))
                log.info("skipping job (%s)", start.status, extra={"request_id": job.request_id})
                continue
            plan = fresh(job)
            if start.chunks:
                plan = resume(job, start.chunks, await self._decoder(engine))
                log.info("continuing job after %d tokens", plan.tokens_done, extra={"request_id": job.request_id})
            if plan.request is not None:
                self.prefixes.record(engine, plan.request.prompt_token_ids)
            task = asyncio.create_task(self._run_job(engine, budget, taken, start.last_seq, plan))
            tasks = self._jobs.setdefault(engine.card.name, set())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _run_job(self, engine: Engine, budget: KvBudget, taken: Taken, last_seq: int,
                       plan: Continuation) -> None:
        job = taken.job
        request_id = job.request_id
        self._running[request_id] = engine
        if job.is_batch:
            self._running_batch[request_id] = job
            budget.wake()  # it may be preempted from now on: _yield_to_interactive waits for that
        started_at, finish_reason = time.time(), FinishReason.ERROR
        published = self.publisher.open(
            request_id, last_seq, len(job.prompt_token_ids), completion_tokens=plan.tokens_done,
            interval_s=self.settings.batch_flush_interval_ms / 1000 if job.is_batch else 0.0)
        try:
            if plan.unsent_text:
                self.publisher.add(EngineOutput(request_id, plan.unsent_text))
            if plan.request is None:  # every token was out already: only the final chunk is missing
                finish_reason = FinishReason.LENGTH
                await self.publisher.finish(EngineOutput(request_id, "", finish_reason=FinishReason.LENGTH))
            else:
                async for output in engine.generate(plan.request):
                    if output.finish_reason is None:
                        self.publisher.add(output)
                    elif output.finish_reason != FinishReason.CANCELLED:
                        finish_reason = output.finish_reason
                        await self.publisher.finish(output)
                    else:
                        finish_reason = FinishReason.CANCELLED
                        if request_id in self._aborted:
                            await self.publisher.settle(request_id)
        except Exception as exc:
            log.exception("job failed", extra={"request_id": request_id})
            await self.publisher.finish(
                EngineOutput(request_id, "", finish_reason=FinishReason.ERROR, error=f"worker error: {exc}")
            )
        finally:
            self._running.pop(request_id, None)
            self._running_batch.pop(request_id, None)
            closed = self.publisher.close(request_id)
            budget.release(request_id)
            if request_id not in self._aborted:
                self.metrics.job_done(job.model, enqueued_at=job.enqueued_at, started_at=started_at,
                                      first_output_at=published.first_output_at, finished_at=time.time(),
                                      prompt_tokens=0 if plan.tokens_done else len(job.prompt_token_ids),
                                      cached_tokens=0 if plan.tokens_done else published.cached_tokens,
                                      new_tokens=published.completion_tokens - plan.tokens_done,
                                      finish_reason=finish_reason, priority=job.priority)
        after = self._aborted.pop(request_id, None)
        if after is _AfterAbort.PARK and (closed is None or not (closed.taken or closed.broken)):
            self._parked.setdefault(job.model, []).append(taken)
        elif after is _AfterAbort.HAND_BACK:
            await self._retrying(lambda: self._hand_back(taken))
        elif closed is not None and closed.broken:
            await self._fail_broken(taken, closed.broken)
        elif closed is None or not closed.taken:
            await self._retrying(lambda: self._ack(taken.stream, taken.entry_id))
        else:  # reclaimed by a live worker while this one counted as dead: the entry is theirs
            self._held[taken.stream].pop(taken.entry_id, None)
            log.warning("job was reclaimed by another worker; dropped here", extra={"request_id": request_id})

    async def _fail_broken(self, taken: Taken, reason: str) -> None:
        """A job whose output could not be stored ends failed, with the reason, never left `running`.
        The dead-letter script writes its own final chunk (no text of the job's); should even that fail,
        the entry leaves the stream (it would fail again wherever it ran) and the request expires."""
        try:
            await self._dead_letter(taken, reason=reason)
        except Exception:
            log.exception("could not fail the request either; dropping its job",
                          extra={"request_id": taken.job.request_id})
            await self._retrying(lambda: self._ack(taken.stream, taken.entry_id))

    async def _watch_engines(self) -> None:
        """An engine (or a front-end of one) that died serves nothing more: stop, so that the supervisor
        (fleet, Kubernetes) restarts the worker; its jobs are handed back or reclaimed meanwhile."""
        while not self._stop.is_set():
            await asyncio.sleep(_ENGINE_CHECK_INTERVAL_S)
            for name in list(self.loader.engines):
                error = self.loader.dead_error(name)
                if error is not None and not self._stop.is_set():
                    log.error("%s; stopping the worker so that it is restarted", error)
                    self.exit_code = 1
                    self.stop()

    async def _decoder(self, engine: Engine) -> Decode:
        """The model's detokenizer, built once per model (off the loop: a big tokenizer takes a while)."""
        name = engine.card.name
        if name not in self._decoders:
            tokenizer = await asyncio.to_thread(Tokenizer.from_str, engine.tokenizer.tokenizer_json)
            self._decoders[name] = tokenizer.decode
        return self._decoders[name]

    async def _hand_back(self, taken: Taken) -> None:
        job = taken.job
        outcome = await self.store.hand_back(job, taken.stream, taken.entry_id, self.worker_id)
        self._held[taken.stream].pop(taken.entry_id, None)
        self.metrics.handed_back.labels(job.model).inc()
        log.info("handed back (%s)", outcome, extra={"request_id": job.request_id})

    async def _dead_letter(self, taken: Taken, *, reason: str) -> None:
        """Fail a job that cannot complete (its workers keep dying, its output cannot be stored) with the
        reason; park it in `dead:{model}`."""
        job = taken.job
        log.error("dead-lettering job: %s", reason, extra={"request_id": job.request_id})
        await self._retrying(lambda: self.store.dead_letter(
            job, taken.stream, taken.entry_id, self.worker_id, reason, result_ttl_s=self.settings.result_ttl_s,
            max_dead_letters=self.settings.max_dead_letters))
        self._held[taken.stream].pop(taken.entry_id, None)
        self.metrics.dead_lettered.labels(job.model).inc()

    async def _refuse(self, taken: Taken, reason: str) -> None:
        """End a job that can never run here as failed, with the reason."""
        job = taken.job
        [started] = await self._retrying(lambda: self.store.start([job.request_id], self.worker_id,
                                                                  max_attempts=self.settings.max_attempts))
        if started.status == "poison":
            await self._dead_letter(taken, reason=_gave_up(started.last_seq))
            return
        if started.status == "running":
            self.publisher.open(job.request_id, started.last_seq, len(job.prompt_token_ids))
            try:
                await self.publisher.finish(EngineOutput(job.request_id, "", finish_reason=FinishReason.ERROR,
                                                         error=reason))
            finally:
                self.publisher.close(job.request_id)
        log.warning("refused job: %s", reason, extra={"request_id": job.request_id})
        await self._retrying(lambda: self._ack(taken.stream, taken.entry_id))

    async def _ack(self, stream: str, entry_id: bytes) -> None:
        # XACK + XDEL (a read entry: the group's lag stays defined): the stream keeps only unfinished
        # work; SREM: a skipped entry (cancelled while queued) is gone from the stream now.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(stream, keys.CONSUMER_GROUP, entry_id)
            pipe.xdel(stream, entry_id)
            pipe.srem(keys.skip_set_of(stream), keys.entry_ref(stream, entry_id))
            await pipe.execute()
        self._held.get(stream, {}).pop(entry_id, None)

    # -- cancellation -------------------------------------------------------------------
    def _abort(self, request_id: str) -> None:
        engine = self._running.get(request_id)
        if engine is not None:
            log.info("aborting", extra={"request_id": request_id})
            engine.abort(request_id)

    async def _listen_for_cancels(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(keys.CANCELS)
                    while True:
                        # A bounded wait, not listen(): an idle listen() hits the socket timeout and
                        # would reconnect (and could miss a cancel) every few seconds.
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None and message["type"] == "message":
                            self._abort(message["data"].decode())
            except REDIS_UNAVAILABLE as exc:
                log.warning("cancel listener lost Redis: %s", describe(exc))
                await asyncio.sleep(1.0)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Redis calls that must happen eventually (start, ack, register): retry with backoff."""
        delay = 0.1
        while True:
            try:
                return await call()
            except REDIS_UNAVAILABLE as exc:
                log.warning("redis call failed, retrying: %s", describe(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _source(reader: JobReader, stream: str) -> str:
    """Where a taken job came from, for the metric: own, shared, batch, or another engine's stream."""
    if stream == reader.batch_stream:
        return "batch"
    return "own" if stream == reader.own_stream else "shared" if stream == reader.shared_stream else "other"


def _gave_up(deaths: int) -> str:
    return (f"gave up after {deaths} attempts: every worker running this request died before it made "
            "progress (the job is kept in the dead-letter stream)")


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel a task and wait (bounded) for it to end. redis-py 5 can lose a cancellation that lands
    in a connection attempt while Redis is down; a stop must not hang on that."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=_CANCEL_TIMEOUT_S)
    if not done:
        log.warning("task %s did not end within %.0fs of its cancellation; going on without it",
                    task.get_name(), _CANCEL_TIMEOUT_S)
        task.cancel()
