"""How a worker takes a model's jobs: its engine's own stream first (jobs routed to it for its cached
prefixes, common/affinity.py), then the shared stream, then entries of other engines' own streams that
waited `affinity_wait_ms` there (their engine is busy, or dead): no job waits for a busy engine while
another has room, and a dead engine's stream is drained by the others. Batch-class jobs come last, from
the model's batch stream, only into the slots the interactive streams left. One script, one round trip, at
most `count` entries; which other streams hold overdue entries comes from one sorted set
(`keys.waiting_engine_streams`), so a look costs the same with 2 engines or 200. With nothing to take, a
blocking read on the own and the shared stream and the model's idle nudges (an entry for each job routed
to an engine's own stream, `keys.idle_nudges`: it wakes one idle worker), no longer than until another engine's
oldest unread entry is due. (An entry routed to an engine that dies before taking it, with no nudge, is
found by the next look: at most `read_block_ms` later.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common import fleet_state, keys
from common.protocol import Job
from common.redis_conn import as_text

log = logging.getLogger(__name__)

# KEYS: own stream, shared stream, the model's engine-streams set, its waiting engine streams (sorted by the
# time of their oldest unread entry), the batch stream. ARGV: group, consumer, count, wait ms, batch count.
# Replies {{stream, id, fields}, ...}, and the ms until another engine's oldest unread entry may be taken
# (-1: none waits).
# A look is O(1) whatever the number of engines: only streams the waiting set says are overdue are read;
# a stream whose unread entries were read some other way (the blocking read below) is dropped from the
# set by the next look that finds nothing there.
_TAKE = """
local group, consumer, count, wait_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
  redis.call('SADD', KEYS[3], KEYS[1])
