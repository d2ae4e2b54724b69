"""A request's life in Redis, as atomic server-side scripts.

`req:{id}` (hash) holds status, model, seq, usage, timings and the stream entry; the output
lives in `req:{id}:chunks` (list; chunk seq N is element N-1) and every chunk is also
PUBLISHed on `chunks:{id}`. Each state change below is one script, so a cancel can never race
a worker's append into an inconsistent state:

    enqueue     (gateway) -> queued          (or refused: the model's stream is full)
    start       (worker)  queued | running -> running on this worker (a running one was reclaimed
                          or handed back: the reply carries its chunks, to continue from them);
                          refused as 'poison' after max_attempts starts without progress
    append      (worker)  running -> running (refused unless running and owned by that worker)
    finish      (worker)  running -> completed | failed
    hand_back   (worker)  queued | running -> queued again, as a new stream entry (SIGTERM drain)
    dead_letter (worker)  queued | running -> failed, the job copied to `dead:{model}`
    cancel      (gateway) queued | running -> cancelled

append and finish answer 1 (done), 0 (the request is over: cancelled, finished) or -1 (another
worker owns it now: this one's heartbeat expired and the job was reclaimed). Only on 0 may the
worker ack the stream entry; on -1 the entry belongs to the new owner.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from common import keys
from common.affinity import ROUTE_LUA
from common.protocol import Chunk, FinishReason, Job, RequestStatus
from common.redis_conn import REDIS_UNAVAILABLE, NotReplicatedError, as_text
from common.replication import Replication

# KEYS: the class's stream (the shared one, or the batch one), req:{id}, the class's skip set, the
# engine-streams set, the waiting engine streams, the idle nudges[, the idempotency key]. Admission counts
# every stream of the class (an interactive job: the shared one and each engine's own); an interactive job
# goes to the stream `route` picks (ARGV[11]).
_ENQUEUE = ROUTE_LUA + """
if KEYS[7] then
  local seen = redis.call('GET', KEYS[7])
  if seen then return {'replay', seen} end
end
local outstanding = redis.call('XLEN', KEYS[1]) - redis.call('SCARD', KEYS[3])
if ARGV[13] ~= 'batch' then
  for _, stream in ipairs(redis.call('SMEMBERS', KEYS[4])) do outstanding = outstanding + redis.call('XLEN', stream) end
end
if outstanding >= tonumber(ARGV[1]) then return false end
local stream, ref_suffix = KEYS[1], ''
if ARGV[11] ~= '' then
  local engine = route(ARGV[11])
  if engine then stream, ref_suffix = engine[2], engine[1] end
end
if stream ~= KEYS[1] and redis.call('EXISTS', stream) == 0 then
  redis.call('XGROUP', 'CREATE', stream, ARGV[12], '0', 'MKSTREAM')
  redis.call('SADD', KEYS[4], stream)
end
local entry = redis.call('XADD', stream, '*', 'job', ARGV[2])
if stream ~= KEYS[1] then  -- NX: a stream already waiting keeps the time of its oldest entry
  redis.call('ZADD', KEYS[5], 'NX', tonumber(string.match(entry, '^%d+')), stream)
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', 64, '*', 'stream', stream)
end
local ref = entry .. ref_suffix .. ARGV[14]
redis.call('HSET', KEYS[2], 'status', 'queued', 'model', ARGV[3], 'entry', ref, 'seq', 0,
  'created_at', ARGV[4], 'prompt_tokens', ARGV[5], 'completion_tokens', 0, 'max_tokens', ARGV[6],
  'owner', ARGV[8], 'priority', ARGV[13])
redis.call('EXPIRE', KEYS[2], ARGV[7])
if KEYS[7] then
  redis.call('SET', KEYS[7], ARGV[9] .. ' ' .. ARGV[10], 'EX', ARGV[7])
  redis.call('HSET', KEYS[2], 'idempotency_key', KEYS[7])
