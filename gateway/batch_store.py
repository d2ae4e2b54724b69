"""Batches (OpenAI's Batch API) in Redis: the batch object with its runner's progress in one hash, and the
atomic steps a runner takes (gateway/batch_runner.py), each one script so that a runner that dies between
any two leaves nothing done twice or lost: a line fed (the cursor moves past it and its request is
recorded in flight), a line ended (its output or error line written and its request out of flight)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import msgpack
from redis.asyncio import Redis

from common import keys
from common.redis_conn import as_text
from gateway.api_responses import BatchObject
from gateway.file_store import StoredFile, new_file_id, page_of


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
_TIMES = ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
          "cancelling_at", "cancelled_at")


@dataclass(slots=True)
class Batch:
    id: str
    owner: str
    endpoint: str
    model: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    status: str = BatchStatus.VALIDATING
    metadata: dict[str, str] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    # Where its output and error lines go (published as files when the batch ends, if it has any).
    output_id: str = field(default_factory=new_file_id)
    error_id: str = field(default_factory=new_file_id)
    output_file_id: str | None = None
    error_file_id: str | None = None
    # The runner's cursor: the next input line is line `next_line` of part `next_part`; `fed` lines so far.
    next_part: int = 0
    next_line: int = 0
    fed: int = 0
    # Set when the batch is to stop early: "cancel" (asked to) or "expire" (its window passed).
    stopping: str = ""
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    errors: dict[str, Any] | None = None  # OpenAI's list of what failed the batch

    def to_openai(self) -> BatchObject:
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": self.errors,
                "input_file_id": self.input_file_id, "completion_window": self.completion_window,
                "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, **{name: getattr(self, name) for name in _TIMES},
                "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
                "metadata": self.metadata, "model": self.model}

    def to_hash(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> Batch:
        return cls(**{as_text(k): json.loads(v) for k, v in fields.items()})


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


# KEYS: the batch, its in-flight hash, the error file's parts and fields. ARGV: the request id and what it
# runs (packed), or an error line for a line that became no request; the cursor after this line (part,
# line, fed); the `fed` the runner read (a runner whose view is stale writes nothing).
_FED = """
if redis.call('HGET', KEYS[1], 'fed') ~= ARGV[6] then return 0 end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
if ARGV[7] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[7])
  redis.call('HINCRBY', KEYS[4], 'bytes', #ARGV[7])
  redis.call('HINCRBY', KEYS[4], 'lines', 1)
  redis.call('HSET', KEYS[1], 'failed', tonumber(redis.call('HGET', KEYS[1], 'failed')) + 1)
end
redis.call('HSET', KEYS[1], 'next_part', ARGV[3], 'next_line', ARGV[4], 'fed', ARGV[5])
return 1
"""

# KEYS: the batch, its in-flight hash, the output or error file's parts, that file's fields. ARGV: the
# request id ('' for a line that never became a request), the result line, the count it adds to
# ('completed' / 'failed'). Idempotent: a request's line is written once, when it leaves the in-flight hash.
_ENDED = """
if ARGV[1] ~= '' and redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('HINCRBY', KEYS[4], 'bytes', #ARGV[2])
redis.call('HINCRBY', KEYS[4], 'lines', 1)
redis.call('HSET', KEYS[1], ARGV[3], tonumber(redis.call('HGET', KEYS[1], ARGV[3])) + 1)
return 1
"""


@dataclass(slots=True)
class InFlight:
    """An input line in the queue as a request."""

    line: int  # 1-based
    custom_id: str
    # How its OpenAI response is written: {"logprobs": k} when asked, {"tool_call": ...} (ChatBody.tool_mode,
    # and the model's "tool_call_parser" for "auto").
    options: dict[str, Any] | None = None

    def pack(self) -> bytes:
        return msgpack.packb([self.line, self.custom_id, self.options])

    @classmethod
    def unpack(cls, data: bytes) -> InFlight:
        return cls(*msgpack.unpackb(data))


class BatchStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._fed = redis.register_script(_FED)
        self._ended = redis.register_script(_ENDED)

    async def create(self, batch: Batch) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch(batch.id), mapping=batch.to_hash())
            pipe.zadd(keys.batches_of(batch.owner), {batch.id: time.time()})  # created_at is whole seconds
            pipe.sadd(keys.ACTIVE_BATCHES, batch.id)
            await pipe.execute()

    async def get(self, batch_id: str) -> Batch | None:
        fields = await self._redis.hgetall(keys.batch(batch_id))
        return Batch.from_hash(fields) if fields else None

    async def page(self, owner: str, *, limit: int, after: str | None) -> tuple[list[Batch], bool]:
        return await page_of(self._redis, keys.batches_of(owner), limit, after, self.get)

    async def update(self, batch_id: str, **fields: Any) -> None:
        await self._redis.hset(keys.batch(batch_id), mapping={k: json.dumps(v) for k, v in fields.items()})

    async def cancel(self, batch: Batch) -> None:
        """Ask the batch's runner to stop it: the status says so at once."""
        await self.update(batch.id, status=BatchStatus.CANCELLING, cancelling_at=int(time.time()), stopping="cancel")

    async def active(self) -> list[str]:
        return [as_text(i) for i in await self._redis.smembers(keys.ACTIVE_BATCHES)]

    async def ended(self, batch: Batch, **fields: Any) -> None:
        """The batch is final: no runner looks after it any more."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch(batch.id), mapping={k: json.dumps(v) for k, v in fields.items()})
            pipe.srem(keys.ACTIVE_BATCHES, batch.id)
            pipe.delete(keys.batch_inflight(batch.id))
            await pipe.execute()

    async def lease(self, batch_id: str, runner_id: str, ttl_ms: int) -> bool:
        """Whether `runner_id` carries the batch on now: it holds the lease, or took it (free or expired)."""
        key = keys.batch_runner(batch_id)
        if await self._redis.set(key, runner_id, nx=True, px=ttl_ms):
            return True
        if as_text(await self._redis.get(key) or b"") == runner_id:
            await self._redis.pexpire(key, ttl_ms)
            return True
        return False

    async def inflight(self, batch_id: str) -> dict[str, InFlight]:
        raw = await self._redis.hgetall(keys.batch_inflight(batch_id))
        return {as_text(k): InFlight.unpack(v) for k, v in raw.items()}

    async def record_fed(self, batch: Batch, *, next_part: int, next_line: int, request: tuple[str, InFlight] | None,
                         error_line: bytes = b"") -> bool:
        """Move the cursor past one line: its `request` (id, line) now in flight, or its `error_line` written
        to the error file. False: another runner moved the cursor (this one's view is stale)."""
        request_id, line = request or ("", None)
        moved = await self._fed(
            keys=[keys.batch(batch.id), keys.batch_inflight(batch.id), keys.file_parts(batch.error_id),
                  keys.file_meta(batch.error_id)],
            args=[request_id, line.pack() if line else b"", next_part, next_line, batch.fed + 1, batch.fed, error_line])
        if moved:
            batch.next_part, batch.next_line, batch.fed = next_part, next_line, batch.fed + 1
            batch.failed += 1 if error_line else 0
        return bool(moved)

    async def record_ended(self, batch: Batch, results: list[tuple[str, bytes, bool]]) -> None:
        """Write each ended request's result line (request id, line, ok) to the output file (ok) or the error
        file, in one round trip; a line written before (by a runner that died before it knew) is not again."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, result_line, ok in results:
                file_id = batch.output_id if ok else batch.error_id
                await self._ended(keys=[keys.batch(batch.id), keys.batch_inflight(batch.id), keys.file_parts(file_id),
                                        keys.file_meta(file_id)],
                                  args=[request_id, result_line, "completed" if ok else "failed"], client=pipe)
            await pipe.execute()

    async def result_file(self, batch: Batch, file_id: str, kind: str) -> StoredFile | None:
        """The output or error file as the runner wrote it (None: no line went there)."""
        size, lines = await self._redis.hmget(keys.file_meta(file_id), ["bytes", "lines"])
        if not lines:
            return None
        return StoredFile(id=file_id, bytes=int(size), created_at=int(time.time()), filename=f"{batch.id}_{kind}.jsonl",
                          purpose="batch_output", owner=batch.owner, lines=int(lines))
