"""Prefix affinity (common/affinity.py): a job goes to the engine that holds its prompt's prefix, on
that engine's own stream; everything the queue promises holds across the streams: admission counts
them all, a busy or dead engine's jobs are taken by another after the wait, a drain hands its routed
jobs back, housekeeping drops a dead engine's empty stream. Real Valkey, real workers (test engine
with its simulated prefix cache)."""

from __future__ import annotations

import asyncio
import signal
import time

import msgpack
import redis.asyncio as aioredis

from common import fleet_state, keys
from common.affinity import AffinityPolicy, EngineLoad, route_arg
from common.prefix_blocks import block_hashes
from common.protocol import Job
from common.request_store import RequestStore
from tests.conftest import TEST_MODEL, Fleet, StartFleet
from worker import housekeeping, kv_events

BLOCK = 16
PROMPT = list(range(100, 100 + 8 * BLOCK))  # eight whole blocks
POLICY = AffinityPolicy()


async def _holds(redis: aioredis.Redis, engine: str, token_ids: list[int], *, at: float | None = None) -> None:
    """Record that `engine` holds these blocks (as its worker would), last used `at`."""
    stamp = time.time() if at is None else at
    await redis.zadd(keys.prefix_blocks(TEST_MODEL, engine), {str(h): stamp for h in block_hashes(token_ids, BLOCK)})


async def _enqueue(store: RequestStore, request_id: str, engines: list[EngineLoad], prompt: list[int] = PROMPT,
                   max_outstanding: int = 100, policy: AffinityPolicy = POLICY) -> str | None:
    job = Job(request_id=request_id, model=TEST_MODEL, prompt_token_ids=prompt, sampling={"max_tokens": 4},
              enqueued_at=time.time())
    ref = await store.enqueue(job, max_outstanding=max_outstanding, ttl_s=60,
                              route=route_arg(TEST_MODEL, prompt, BLOCK, engines, policy))
    assert ref is None or isinstance(ref, str)
    return ref


def _engine_of(ref: str | None) -> str | None:
    assert ref is not None
    return ref.partition("@")[2] or None


async def test_the_engine_holding_the_prefix_gets_the_job_else_the_shared_stream(redis: aioredis.Redis) -> None:
    store = RequestStore(redis)
    idle = [EngineLoad("a", 0, 8), EngineLoad("b", 0, 8), EngineLoad("c", 0, 8)]
    assert _engine_of(await _enqueue(store, "r0", idle)) is None, "nobody holds it: any worker may take it"
    await _holds(redis, "b", PROMPT[: 6 * BLOCK])
    ref = await _enqueue(store, "r1", idle)
    assert _engine_of(ref) == "b"
    assert (await redis.hget(keys.request("r1"), "entry")).decode() == ref
    assert await redis.xlen(keys.job_stream(TEST_MODEL, "b")) == 1
    assert await redis.smembers(keys.engine_streams(TEST_MODEL)) == {keys.job_stream(TEST_MODEL, "b").encode()}
    # Where idle workers look for overdue jobs: b's stream, since its entry's time.
    [(waiting, since)] = await redis.zrange(keys.waiting_engine_streams(TEST_MODEL), 0, -1, withscores=True)
    assert waiting.decode() == keys.job_stream(TEST_MODEL, "b") and since == int(ref.split("-")[0])

    # Everyone holds it (a shared system prompt): affinity buys nothing, the pull decides.
    await _holds(redis, "a", PROMPT)
    await _holds(redis, "c", PROMPT)
    await _holds(redis, "b", PROMPT)
    assert _engine_of(await _enqueue(store, "r2", idle)) is None

    # A record older than prefix_fresh_s counts as evicted.
    await redis.delete(*(keys.prefix_blocks(TEST_MODEL, e) for e in "abc"))
    await _holds(redis, "c", PROMPT, at=time.time() - POLICY.fresh_s - 5)
    assert _engine_of(await _enqueue(store, "r3", idle)) is None
    await _holds(redis, "c", PROMPT)
    assert _engine_of(await _enqueue(store, "r4", idle)) == "c"

    # Under a block of prompt there is nothing to route on.
    assert route_arg(TEST_MODEL, PROMPT[: BLOCK - 1], BLOCK, idle, POLICY) is None
    assert route_arg(TEST_MODEL, PROMPT, BLOCK, idle[:1], POLICY) is None, "one engine: nothing to choose"