end
return ref
"""

# Ends a request that no worker will finish (cancel, dead letter): KEYS[1] is `req:{id}`, KEYS[2]
# its chunks. The final chunk carries the usage so far and is stored and published like a
# worker's, so every reader sees the end the same way.
_END_REQUEST = """
local function end_request(status, reason, err, finished_at, ttl, channel)
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq')) + 1
  local done = cmsgpack.pack({seq = seq, text = '', finish_reason = reason, error = err,
    prompt_tokens = tonumber(redis.call('HGET', KEYS[1], 'prompt_tokens')),
    completion_tokens = tonumber(redis.call('HGET', KEYS[1], 'completion_tokens'))})
  redis.call('RPUSH', KEYS[2], done)
  redis.call('HSET', KEYS[1], 'status', status, 'finish_reason', reason, 'seq', seq, 'finished_at', finished_at)
  if err then redis.call('HSET', KEYS[1], 'error', err) end
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  local idempotency_key = redis.call('HGET', KEYS[1], 'idempotency_key')
  if idempotency_key then redis.call('EXPIRE', idempotency_key, ttl) end
  redis.call('PUBLISH', channel, done)
end
"""

_CANCEL = _END_REQUEST + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status ~= 'queued' and status ~= 'running' then return status end
if status == 'queued' then
  -- Never run. Its entry stays in the stream (a worker that reads it skips and acks it): deleting an
  -- unread entry would leave the group's lag undefined. Admission does not count it. KEYS[3] and KEYS[4]:
  -- the interactive and the batch skip sets.
  local ref = redis.call('HGET', KEYS[1], 'entry')
  redis.call('SADD', string.sub(ref, -#ARGV[6]) == ARGV[6] and KEYS[4] or KEYS[3], ref)
end
end_request('cancelled', 'cancelled', nil, ARGV[2], ARGV[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 'cancelled'
"""

# Strikes count the starts in a row that found no new output since the previous start: a job
# whose workers keep dying before it makes progress. One that progresses between deaths
# converges (each continuation starts further on), so only the former is given up on.
_START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0, {}} end
if status ~= 'queued' and status ~= 'running' then return {status, 0, {}} end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
if status == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  -- Started by this worker already (its reply was lost): the same answer, no strike.
  if seq == 0 then return {'running', 0, {}} end
  return {'running', seq, redis.call('LRANGE', KEYS[2], 0, -1)}
end
local strikes = 1
if tonumber(redis.call('HGET', KEYS[1], 'started_seq') or -1) == seq then
  strikes = tonumber(redis.call('HGET', KEYS[1], 'strikes')) + 1
end
redis.call('HSET', KEYS[1], 'started_seq', seq, 'strikes', strikes)
if strikes > tonumber(ARGV[3]) then return {'poison', strikes - 1, {}} end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
if seq == 0 then return {'running', 0, {}} end
return {'running', seq, redis.call('LRANGE', KEYS[2], 0, -1)}
"""

# 0: the request is over; -1: another worker owns it now.
_OWNED = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'queued' then return 0 end
if status == 'queued' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return -1 end
"""

_APPEND = _OWNED + """
-- Already applied (a retry after a reply was lost to a connection drop): do not duplicate.
if tonumber(redis.call('HGET', KEYS[1], 'seq')) >= tonumber(ARGV[3]) then return 1 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'seq', ARGV[3], 'completion_tokens', ARGV[4])
redis.call('HSETNX', KEYS[1], 'first_token_at', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', ARGV[7], ARGV[2])
return 1
"""

_FINISH = _OWNED + """
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'seq', ARGV[4], 'completion_tokens', ARGV[5],
  'finish_reason', ARGV[6], 'error', ARGV[7], 'finished_at', ARGV[8], 'cached_tokens', ARGV[11])
redis.call('HSETNX', KEYS[1], 'first_token_at', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('EXPIRE', KEYS[2], ARGV[9])
local idempotency_key = redis.call('HGET', KEYS[1], 'idempotency_key')
if idempotency_key then redis.call('EXPIRE', idempotency_key, ARGV[9]) end  -- it lives as long as the result
redis.call('PUBLISH', ARGV[10], ARGV[2])
return 1
"""


