"""Admission (429 at the cap), the KV budget (workers pull only what fits), and cancellation."""

from __future__ import annotations

import asyncio

from common import keys
from tests.conftest import TEST_MODEL, StartFleet
from tests.test_faults import wait_until


async def test_429_with_retry_after_at_the_cap_and_every_accepted_request_completes(
    start_fleet: StartFleet, redis
) -> None:
    fleet = await start_fleet(workers=0, max_outstanding=3, retry_after_s=2)
    # A worker registers the model, then leaves: jobs now wait in the stream.
    await fleet.start_worker()
    await fleet.wait_ready()
    await fleet.stop_workers()

    accepted, refused = [], []
    for i in range(6):
        status, reply, response = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": f"r{i}",
                                                                     "max_tokens": 5})
        if status == 202:
            accepted.append(reply["request_id"])
        else:
            assert status == 429 and response.headers["Retry-After"] == "2"
            assert reply["error"]["type"] == "rate_limit_error"
            refused.append(reply)
    assert len(accepted) == 3 and len(refused) == 3
    assert await redis.xlen(keys.job_stream(TEST_MODEL)) == 3

    await fleet.start_worker()
    for request_id in accepted:
        assert (await fleet.wait_done(request_id))["status"] == "completed"
    # Capacity is back once the work is done.
    assert (await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "again"}))[0] == 202


async def test_worker_pulls_only_what_its_kv_budget_admits(start_fleet: StartFleet, redis) -> None:
    # Room for one job of 10 prompt + 90 new tokens at a time.
    fleet = await start_fleet(engine={"kv_cache_tokens": 150, "step_delay_ms": 10})
    ids = [await fleet.submit(prompt="0123456789", max_tokens=90) for _ in range(3)]

    async def states() -> list[str]:
        return [(await fleet.get(f"/v1/requests/{i}"))[1]["status"] for i in ids]

    await wait_until(lambda: _running(states, 1))
    assert (await states()).count("queued") == 2
    # The worker holds at most the one job waiting for budget besides the running one.
    pending = await redis.xpending(keys.job_stream(TEST_MODEL), keys.CONSUMER_GROUP)
    assert pending["pending"] <= 2
    budget = fleet.workers[0].budgets[TEST_MODEL]
    assert budget.used_tokens == 100
    for request_id in ids:
        assert (await fleet.wait_done(request_id))["status"] == "completed"
    # The worker releases the budget right after its final write, which a poll may see first.
    async with asyncio.timeout(2):
        while budget.used_tokens:
            await asyncio.sleep(0.01)


async def test_cancelling_a_queued_request_means_it_never_runs(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet(engine={"max_num_seqs": 1, "step_delay_ms": 10})
    blocker = await fleet.submit(prompt="block", max_tokens=60)
    waiting = await fleet.submit(prompt="never", max_tokens=5)
    status, reply = await fleet.delete(f"/v1/requests/{waiting}")
    assert status == 200 and reply["status"] == "cancelled"
    assert (await fleet.wait_done(blocker))["status"] == "completed"
    stream = keys.job_stream(TEST_MODEL)
    await wait_until(lambda: _all_acked(redis, stream))  # the worker read the cancelled entry and skipped it
    cancelled = (await fleet.get(f"/v1/requests/{waiting}"))[1]
    assert cancelled["status"] == "cancelled" and cancelled["text"] == ""
    assert cancelled["timings"]["queue_s"] is None  # it never started
    assert not await redis.smembers(keys.skipped_jobs(TEST_MODEL))
    # Cancelling twice keeps the first outcome.
    assert (await fleet.delete(f"/v1/requests/{waiting}"))[1]["status"] == "cancelled"
    assert (await fleet.delete(f"/v1/requests/{blocker}"))[1]["status"] == "completed"


async def test_cancelling_a_running_request_aborts_it_and_frees_its_kv_budget(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 10})
    request_id = await fleet.submit(prompt="long", max_tokens=3000)
    budget = fleet.workers[0].budgets[TEST_MODEL]
    async with asyncio.timeout(5):
        while (await fleet.get(f"/v1/requests/{request_id}"))[1]["usage"]["completion_tokens"] == 0:
            await asyncio.sleep(0.02)
    assert budget.used_tokens == 3004
    assert (await fleet.delete(f"/v1/requests/{request_id}"))[1]["status"] == "cancelled"
    async with asyncio.timeout(5):
        while budget.used_tokens:
            await asyncio.sleep(0.02)
    done = await fleet.wait_done(request_id)
    tokens_then = done["usage"]["completion_tokens"]
    assert done["status"] == "cancelled" and tokens_then < 3000
    await asyncio.sleep(0.2)  # nothing more is appended after the cancel
    assert (await fleet.get(f"/v1/requests/{request_id}"))[1]["usage"]["completion_tokens"] == tokens_then


