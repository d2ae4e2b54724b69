"""One pub/sub connection per gateway process, multiplexed into per-request queues.

`stream()` subscribes (and waits for the server's confirmation) before it reads what is
stored, so no chunk can fall between the two; live chunks are de-duplicated by `seq`, and a gap
(a pub/sub reconnect, a slow subscriber, a message that could not be decoded) is filled from
`req:{id}:chunks`. The one reader runs under the gateway's supervisor (common/supervision.py): if it
crashes it is restarted, and every stream re-reads what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from common import keys
from common.errors import NotFound
from common.protocol import Chunk
from common.redis_conn import REDIS_UNAVAILABLE, describe
from common.request_store import RequestStore
from common.supervision import Supervisor

log = logging.getLogger(__name__)

# Queue item meaning "you may have missed chunks: re-read the stored ones".
_RESYNC = None


class Relay:
    def __init__(self, redis: Redis, store: RequestStore, *, resync_s: float, outage_grace_s: float) -> None:
        self.redis = redis
        self.store = store
        self.resync_s = resync_s
        self.outage_grace_s = outage_grace_s
        self._pubsub: PubSub = redis.pubsub()
        self._queues: dict[str, set[asyncio.Queue[Chunk | None]]] = defaultdict(set)
        # Queues whose stream waits for its next chunk, and since when (loop time): `_wake_quiet` sends a
        # stream that heard nothing for resync_s to re-read the store. One sweep, not a timer per chunk.
        self._waiting: dict[asyncio.Queue[Chunk | None], float] = {}
        self._acks: dict[str, asyncio.Future[None]] = {}
        # Keeps the connection subscribed (so the reader always has one) even with no requests.
        self._home = f"gateway:{uuid.uuid4().hex}"
        self._unsubscribing: set[asyncio.Task[None]] = set()

    def start(self, supervisor: Supervisor) -> None:
        supervisor.start("relay", self._read_loop)
        supervisor.start("relay_resync", self._wake_quiet)

    async def close(self) -> None:
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await self._pubsub.aclose()

    async def subscribe(self, request_id: str) -> Subscription:
        """Listen to a request's channel; returns once Redis has confirmed the subscription."""
        channel = keys.chunk_channel(request_id)
        queue: asyncio.Queue[Chunk | None] = asyncio.Queue()
        await self._subscribe(channel, queue)
        return Subscription(self, request_id, channel, queue)

    async def _subscribe(self, channel: str, queue: asyncio.Queue[Chunk | None]) -> None:
        listeners = self._queues[channel]
        listeners.add(queue)
        if len(listeners) > 1:
            return  # already subscribed for another listener
        ack = self._acks[channel] = asyncio.get_running_loop().create_future()
        try:
            await self._pubsub.subscribe(channel)
            await asyncio.wait_for(ack, 5.0)
        except BaseException:
            self.unsubscribe(channel, queue)
            raise
        finally:
            self._acks.pop(channel, None)

    def unsubscribe(self, channel: str, queue: asyncio.Queue[Chunk | None]) -> None:
        listeners = self._queues.get(channel)
        if listeners is None:
            return
        listeners.discard(queue)
        if not listeners:
            del self._queues[channel]
            task = asyncio.create_task(self._quiet_unsubscribe(channel))
            self._unsubscribing.add(task)
            task.add_done_callback(self._unsubscribing.discard)

    async def _quiet_unsubscribe(self, channel: str) -> None:
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            if channel not in self._queues:
                await self._pubsub.unsubscribe(channel)

    async def _read_loop(self) -> None:
        self._resync_all()  # a restart after a crash: whatever was in flight is re-read from the store
        backoff = 0.1
        while True:
            try:
                if not self._pubsub.subscribed:
                    await self._pubsub.subscribe(self._home)
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
            except REDIS_UNAVAILABLE as exc:
                log.warning("relay lost Redis, reconnecting: %s", describe(exc))
                self._resync_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if message is not None:
                self._dispatch(message)

    async def next_in(self, queue: asyncio.Queue[Chunk | None]) -> Chunk | None:
        """The queue's next item: a chunk, or the resync marker (a gap, a reconnect, or quiet too long)."""
        self._waiting[queue] = asyncio.get_running_loop().time()
        try:
            return await queue.get()
        finally:
            self._waiting.pop(queue, None)

    async def _wake_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.resync_s / 2)
            now = loop.time()
            for queue, since in list(self._waiting.items()):
                if now - since >= self.resync_s:  # quiet for a while: make sure nothing was missed
                    del self._waiting[queue]
                    queue.put_nowait(_RESYNC)

    def _resync_all(self) -> None:
        for listeners in self._queues.values():
            for queue in listeners:
                queue.put_nowait(_RESYNC)

    def _dispatch(self, message: dict[str, object]) -> None:
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        kind = message["type"]
        if kind == "message":
            try:
                chunk: Chunk | None = Chunk.unpack(message["data"])  # type: ignore[arg-type]
            except Exception as exc:  # not a chunk (another publisher, a corrupted message): read the store
                log.warning("undecodable message on %s (%s: %s); re-reading the stored chunks", channel,
                            type(exc).__name__, exc)
                chunk = _RESYNC
            for queue in self._queues.get(channel, ()):
                queue.put_nowait(chunk)
        elif kind == "subscribe":
            ack = self._acks.get(channel)
            if ack is not None and not ack.done():
                ack.set_result(None)