async def test_load_spreads_a_hot_prefix_and_a_full_own_stream_takes_no_more(redis: aioredis.Redis) -> None:
    store = RequestStore(redis)
    await _holds(redis, "a", PROMPT)
    await _holds(redis, "b", PROMPT)
    # Two idle engines hold it ("c" does not, so affinity gains): the jobs alternate as each one's queue grows.
    engines = [EngineLoad("a", 0, 8), EngineLoad("b", 0, 8), EngineLoad("c", 0, 8)]
    assert [_engine_of(await _enqueue(store, f"s{i}", engines)) for i in range(4)] == ["a", "b", "a", "b"]
    # A stream deleted behind the fleet's back (its group with it) comes back, group and all.
    await redis.delete(keys.job_stream(TEST_MODEL, "a"), keys.job_stream(TEST_MODEL, "b"))
    assert _engine_of(await _enqueue(store, "s4", engines)) == "a"
    assert (await redis.xinfo_groups(keys.job_stream(TEST_MODEL, "a")))[0]["lag"] == 1

    await _holds(redis, "d", PROMPT)
    await _holds(redis, "e", PROMPT)
    # "d" is full and "e" has room for 2: "e" wins while its own stream has room, then the busy "d" (it
    # holds the prefix and its stream has room), never "c".
    engines = [EngineLoad("d", 8, 8), EngineLoad("e", 0, 2), EngineLoad("c", 0, 8)]
    routed = [_engine_of(await _enqueue(store, f"r{i}", engines)) for i in range(4)]
    assert routed == ["e", "e", "d", "d"]
    # Both own streams full: the shared stream, where any worker (and KEDA) sees it.
    engines = [EngineLoad("d", 8, 2), EngineLoad("e", 0, 2), EngineLoad("c", 0, 8)]
    assert _engine_of(await _enqueue(store, "r4", engines)) is None


async def test_admission_and_queue_views_count_every_stream(redis: aioredis.Redis) -> None:
    store = RequestStore(redis)
    await redis.hset(keys.MODELS, TEST_MODEL, b"")  # the model is registered (queues() lists registered ones)
    await _holds(redis, "a", PROMPT)
    engines = [EngineLoad("a", 0, 8), EngineLoad("b", 0, 8)]
    assert _engine_of(await _enqueue(store, "r0", engines, max_outstanding=3)) == "a"
    assert _engine_of(await _enqueue(store, "r1", engines, max_outstanding=3)) == "a"
    assert _engine_of(await _enqueue(store, "r2", engines, prompt=[1] * 40, max_outstanding=3)) is None
    assert await _enqueue(store, "r3", engines, max_outstanding=3) is None, "3 outstanding over two streams: full"
    assert await store.cancel("r0", TEST_MODEL, result_ttl_s=60) == "cancelled"
    assert _engine_of(await _enqueue(store, "r4", engines, max_outstanding=3)) == "a", "a cancel frees a place"

    queue = (await fleet_state.queues(redis))[TEST_MODEL]
    assert queue["outstanding"] == 3 and queue["waiting"] == 3
    assert queue["waiting_in_engine_streams"] == 3  # the cancelled one counts there until a worker reads it
    assert queue["lag"] == 3  # the engine stream's group (the shared stream has none: no worker ever read it)


