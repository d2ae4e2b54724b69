"""Files (OpenAI's Files API) kept in Redis, where every gateway reads them: a hash of the file's fields
and a list of its content in parts of whole lines, written as an upload streams in (never the whole file
in a gateway's memory) and read back the same way."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

from redis.asyncio import Redis

from common import keys
from common.redis_conn import as_text
from gateway.api_responses import FileObject

_PARTS_PER_READ = 16
T = TypeVar("T")


@dataclass(slots=True)
class StoredFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str  # "batch" (uploaded), "batch_output" (a batch's output or error file)
    owner: str  # the digest of the API key that created it ("" without API keys)
    lines: int = 0
    # Of an input file for batches: the one endpoint and model every line names.
    endpoint: str = ""
    model: str = ""

    def to_openai(self) -> FileObject:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> StoredFile:
        values = {as_text(k): as_text(v) for k, v in fields.items()}
        return cls(id=values["id"], bytes=int(values["bytes"]), created_at=int(values["created_at"]),
                   filename=values["filename"], purpose=values["purpose"], owner=values["owner"],
                   lines=int(values.get("lines", 0)), endpoint=values.get("endpoint", ""),
                   model=values.get("model", ""))


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


class FileStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def write_parts(self, parts: AsyncIterator[bytes]) -> tuple[str, int]:
        """Store `parts` (whole lines each) as they come, under a new file id; (the id, bytes). The file
        exists (is listed, readable) only once `publish`ed. An exception from `parts` (a bad line, too
        large) leaves nothing behind."""
        file_id = new_file_id()
        size = 0
        try:
            async for part in parts:
                size += len(part)
                await self._redis.rpush(keys.file_parts(file_id), part)
        except BaseException:
            await self._redis.delete(keys.file_parts(file_id))
            raise
        return file_id, size

    async def publish(self, stored: StoredFile) -> None:
        """Write the file's fields and list it: from now on it exists."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.file_meta(stored.id), mapping={k: v for k, v in asdict(stored).items()})
            pipe.zadd(keys.files_of(stored.owner), {stored.id: time.time()})  # created_at is whole seconds
            await pipe.execute()

    async def get(self, file_id: str) -> StoredFile | None:
        fields = await self._redis.hgetall(keys.file_meta(file_id))
        return StoredFile.from_hash(fields) if fields else None

    async def page(self, owner: str, *, limit: int, after: str | None) -> tuple[list[StoredFile], bool]:
        """The owner's files, newest first, after the id `after`; and whether more follow."""
        return await page_of(self._redis, keys.files_of(owner), limit, after, self.get)

    async def delete(self, stored: StoredFile) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.file_meta(stored.id), keys.file_parts(stored.id))
            pipe.zrem(keys.files_of(stored.owner), stored.id)
            await pipe.execute()

    async def part(self, file_id: str, index: int) -> bytes | None:
        return await self._redis.lindex(keys.file_parts(file_id), index)

    async def content(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes, a few parts per round trip."""
        start = 0
        while True:
            parts = await self._redis.lrange(keys.file_parts(file_id), start, start + _PARTS_PER_READ - 1)
            for part in parts:
                yield part
            if len(parts) < _PARTS_PER_READ:
                return
            start += _PARTS_PER_READ


async def page_of(redis: Redis, index: str, limit: int, after: str | None,
                load: Callable[[str], Awaitable[T | None]]) -> tuple[list[T], bool]:
    """Objects of a creation-time index (sorted set), newest first, after the id `after`; and whether
    more follow. Ids whose object is gone (expired, deleted) are dropped from the index."""
    start = 0
    if after is not None:
        rank = await redis.zrevrank(index, after)
        start = 0 if rank is None else rank + 1
    ids = [as_text(i) for i in await redis.zrevrange(index, start, start + limit)]
    objects = []
    for object_id in ids[:limit]:
        found = await load(object_id)
        if found is None:
            await redis.zrem(index, object_id)
        else:
            objects.append(found)
    return objects, len(ids) > limit