# KEYS: req:{id}, the stream the entry is in, its skip set, the class's stream (the shared one or the batch
# one). ARGV[5]: the entry's ref; ARGV[6]: the ref suffix of the class's stream. The job goes back to the
# class's stream: whichever worker has room continues it.
_HAND_BACK = """
local function remove_entry()
  redis.call('XACK', KEYS[2], ARGV[4], ARGV[3])
  redis.call('XDEL', KEYS[2], ARGV[3])
  redis.call('SREM', KEYS[3], ARGV[5])
end
local status = redis.call('HGET', KEYS[1], 'status')
if not status or (status ~= 'queued' and status ~= 'running') then
  remove_entry()
  return status or 'missing'
end
if status == 'running' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then return 'taken' end
if status == 'queued' and redis.call('HGET', KEYS[1], 'entry') ~= ARGV[5] then
  -- Handed back already (a retry): the new entry exists; only the old one needs removing.
  remove_entry()
  return 'requeued'
end
local entry = redis.call('XADD', KEYS[4], '*', 'job', ARGV[2])
remove_entry()
redis.call('HSET', KEYS[1], 'status', 'queued', 'entry', entry .. ARGV[6], 'worker', '', 'strikes', 0)
return 'requeued'
"""

_DEAD_LETTER = _END_REQUEST + """
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*', 'job', ARGV[2], 'request_id', ARGV[10],
  'reason', ARGV[3], 'worker', ARGV[1], 'failed_at', ARGV[4])
redis.call('XACK', KEYS[3], ARGV[7], ARGV[6])
redis.call('XDEL', KEYS[3], ARGV[6])
redis.call('SREM', KEYS[5], ARGV[11])
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
end_request('failed', 'error', ARGV[3], ARGV[4], ARGV[5], ARGV[8])
return 1
"""


def class_stream(job: Job) -> str:
    """Where a job of its class waits unrouted: the shared stream, or the batch stream."""
    return keys.batch_stream(job.model) if job.is_batch else keys.job_stream(job.model)


@dataclass(frozen=True, slots=True)
class Idempotency:
    key: str  # keys.idempotency(...)
    fingerprint: str  # of the request's body: a retry has the same one


@dataclass(frozen=True, slots=True)
class Replay:
    """An idempotency key seen before: the request it created, and the fingerprint it was created with."""

    request_id: str
    fingerprint: str


@dataclass(slots=True)
class RequestMeta:
    model: str
    owner: str  # the digest of the API key that created it ("" without API keys)
    status: str
    seq: int  # of its last chunk


@dataclass(slots=True)
class StartResult:
    status: str  # "running" when the worker should run it; anything else: skip and ack
    last_seq: int
    # A continuation (the job was reclaimed or handed back): the chunks already delivered.
    chunks: list[Chunk]