class Subscription:
    def __init__(self, relay: Relay, request_id: str, channel: str, queue: asyncio.Queue[Chunk | None]) -> None:
        self._relay = relay
        self.request_id = request_id
        self._channel = channel
        self._queue = queue

    async def chunks(self, last_seq: int = 0) -> AsyncIterator[Chunk]:
        """Chunks with seq > last_seq, in order, each once, through the final one. Chunks that are here
        together when the consumer asks (it fell behind, or a re-read of the stored ones) come merged as
        one: a consumer that cannot keep up gets fewer, bigger chunks rather than a growing queue, so the
        coalescing grows with the load, and a consumer that keeps up gets each chunk as it comes."""
        delivered = last_seq
        arrived = await self._stored_after(delivered)
        while True:
            ready, resync = self._contiguous(arrived, delivered)
            if ready:
                chunk = Chunk.merged(ready)
                delivered = chunk.seq
                yield chunk
                if chunk.finish_reason is not None:
                    return
            live = _RESYNC if resync else await self._relay.next_in(self._queue)
            if live is not _RESYNC:
                arrived = [live]
                continue
            arrived = await self._stored_after(delivered)
            if not arrived and not await self._relay.redis.exists(keys.request(self.request_id)):
                raise NotFound(f"request {self.request_id} expired")

    def _contiguous(self, arrived: list[Chunk], delivered: int) -> tuple[list[Chunk], bool]:
        """The chunks after `delivered`, in order, from `arrived` and whatever else is queued now; and
        whether a gap (or a resync marker) says the stored chunks must be read."""
        ready: list[Chunk] = []
        expected = delivered + 1
        pending = iter(arrived)
        while not (ready and ready[-1].finish_reason is not None):
            chunk = next(pending, None)
            if chunk is None:
                if self._queue.empty():
                    return ready, False
                chunk = self._queue.get_nowait()
                if chunk is _RESYNC:
                    return ready, True
            if chunk.seq < expected:
                continue  # already sent (stored and live copies overlap)
            if chunk.seq > expected:
                return ready, True  # a gap: fetch the stored chunks below
            ready.append(chunk)
            expected += 1
        return ready, False

    async def _stored_after(self, seq: int) -> list[Chunk]:
        """The stored chunks after `seq`. A stream rides out a Redis outage (a restart) of up to
        `outage_grace_s`: it pauses and goes on, rather than failing the client's request."""
        deadline = time.monotonic() + self._relay.outage_grace_s
        while True:
            try:
                return await self._relay.store.chunks_after(self.request_id, seq)
            except REDIS_UNAVAILABLE:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    def close(self) -> None:
        self._relay.unsubscribe(self._channel, self._queue)