async def test_a_burst_larger_than_the_redis_pool_waits_for_connections_instead_of_failing(
    start_fleet: StartFleet,
) -> None:
    """Seen on the GPU machine: 100 concurrent streams on a pool of 100 gave 503 'Too many connections'."""
    fleet = await start_fleet(redis_max_connections=4)
    replies = await asyncio.gather(*(
        fleet.post("/v1/completions", {"model": TEST_MODEL, "prompt": f"burst {i}", "max_tokens": 4})
        for i in range(60)
    ))
    assert [status for status, _, _ in replies] == [200] * 60
    assert all(reply["choices"][0]["text"] == f"burst {i}"[:4] for i, (_, reply, _) in enumerate(replies))


async def test_a_job_larger_than_the_whole_kv_capacity_fails_with_the_reason_and_does_not_block_the_queue(
    start_fleet: StartFleet,
) -> None:
    """The gateway checks the context length; a worker whose KV cache is smaller than that (a small
    GPU) must not wait forever for room that never comes."""
    fleet = await start_fleet(engine={"kv_cache_tokens": 64})
    too_big = await fleet.submit(prompt="x", max_tokens=100)
    small = await fleet.submit(prompt="ok", max_tokens=4)
    failed = await fleet.wait_done(too_big)
    assert failed["status"] == "failed" and "101 KV tokens" in failed["error"] and "64" in failed["error"]
    assert (await fleet.wait_done(small))["text"] == "okok"


async def _running(states, count: int) -> bool:
    return (await states()).count("running") == count


async def _all_acked(redis, stream: str) -> bool:
    return await redis.xlen(stream) == 0 and (await redis.xpending(stream, keys.CONSUMER_GROUP))["pending"] == 0


async def test_cancelling_queued_requests_keeps_the_lag_keda_scales_on_defined(start_fleet: StartFleet, redis) -> None:
    """KEDA's redis-streams scaler (lagCount) reads XINFO GROUPS `lag` and wants ceil(lag / lagCount)
    workers. Deleting an entry no worker has read makes Redis report lag as nil (KEDA then cannot
    scale from zero); a cancel leaves the entry for a worker to skip, so lag stays a number, and
    admission stops counting the cancelled ones at once."""
    fleet = await start_fleet(workers=0, max_outstanding=3)
    await fleet.start_worker()
    await fleet.wait_ready()
    await fleet.stop_workers()  # scaled to zero: requests queue, nobody reads them
    ids = [await fleet.submit(prompt=f"queued {i} ", max_tokens=5) for i in range(3)]
    assert (await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "full"}))[0] == 429
    assert (await fleet.delete(f"/v1/requests/{ids[0]}"))[1]["status"] == "cancelled"
    [group] = await redis.xinfo_groups(keys.job_stream(TEST_MODEL))
    assert group["lag"] == 3
    lag_count = 2  # the chart's autoscaling.lagCount, say
    assert -(-group["lag"] // lag_count) == 2  # KEDA's desired replicas
    # The cancelled one no longer holds a place in the queue.
    ids.append(await fleet.submit(prompt="queued 3 ", max_tokens=5))
    async with fleet.http.get(fleet.base_url + "/metrics") as response:
        text = await response.text()
    assert f'llm_fleet_queue_lag{{model="{TEST_MODEL}"}} 4.0' in text
    assert f'llm_fleet_queue_outstanding{{model="{TEST_MODEL}"}} 3.0' in text

    await fleet.start_worker()  # scaled up: the worker skips the cancelled entry and runs the rest
    for i, request_id in enumerate(ids[1:], start=1):
        assert (await fleet.wait_done(request_id))["text"] == f"queued {i} "[:5]
    stream = keys.job_stream(TEST_MODEL)
    await wait_until(lambda: _all_acked(redis, stream))
    [group] = await redis.xinfo_groups(stream)
    assert group["lag"] == 0 and not await redis.smembers(keys.skipped_jobs(TEST_MODEL))