async def test_the_queue_autoscalers_read_counts_jobs_waiting_in_every_stream(start_fleet: StartFleet,
                                                                              redis: aioredis.Redis) -> None:
    """KEDA's metrics-api trigger (helm chart) reads GET /queue/<model> `waiting`: jobs routed to engines'
    own streams and batch jobs count there too, which the redis-streams triggers (shared and batch stream
    only) would miss. Public like /metrics; a model nobody registered yet reads 0 (a group scaled to zero)."""
    fleet = await start_fleet(workers=0, auth=True)
    store = RequestStore(redis)
    await redis.hset(keys.MODELS, TEST_MODEL, b"")
    await _holds(redis, "a", PROMPT)
    engines = [EngineLoad("a", 0, 8), EngineLoad("b", 0, 8)]
    for i in range(3):
        assert _engine_of(await _enqueue(store, f"r{i}", engines)) == "a"
    assert _engine_of(await _enqueue(store, "r3", engines, prompt=[1] * 40)) is None
    batch = Job(request_id="b0", model=TEST_MODEL, prompt_token_ids=[1, 2], sampling={"max_tokens": 4},
                enqueued_at=time.time(), priority="batch")
    assert await store.enqueue(batch, max_outstanding=100, ttl_s=60) is not None

    async with fleet.http.get(f"{fleet.base_url}/queue/{TEST_MODEL}") as response:  # no API key: public
        assert response.status == 200, await response.text()
        queue = await response.json()
    assert queue["waiting"] == 5 and queue["waiting_in_engine_streams"] == 3 and queue["batch_waiting"] == 1
    same = (await fleet_state.queues(redis))[TEST_MODEL]
    assert {**queue, "oldest_waiting_s": 0} == {**same, "oldest_waiting_s": 0} and queue["oldest_waiting_s"] > 0
    async with fleet.http.get(f"{fleet.base_url}/queue/never-registered") as response:
        assert response.status == 200 and (await response.json())["waiting"] == 0


async def _engines_seen(fleet: Fleet, count: int) -> None:
    async with asyncio.timeout(10):
        while len(await fleet.gateway.registry.engines(TEST_MODEL)) < count:
            await asyncio.sleep(0.1)


async def _worker_of(redis: aioredis.Redis, request_id: str) -> str:
    return (await redis.hget(keys.request(request_id), "worker")).decode()


async def test_conversations_stay_with_the_worker_that_cached_them(start_fleet: StartFleet,
                                                                   redis: aioredis.Redis) -> None:
    fleet = await start_fleet(workers=3)
    await _engines_seen(fleet, 3)
    conversations = {f"c{i}": f"conversation {i} begins with its own long system prompt, " * 3 for i in range(4)}
    home: dict[str, str] = {}
    for turn in range(4):
        ids = {}
        for name in conversations:
            conversations[name] += f" turn {turn}: tell me more about {name}."
            ids[name] = await fleet.submit(prompt=conversations[name], max_tokens=4)
        for name, request_id in ids.items():
            result = await fleet.wait_done(request_id)
            worker = await _worker_of(redis, request_id)
            if turn == 0:
                home[name] = worker
                continue
            assert worker == home[name], f"{name} turn {turn} left its worker"
            prompt_tokens = result["usage"]["prompt_tokens"]
            assert result["usage"]["prompt_tokens_details"]["cached_tokens"] >= prompt_tokens - 3 * BLOCK
        await asyncio.sleep(0.2)  # the workers' prefix records are written every 50 ms
    async with fleet.http.get(fleet.base_url + "/metrics") as response:
        text = await response.text()
    assert f'llm_fleet_jobs_routed_total{{model="{TEST_MODEL}",to="engine"}} 12.0' in text


