"""Smooth streams: a lone stream gets each token as the engine makes it; as load rises, output is
coalesced by what the last flush cost (worker) and by how far a reader fell behind (gateway), never by
a fixed delay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from common.embedded_redis import EmbeddedValkey
from common.protocol import Chunk, FinishReason, Job
from common.request_store import RequestStore
from common.supervision import Supervisor
from gateway.relay import Relay
from tests.conftest import TEST_MODEL, StartFleet, ws_collect
from worker.engines.base import EngineOutput
from worker.publisher import ChunkPublisher

WORKER = "w-stream"


async def test_a_lone_stream_gets_a_chunk_per_token(start_fleet: StartFleet) -> None:
    """One token per engine step (40 ms here): each goes out in its own chunk, none waits for company."""
    fleet = await start_fleet(engine={"step_delay_ms": 40})
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"model": TEST_MODEL, "prompt": "abcdefgh", "max_tokens": 8})
        request_id = (await ws.receive_json())["request_id"]
        messages = (await ws_collect(ws, {request_id}))[request_id]
    chunks = [m for m in messages if m["type"] == "chunk"]
    assert [c["text"] for c in chunks] == list("abcdefgh")
    assert [c["seq"] for c in chunks] == list(range(1, 9))


@pytest.fixture
async def store_with_request(redis: aioredis.Redis) -> AsyncIterator[tuple[RequestStore, str]]:
    """A request enqueued and started by WORKER, as the worker would have it."""
    store = RequestStore(redis)
    job = Job(request_id=f"r{time.monotonic_ns()}", model=TEST_MODEL, prompt_token_ids=[1, 2],
              sampling={"max_tokens": 8}, enqueued_at=time.time())
    assert await store.enqueue(job, max_outstanding=100, ttl_s=60)
    [started] = await store.start([job.request_id], WORKER, max_attempts=3)
    assert started.status == "running"
    yield store, job.request_id


async def test_output_that_arrives_during_a_slow_flush_goes_out_together_in_the_next(
    redis: aioredis.Redis, valkey: EmbeddedValkey, store_with_request: tuple[RequestStore, str]
) -> None:
    """The first token's flush stalls (Redis paused 300 ms); the four tokens made meanwhile go out as one
    chunk right after it, with no delay of their own."""
    store, request_id = store_with_request
    publisher = ChunkPublisher(redis, store, WORKER, flush_interval_s=0, request_ttl_s=60, result_ttl_s=60,
                               on_lost=lambda _: None)
    runner = asyncio.create_task(publisher.run())
    try:
        publisher.open(request_id, last_seq=0, prompt_tokens=2)
        async with aioredis.from_url(valkey.url) as admin:
            await admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
        publisher.add(EngineOutput(request_id, "a", [97]))
        await asyncio.sleep(0.05)  # that flush is in Redis's hands now
        for text in "bcde":
            publisher.add(EngineOutput(request_id, text, [ord(text)]))
        assert await publisher.finish(EngineOutput(request_id, "", [], finish_reason=FinishReason.LENGTH)) == 1
    finally:
        runner.cancel()
    chunks = await store.chunks_after(request_id, 0)
    assert [(c.seq, c.text) for c in chunks] == [(1, "a"), (2, "bcde")]
    assert chunks[-1].finish_reason == FinishReason.LENGTH and chunks[-1].completion_tokens == 5


async def test_a_reader_that_fell_behind_gets_what_is_waiting_merged_into_one_chunk(
    redis: aioredis.Redis, store_with_request: tuple[RequestStore, str]
) -> None:
    """Chunks that piled up for a subscriber come as one (all the text, the last seq); the next chunk,
    read as it comes, comes alone."""
    store, request_id = store_with_request
    relay = Relay(redis, store, resync_s=5.0, outage_grace_s=1.0)
    supervisor = Supervisor(on_crash=lambda task: None, on_failed=lambda task: None)
    relay.start(supervisor)
    try:
        async with asyncio.timeout(5):
            while not relay._pubsub.subscribed:  # its reader is up (as in a gateway before it serves)
                await asyncio.sleep(0.01)
        subscription = await relay.subscribe(request_id)
        for seq, text in enumerate("abc", start=1):
            await store.run_scripts([store.append(request_id, WORKER, Chunk(seq=seq, text=text, token_ids=[seq]),
                                                  seq, 60)])
        async with asyncio.timeout(5):
            while subscription._queue.qsize() < 3:  # the relay has handed all three over
                await asyncio.sleep(0.01)
        stream = subscription.chunks()
        first = await anext(stream)
        assert (first.seq, first.text, first.token_ids) == (3, "abc", [1, 2, 3])
        final = Chunk(seq=4, text="d", token_ids=[4], finish_reason=FinishReason.STOP, completion_tokens=4)
        await store.run_scripts([store.finish(request_id, WORKER, final, result_ttl_s=60)])
        second = await anext(stream)
        assert (second.seq, second.text, second.finish_reason) == (4, "d", FinishReason.STOP)
        subscription.close()
    finally:
        await supervisor.stop()
        await relay.close()


async def test_a_batch_jobs_output_is_written_at_its_first_token_then_only_at_its_interval_and_end(
    redis: aioredis.Redis, store_with_request: tuple[RequestStore, str]
) -> None:
    """Nobody streams a batch job: after the first output (written at once: it is the progress a restarted
    job's poison check counts), tokens wait for the job's interval or its end, in one chunk."""
    store, request_id = store_with_request
    publisher = ChunkPublisher(redis, store, WORKER, flush_interval_s=0, request_ttl_s=60, result_ttl_s=60,
                               on_lost=lambda _: None)
    runner = asyncio.create_task(publisher.run())
    try:
        publisher.open(request_id, last_seq=0, prompt_tokens=2, interval_s=30.0)
        publisher.add(EngineOutput(request_id, "a", [97]))
        async with asyncio.timeout(5):
            while not await store.chunks_after(request_id, 0):
                await asyncio.sleep(0.01)
        for text in "bcde":
            publisher.add(EngineOutput(request_id, text, [ord(text)]))
            await asyncio.sleep(0.02)  # flushes run meanwhile, each one finds it not due
        assert [c.text for c in await store.chunks_after(request_id, 0)] == ["a"]
        assert await publisher.finish(EngineOutput(request_id, "", [], finish_reason=FinishReason.LENGTH)) == 1
    finally:
        runner.cancel()
    assert [(c.seq, c.text) for c in await store.chunks_after(request_id, 0)] == [(1, "a"), (2, "bcde")]