end
local taken = {}
local function take(stream, n)
  if n <= 0 then return 0 end
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', stream, '>')
  if not reply then return 0 end
  for _, entry in ipairs(reply[1][2]) do taken[#taken + 1] = {stream, entry[1], entry[2]} end
  return #reply[1][2]
end
local function added_ms(id) return tonumber(string.match(id, '^%d+')) end
-- The stream's unread entries, from the group's last-delivered id (nil: no such stream or group).
local function unread(stream, n)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if not ok then return nil end
  for _, g in ipairs(groups) do
    local fields = {}
    for i = 1, #g, 2 do fields[g[i]] = g[i + 1] end
    if fields['name'] == group then
      return redis.call('XRANGE', stream, '(' .. fields['last-delivered-id'], '+', 'COUNT', n)
    end
  end
end
-- Keep the waiting set true for a stream just read from.
local function still_waiting(stream)
  local rows = unread(stream, 1)
  if rows and #rows > 0 then
    redis.call('ZADD', KEYS[4], 'XX', added_ms(rows[1][1]), stream)
  else
    redis.call('ZREM', KEYS[4], stream)
  end
end
if take(KEYS[1], count) > 0 then still_waiting(KEYS[1]) end
take(KEYS[2], count - #taken)
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - wait_ms
for _, stream in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', cutoff)) do
  if #taken >= count then break end
  if stream ~= KEYS[1] then
    local aged = 0
    for _, row in ipairs(unread(stream, count - #taken) or {}) do
      if added_ms(row[1]) > cutoff then break end
      aged = aged + 1
    end
    take(stream, aged)
    still_waiting(stream)
  end
end
take(KEYS[5], math.min(count - #taken, tonumber(ARGV[5])))
-- When another engine's oldest unread entry becomes overdue (an entry routed later wakes an idle worker
-- through the nudges stream).
local due = -1
local oldest = redis.call('ZRANGE', KEYS[4], 0, 1, 'WITHSCORES')
for i = 1, #oldest, 2 do
  if oldest[i] ~= KEYS[1] then
    due = math.max(1, tonumber(oldest[i + 1]) - cutoff)
    break
  end
end
return {taken, due}
"""


@dataclass(slots=True)
class Taken:
    """A stream entry this worker holds (read or claimed, not yet acked), and its job."""

    stream: str
    entry_id: bytes
    job: Job


class JobReader:
    def __init__(self, redis: Redis, worker_id: str, engine_id: str, model: str, *, wait_ms: int,
                 block_ms: int) -> None:
        self._redis = redis
        self._worker_id = worker_id
        self.model = model
        self.own_stream = keys.job_stream(model, engine_id)
        self.shared_stream = keys.job_stream(model)
        self._engine_streams = keys.engine_streams(model)
        self._waiting = keys.waiting_engine_streams(model)
        self._nudges = keys.idle_nudges(model)
        self.batch_stream = keys.batch_stream(model)
        self._wait_ms = wait_ms
        self._block_ms = block_ms
        self._take = redis.register_script(_TAKE)

    async def read(self, count: int, *, batch: int | None = None,
                   block_ms: int | None = None) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
        """Up to `count` entries (stream, id, fields), interactive ones first, then up to `batch` (default:
        `count`) batch ones; waits up to `block_ms` (default: the reader's) for one when there are none."""
        batch = count if batch is None else min(count, batch)
        try:
            taken, due = await self._take(keys=[self.own_stream, self.shared_stream, self._engine_streams,
                                                self._waiting, self.batch_stream],
                                          args=[keys.CONSUMER_GROUP, self._worker_id, count, self._wait_ms, batch])
            if taken:
                return [(as_text(stream), entry_id, _fields(flat)) for stream, entry_id, flat in taken]
            block_ms = min(self._block_ms, block_ms or self._block_ms)
            block_ms = block_ms if due < 0 else max(1, min(block_ms, int(due)))
            streams = {self.own_stream: ">", self.shared_stream: ">", self._nudges: ">"}
            if batch > 0:
                streams[self.batch_stream] = ">"
            reply = await self._redis.xreadgroup(keys.CONSUMER_GROUP, self._worker_id, streams, count=count,
                                                 block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_groups(self._redis, self.model, self.own_stream)
            return []
        entries = [(as_text(stream), entry_id, fields) for stream, rows in reply or [] for entry_id, fields in rows]
        nudges = [entry_id for stream, entry_id, _ in entries if stream == self._nudges]
        if nudges:  # a wake-up, not a job: the next look takes what is overdue (or learns when it will be)
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(self._nudges, keys.CONSUMER_GROUP, *nudges)
                pipe.xdel(self._nudges, *nudges)
                await pipe.execute()
        # Several job streams may answer one blocking read (up to `count` each): rare, as all were empty just
        # before; the extra entries wait in this worker for room.
        return [entry for entry in entries if entry[0] != self._nudges]

    async def read_interactive(self, count: int) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
        """Up to `count` entries of the own and the shared stream, waiting up to `block_ms` for one: how a
        worker whose slots batch jobs fill learns that interactive work waits (worker/consumer.py)."""
        try:
            reply = await self._redis.xreadgroup(keys.CONSUMER_GROUP, self._worker_id,
                                                 {self.own_stream: ">", self.shared_stream: ">"}, count=count,
                                                 block=self._block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_groups(self._redis, self.model, self.own_stream)
            return []
        return [(as_text(stream), entry_id, fields) for stream, rows in reply or [] for entry_id, fields in rows]

    async def streams(self) -> list[str]:
        """Every stream of the model: the shared one and each engine's own."""
        return (await fleet_state.model_streams(self._redis, [self.model]))[self.model]

    async def unread_own(self, count: int) -> list[tuple[str, bytes, dict[bytes, bytes]]]:
        """Take every unread entry of the own stream (up to `count`): to hand them back when this engine
        stops serving the model."""
        reply = await self._redis.xreadgroup(keys.CONSUMER_GROUP, self._worker_id, {self.own_stream: ">"},
                                             count=count)
        return [(self.own_stream, entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]



async def ensure_groups(redis: Redis, model: str, own_stream: str) -> None:
    """The consumer group on the model's shared stream, an engine's own stream, the nudges and the batch
    stream, from id 0:
    jobs enqueued before any worker existed are served too."""
    for stream in (keys.job_stream(model), own_stream, keys.idle_nudges(model), keys.batch_stream(model)):
        try:
            await redis.xgroup_create(stream, keys.CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    await redis.sadd(keys.engine_streams(model), own_stream)


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