async def test_a_busy_engines_job_is_taken_by_an_idle_one_after_the_wait(start_fleet: StartFleet,
                                                                      redis: aioredis.Redis) -> None:
    fleet = await start_fleet(workers=0)
    busy = await fleet.start_worker(max_num_seqs=1, step_delay_ms=20)
    await fleet.wait_ready()
    prompt = "a prefix that the busy worker has cached, several blocks long. " * 2
    await fleet.wait_done(await fleet.submit(prompt=prompt + "warm", max_tokens=2))
    long_job = await fleet.submit(prompt="x" * 40, max_tokens=400)  # 8 s on the busy worker
    async with asyncio.timeout(5):
        while await _worker_of_or_none(redis, long_job) != busy.worker_id:
            await asyncio.sleep(0.01)
    # A long blocking read: the idle worker must be woken (a nudge), not find the job on its next look.
    idle = await fleet.start_worker({"read_block_ms": 4000}, max_num_seqs=4)
    await _engines_seen(fleet, 2)
    await asyncio.sleep(0.2)  # the busy worker's prefix record is written
    started = time.monotonic()
    routed = await fleet.submit(prompt=prompt + "next", max_tokens=2)
    assert (await redis.hget(keys.request(routed), "entry")).decode().endswith("@" + busy.worker_id)
    await fleet.wait_done(routed)
    assert await _worker_of(redis, routed) == idle.worker_id
    assert time.monotonic() - started < 0.8, "taken after the bounded wait, not after a blocking read or the job"
    assert idle.metrics.jobs_taken.labels(TEST_MODEL, "other")._value.get() == 1
    assert not await redis.zcard(keys.waiting_engine_streams(TEST_MODEL)), "nothing waits any more"
    assert (await fleet.get(f"/v1/requests/{long_job}"))[1]["status"] == "running"
    await fleet.delete(f"/v1/requests/{long_job}")


async def _worker_of_or_none(redis: aioredis.Redis, request_id: str) -> str | None:
    worker = await redis.hget(keys.request(request_id), "worker")
    return worker.decode() if worker else None


async def test_a_killed_engines_stream_is_drained_by_the_others(start_fleet: StartFleet,
                                                              redis: aioredis.Redis) -> None:
    fleet = await start_fleet(workers=0)
    victim = fleet.spawn_worker("victim", max_num_seqs=4, step_delay_ms=20)
    await fleet.wait_ready()
    prefix = "the victim's cached prefix, long enough for a few blocks of the cache. " * 2
    await fleet.wait_done(await fleet.submit(prompt=prefix + "warm", max_tokens=2))
    survivor = await fleet.start_worker(max_num_seqs=16)
    await _engines_seen(fleet, 2)
    await asyncio.sleep(0.2)
    ids = [await fleet.submit(prompt=prefix + f"job {i}", max_tokens=40) for i in range(12)]
    assert await redis.xlen(keys.job_stream(TEST_MODEL, "victim")) > 0, "some were routed to the victim"
    await asyncio.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    results = [await fleet.wait_done(request_id, timeout_s=30) for request_id in ids]
    for i, result in enumerate(results):
        assert result["status"] == "completed", result
        expected = (prefix + f"job {i}") * 2
        assert result["text"] == expected[:40]
    assert survivor.metrics.reclaimed.labels(TEST_MODEL)._value.get() + \
        survivor.metrics.jobs_taken.labels(TEST_MODEL, "other")._value.get() > 0

    await asyncio.sleep(2.5)  # the victim's heartbeat expires
    await housekeeping.sweep(redis)  # (the workers' cron may have run it already)
    assert await redis.smembers(keys.engine_streams(TEST_MODEL)) == {keys.job_stream(TEST_MODEL, "w0").encode()}
    assert not await redis.exists(keys.job_stream(TEST_MODEL, "victim"), keys.prefix_blocks(TEST_MODEL, "victim"))


