"""vLLM's KV cache events as the fleet's prefix record (common/affinity.py), eviction included.

vLLM's engine core publishes every block it stores in, and evicts from, its prefix cache on a ZMQ PUB
socket (`kv_events_config`, vllm/distributed/kv_events.py): multipart messages (topic, 8-byte seq,
payload), the payload a msgpack [ts, [event, ...], data_parallel_rank] whose events are maps tagged by
"type": BlockStored {block_hashes, parent_block_hash, token_ids, block_size, medium, ...}, BlockRemoved
{block_hashes, medium, ...}, AllBlocksCleared. vLLM's hashes are its own (they salt and may change
between versions), so each stored block is re-hashed the fleet's way (common/prefix_blocks.py) from its
tokens and its parent's fleet hash, and vLLM's hash is remembered only to apply a removal.

In `prefix:{model}:<engine>` an event-fed block scores +inf: it counts until vLLM says it is gone (a block
hit again produces no event, so its age would say nothing). A store whose parent this follower never saw
(it joined late, or missed messages) is skipped: its hashes could not be the fleet's.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack
from redis.asyncio import Redis

from common import keys
from common.redis_conn import REDIS_UNAVAILABLE, describe

log = logging.getLogger(__name__)

_GPU = (None, "GPU")  # blocks offloaded elsewhere (CPU, disk) are not what a prefill finds on the GPU


class PrefixEvents:
    """Applies batches of events to the engine's record; `fleet_hash` maps vLLM's hashes to ours."""

    def __init__(self, redis: Redis, model: str, engine_id: str) -> None:
        self._redis = redis
        self._key = keys.prefix_blocks(model, engine_id)
        self._fleet_hash: dict[Any, int] = {}
        self.applied = 0  # events applied since start (the worker's log says when they flow)

    async def apply(self, payload: bytes) -> None:
        _, events, *_ = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        stored: dict[str, float] = {}
        removed: list[str] = []
        cleared = False
        for event in events:
            kind = event.get("type")
            if kind == "BlockStored" and event.get("medium") in _GPU:
                stored.update(self._store(event))
            elif kind == "BlockRemoved" and event.get("medium") in _GPU:
                for vllm_hash in event["block_hashes"]:
                    ours = self._fleet_hash.pop(_key(vllm_hash), None)
                    if ours is not None:
                        removed.append(str(ours))
                        stored.pop(str(ours), None)
            elif kind == "AllBlocksCleared":
                self._fleet_hash.clear()
                stored, removed, cleared = {}, [], True
        self.applied += len(events)
        async with self._redis.pipeline(transaction=False) as pipe:
            if cleared:
                pipe.delete(self._key)
            if removed:
                pipe.zrem(self._key, *removed)
            if stored:
                pipe.zadd(self._key, stored)
            await pipe.execute()

    def _store(self, event: dict[str, Any]) -> dict[str, float]:
        parent = event.get("parent_block_hash")
        previous = 0 if parent is None else self._fleet_hash.get(_key(parent))
        if previous is None:
            return {}
        size, tokens = int(event["block_size"]), event["token_ids"]
        stored = {}
        for i, vllm_hash in enumerate(event["block_hashes"]):
            previous = hash((previous, tuple(tokens[i * size:(i + 1) * size])))
            self._fleet_hash[_key(vllm_hash)] = previous
            stored[str(previous)] = float("inf")
        return stored


def _key(vllm_hash: Any) -> Any:
    return tuple(vllm_hash) if isinstance(vllm_hash, list) else vllm_hash


async def follow(redis: Redis, endpoint: str, model: str, engine_id: str) -> None:
    """Subscribe to the engine core's events at `endpoint` and keep the record until cancelled."""
    import zmq
    import zmq.asyncio

    events = PrefixEvents(redis, model, engine_id)
    await redis.delete(keys.prefix_blocks(model, engine_id))  # a fresh engine holds nothing yet
    context = zmq.asyncio.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.connect(endpoint)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    log.info("following %s's KV cache events at %s", model, endpoint)
    try:
        while True:
            _, _, payload = await socket.recv_multipart()
            try:
                await events.apply(payload)
            except REDIS_UNAVAILABLE as exc:  # the record is a hint: a lost batch costs cache misses
                log.warning("recording KV cache events failed: %s", describe(exc))
    finally:
        socket.close(linger=0)