class RequestStore:
    """Every write goes through `run_scripts`, which waits for a replica when there is one
    (`replication`; None: never waits, as for reads-only users)."""

    def __init__(self, redis: aioredis.Redis, replication: Replication | None = None) -> None:
        self.redis = redis
        self.replication = replication

    # -- gateway side -------------------------------------------------------------------
    async def enqueue(self, job: Job, *, max_outstanding: int, ttl_s: int, owner: str = "",
                      idempotency: Idempotency | None = None, route: bytes | None = None) -> str | Replay | None:
        """Admit and enqueue atomically: the entry's ref (keys.entry_ref: it names the engine where `route`,
        common/affinity.py, chose one); None when the model's streams are at their cap.
        `owner`: the digest of the API key that created it ("" without API keys). With `idempotency`, a
        key seen before gets the earlier request instead (a Replay), admitted or not."""
        stream = class_stream(job)
        call = ScriptCall(_ENQUEUE, [stream, keys.request(job.request_id),
                                     keys.skip_set_of(stream), keys.engine_streams(job.model),
                                     keys.waiting_engine_streams(job.model), keys.idle_nudges(job.model),
                                     *([idempotency.key] if idempotency else [])],
                          [max_outstanding, job.pack(), job.model, job.enqueued_at, len(job.prompt_token_ids),
                           job.sampling["max_tokens"], ttl_s, owner,
                           *([idempotency.fingerprint, job.request_id] if idempotency else ["", ""]),
                           route or "", keys.CONSUMER_GROUP, job.priority, keys.entry_ref(stream, "")])
        try:
            [reply] = await self.run_scripts([call])
        except NotReplicatedError:
            # On the primary, on no replica: withdrawn, so that a failover cannot leave a 503'd job
            # running, nor this primary (if it survives) run a job its client was told failed; its
            # idempotency key goes too, so that the client's retry is a new attempt.
            with contextlib.suppress(*REDIS_UNAVAILABLE):
                await self.cancel(job.request_id, job.model, result_ttl_s=ttl_s)
                if idempotency is not None:
                    await self.redis.delete(idempotency.key)
            raise
        if isinstance(reply, list):
            fingerprint, _, request_id = as_text(reply[1]).partition(" ")
            return Replay(request_id, fingerprint)
        return None if reply is None else as_text(reply)

    async def cancel(self, request_id: str, model: str, *, result_ttl_s: int) -> str | None:
        """Cancel a queued or running request. Returns the status it ends in, None if unknown."""
        [status] = await self.run_scripts([ScriptCall(
            _CANCEL, [keys.request(request_id), keys.request_chunks(request_id), keys.skipped_jobs(model),
                      keys.skipped_jobs(model, batch=True)],
            [result_ttl_s, time.time(), keys.chunk_channel(request_id), keys.CANCELS, request_id,
             keys.BATCH_REF_SUFFIX])])
        return None if status is None else as_text(status)

    async def read(self, request_id: str) -> tuple[dict[str, str], list[Chunk]] | None:
        """The request's state and all its chunks, in one round trip."""
        [found] = await self.read_many([request_id])
        return found

    async def read_many(self, request_ids: list[str]) -> list[tuple[dict[str, str], list[Chunk]] | None]:
        """`read` of several requests, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.hgetall(keys.request(request_id))
                pipe.lrange(keys.request_chunks(request_id), 0, -1)
            replies = await pipe.execute()
        return [({as_text(k): as_text(v) for k, v in state.items()}, [Chunk.unpack(c) for c in chunks]) if state
                else None for state, chunks in zip(replies[::2], replies[1::2], strict=True)]

    async def meta(self, request_id: str) -> RequestMeta | None:
        """Who owns the request and how far it is, in one read; None when it does not exist (or expired)."""
        model, owner, status, seq = await self.redis.hmget(keys.request(request_id),
                                                           ["model", "owner", "status", "seq"])
        if model is None:
            return None
        return RequestMeta(as_text(model), as_text(owner or b""), as_text(status), int(seq or 0))

    async def chunks_after(self, request_id: str, last_seq: int) -> list[Chunk]:
        raw = await self.redis.lrange(keys.request_chunks(request_id), last_seq, -1)
        return [Chunk.unpack(c) for c in raw]

    # -- worker side --------------------------------------------------------------------
    # The worker's hot path sends EVALSHA in plain pipelines: redis-py's Script objects would add
    # a SCRIPT EXISTS round trip to every pipeline. A Redis that lost its script cache (restart)
    # answers NOSCRIPT; run_scripts then loads the scripts and re-sends just those calls.
    async def start(self, request_ids: list[str], worker_id: str, *, max_attempts: int) -> list[StartResult]:
        """Mark jobs running on this worker, in one round trip; each says whether to run it.
        A 'poison' result's last_seq is the number of workers that died on it."""
        now = time.time()
        replies = await self.run_scripts([
            ScriptCall(_START, [keys.request(request_id), keys.request_chunks(request_id)],
                       [worker_id, now, max_attempts])
            for request_id in request_ids])
        return [StartResult(as_text(status), int(seq), [Chunk.unpack(c) for c in chunks])
                for status, seq, chunks in replies]

    async def hand_back(self, job: Job, stream: str, entry_id: bytes | str, worker_id: str) -> str:
        """Put a job this worker will not finish back at the end of its class's stream as a new entry
        (what it emitted stays: the next worker continues). 'requeued', 'taken' (another worker
        owns it), or the terminal status it already had; the old entry is acked unless taken."""
        home = class_stream(job)
        [reply] = await self.run_scripts([ScriptCall(
            _HAND_BACK, [keys.request(job.request_id), stream, keys.skip_set_of(stream), home],
            [worker_id, job.pack(), entry_id, keys.CONSUMER_GROUP, keys.entry_ref(stream, entry_id),
             keys.entry_ref(home, "")])])
        return as_text(reply)

    async def dead_letter(self, job: Job, stream: str, entry_id: bytes | str, worker_id: str, reason: str, *,
                          result_ttl_s: int, max_dead_letters: int) -> None:
        """Fail the request with `reason` and move its job to `dead:{model}`, in one step."""
        await self.run_scripts([ScriptCall(
            _DEAD_LETTER,
            [keys.request(job.request_id), keys.request_chunks(job.request_id), stream,
             keys.dead_letters(job.model), keys.skip_set_of(stream)],
            [worker_id, job.pack(), reason, time.time(), result_ttl_s, entry_id, keys.CONSUMER_GROUP,
             keys.chunk_channel(job.request_id), max_dead_letters, job.request_id,
             keys.entry_ref(stream, entry_id)])])

    @staticmethod
    def append(request_id: str, worker_id: str, chunk: Chunk, completion_tokens: int, ttl_s: int) -> ScriptCall:
        """An append of one chunk; its reply is 1, or 0 / -1 as the module says."""
        return ScriptCall(_APPEND, [keys.request(request_id), keys.request_chunks(request_id)],
                          [worker_id, chunk.pack(), chunk.seq, completion_tokens, time.time(), ttl_s,
                           keys.chunk_channel(request_id)])

    @staticmethod
    def finish(request_id: str, worker_id: str, chunk: Chunk, *, result_ttl_s: int) -> ScriptCall:
        """The final chunk and terminal status (chunk.finish_reason is set); 1, or 0 / -1."""
        failed = chunk.finish_reason == FinishReason.ERROR
        status = RequestStatus.FAILED if failed else RequestStatus.COMPLETED
        return ScriptCall(_FINISH, [keys.request(request_id), keys.request_chunks(request_id)],
                          [worker_id, chunk.pack(), status.value, chunk.seq, chunk.completion_tokens or 0,
                           chunk.finish_reason, chunk.error or "", time.time(), result_ttl_s,
                           keys.chunk_channel(request_id), chunk.cached_tokens or 0])

    async def run_scripts(self, calls: list[ScriptCall], *, raise_on_error: bool = True) -> list[Any]:
        """Run the calls in one pipeline; their replies in order (an error reply raised, or in its place).
        Raises NotReplicatedError when a replica should have confirmed the writes and did not."""
        replies, wait = await self._pipeline(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # nothing ran for these: safe to send again
            async with self.redis.pipeline(transaction=False) as pipe:
                for script in {calls[i].script for i in missing}:
                    pipe.script_load(script)
                await pipe.execute()
            again, wait = await self._pipeline([calls[i] for i in missing])  # a later write: its WAIT covers all
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        if wait is not None:
            self.replication.check(*wait)  # type: ignore[union-attr]
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    async def _pipeline(self, calls: list[ScriptCall]) -> tuple[list[Any], tuple[Any, int] | None]:
        """The calls' replies, and WAIT's reply with the replicas it waited for (None: no replica to wait for)."""
        acks = self.replication.acks_needed if self.replication is not None else 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(_SHAS[call.script], len(call.keys), *call.keys, *call.args)
            if acks:  # on the same connection, after the writes: WAIT covers them
                pipe.execute_command("WAIT", acks, self.replication.timeout_ms)  # type: ignore[union-attr]
            replies = await pipe.execute(raise_on_error=False)
        return (replies[:-1], (replies[-1], acks)) if acks else (replies, None)


@dataclass(slots=True)
class ScriptCall:
    script: str
    keys: list[str]
    args: list[Any]


_SHAS = {script: hashlib.sha1(script.encode()).hexdigest()
         for script in (_ENQUEUE, _CANCEL, _START, _APPEND, _FINISH, _HAND_BACK, _DEAD_LETTER)}