async def test_a_drained_worker_hands_its_routed_jobs_back(start_fleet: StartFleet, redis: aioredis.Redis) -> None:
    fleet = await start_fleet(workers=0)
    owner = await fleet.start_worker({"drain_timeout_s": 0.2}, max_num_seqs=1, step_delay_ms=20)
    await fleet.wait_ready()
    prefix = "the owner's cached prefix, long enough for a few blocks of the cache. " * 2
    await fleet.wait_done(await fleet.submit(prompt=prefix + "warm", max_tokens=2))
    other = await fleet.start_worker(max_num_seqs=1, step_delay_ms=20)
    await _engines_seen(fleet, 2)
    await asyncio.sleep(0.2)
    # Both busy with a long job each; then a job routed to the owner waits in its own stream.
    blockers = [await fleet.submit(prompt="y" * 20 + str(i), max_tokens=60) for i in range(2)]
    async with asyncio.timeout(5):
        while {await _worker_of_or_none(redis, b) for b in blockers} != {owner.worker_id, other.worker_id}:
            await asyncio.sleep(0.01)
    routed = await fleet.submit(prompt=prefix + "routed", max_tokens=5)
    assert (await redis.hget(keys.request(routed), "entry")).decode().endswith("@" + owner.worker_id)
    owner.stop()
    results = [await fleet.wait_done(request_id, timeout_s=20) for request_id in [*blockers, routed]]
    assert [r["status"] for r in results] == ["completed"] * 3
    assert results[2]["text"] == (prefix + "routed")[:5]
    assert await _worker_of(redis, routed) == other.worker_id
    assert await redis.xlen(keys.job_stream(TEST_MODEL, owner.worker_id)) == 0


def _batch(*events: dict[str, object]) -> bytes:
    """A payload as vLLM's ZmqEventPublisher sends it: msgpack [ts, events, data_parallel_rank], each
    event a map tagged by "type" (vllm/distributed/kv_events.py)."""
    return msgpack.packb([time.time(), list(events), 0])


def _stored(hashes: list[bytes], parent: bytes | None, tokens: list[int], medium: str = "GPU") -> dict[str, object]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": BLOCK, "lora_id": None, "medium": medium, "lora_name": None}


async def test_vllm_kv_cache_events_keep_the_prefix_record_with_evictions(redis: aioredis.Redis, tmp_path) -> None:
    import zmq

    endpoint = f"ipc://{tmp_path}/kv-events"
    publisher = zmq.Context.instance().socket(zmq.PUB)
    publisher.bind(endpoint)
    record = keys.prefix_blocks(TEST_MODEL, "e1")
    follower = asyncio.create_task(kv_events.follow(redis, endpoint, TEST_MODEL, "e1"))
    ours = [str(h) for h in block_hashes(PROMPT, BLOCK)]

    async def send(*events: dict[str, object]) -> None:
        publisher.send_multipart([b"", (0).to_bytes(8, "big"), _batch(*events)])
        await asyncio.sleep(0.1)

    try:
        first = _stored([b"v0", b"v1", b"v2"], None, PROMPT[: 3 * BLOCK])
        async with asyncio.timeout(5):  # a SUB socket misses what is sent before it has connected
            while not await redis.zcard(record):
                await send(first)
        await send(_stored([b"v3", b"v4", b"v5", b"v6", b"v7"], b"v2", PROMPT[3 * BLOCK:]),
                   _stored([b"x9"], b"never-seen", PROMPT[:BLOCK]),  # its parent is unknown: skipped
                   _stored([b"c0"], None, [7] * BLOCK, medium="CPU"))  # offloaded: not on the GPU
        members = {m.decode(): s for m, s in await redis.zrange(record, 0, -1, withscores=True)}
        assert members == dict.fromkeys(ours, float("inf"))
        # An event-fed record counts whatever its age, and routes the prompt to its engine.
        engines = [EngineLoad("e1", 0, 8), EngineLoad("e2", 0, 8)]
        assert _engine_of(await _enqueue(RequestStore(redis), "r0", engines)) == "e1"

        await send({"type": "BlockRemoved", "block_hashes": [b"v7", b"v6"], "medium": "GPU"})
        assert sorted(m.decode() for m in await redis.zrange(record, 0, -1)) == sorted(ours[:6])
        await send({"type": "AllBlocksCleared"})
        assert not await redis.exists(record)
    finally:
        follower.cancel()
        publisher.close(linger=0)
