"""Nothing lost: killed workers, poison jobs, SIGTERM drains, gateway and Redis restarts.

Workers that must die for real run as their own processes (SIGKILL, SIGTERM); the test engine
echoes the prompt, and a continued job echoes on from where it stopped, so "the exact text of
an uninterrupted run, seqs 1..N once each" proves no gap, no duplicate, no restart.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp

from common import keys
from common.embedded_redis import EmbeddedValkey
from tests.conftest import TEST_MODEL, Fleet, StartFleet, ws_collect


def echo(prompt: str, max_tokens: int) -> str:
    """What the test engine writes for an ASCII prompt, run without interruption."""
    return (prompt * (max_tokens // len(prompt) + 1))[:max_tokens]


def assert_contiguous(messages: list[dict[str, Any]], *, after: int = 0) -> str:
    """The WebSocket messages of one request: chunk seqs increase from after+1 on (a chunk may carry
    several stored pieces: its seq is the last), then `done` (whose seq may be one more, for a final
    chunk without text). Returns the text (callers compare it whole: no gaps, no duplicates)."""
    chunks = [m for m in messages if m["type"] == "chunk"]
    done = [m for m in messages if m["type"] == "done"]
    assert len(done) == 1 and messages[-1] is done[0], messages[-3:]
    seqs = [c["seq"] for c in chunks]
    assert seqs == sorted(set(seqs)) and (not seqs or seqs[0] > after), seqs
    assert done[0]["seq"] in ({seqs[-1], seqs[-1] + 1} if seqs else {after + 1}), (seqs, done)
    return "".join(c["text"] for c in chunks)


async def wait_until(predicate: Any, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await predicate():
            await asyncio.sleep(0.05)


async def worker_of(redis: Any, request_id: str) -> str | None:
    owner = await redis.hget(keys.request(request_id), "worker")
    return owner.decode() if owner else None


async def chunk_messages(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    return [await ws.receive_json() for _ in range(count)]


async def test_a_killed_workers_job_is_reclaimed_and_continued_with_no_gap_or_duplicate(
    start_fleet: StartFleet, redis
) -> None:
    fleet = await start_fleet(workers=0)
    doomed = fleet.spawn_worker("doomed", step_delay_ms=20)
    await fleet.wait_ready()
    prompt = "The quick brown fox jumps over the lazy dog. "
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"model": TEST_MODEL, "prompt": prompt, "max_tokens": 300, "logprobs": 1})
        request_id = (await ws.receive_json())["request_id"]
        before = await chunk_messages(ws, 3)  # ~60 tokens in: generation is under way on `doomed`
        assert await worker_of(redis, request_id) == "doomed"
        fleet.spawn_worker("survivor", step_delay_ms=20)
        doomed.send_signal(signal.SIGKILL)
        after = (await ws_collect(ws, {request_id}, timeout_s=30))[request_id]

    assert assert_contiguous(before + after) == echo(prompt, 300)
    assert after[-1]["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 300,
                                  "total_tokens": len(prompt) + 300, "prompt_tokens_details": {"cached_tokens": 0}}
    assert await worker_of(redis, request_id) == "survivor"
    state = (await fleet.get(f"/v1/requests/{request_id}"))[1]
    assert state["status"] == "completed" and state["text"] == echo(prompt, 300)
    # The logprobs too: every token's once, across both workers, in the poll result and the chunks.
    expected = (await fleet.post("/tokenize", {"model": TEST_MODEL, "prompt": echo(prompt, 300)}))[1]["tokens"]
    assert [t["token_id"] for t in state["logprobs"]] == expected
    assert [t["token_id"] for m in before + after for t in m.get("logprobs", ())] == expected
    stream = keys.job_stream(TEST_MODEL)
    assert await redis.xlen(stream) == 0
    assert (await redis.xpending(stream, keys.CONSUMER_GROUP))["pending"] == 0


async def test_a_slow_but_live_worker_keeps_its_jobs(start_fleet: StartFleet, redis) -> None:
    """Reclaim goes by heartbeat, not by how long a job has run: an eager reclaimer that looks
    every 0.1 s for entries idle over 50 ms still leaves a live worker's long job alone."""
    fleet = await start_fleet(workers=0)
    await fleet.start_worker({"worker_id": "slow"}, step_delay_ms=30)
    await fleet.wait_ready()
    request_id = await fleet.submit(prompt="slow and steady ", max_tokens=80)  # ~2.4 s
    await wait_until(lambda: _status_is(fleet, request_id, "running"))
    await fleet.start_worker({"worker_id": "eager", "reclaim_interval_s": 0.1, "reclaim_min_idle_ms": 50},
                             step_delay_ms=30)
    done = await fleet.wait_done(request_id)
    assert done["status"] == "completed" and done["text"] == echo("slow and steady ", 80)
    assert await worker_of(redis, request_id) == "slow"


async def _status_is(fleet: Fleet, request_id: str, status: str) -> bool:
    return (await fleet.get(f"/v1/requests/{request_id}"))[1]["status"] == status


async def test_a_job_that_keeps_killing_workers_is_dead_lettered_and_others_complete(
    start_fleet: StartFleet, redis
) -> None:
    fleet = await start_fleet(workers=0)
    for i in range(4):  # the poison kills three (max_attempts=3); the fourth dead-letters it
        fleet.spawn_worker(f"w{i}", die_on_prompt="POISON", step_delay_ms=5)
    await fleet.wait_ready()
    poison = await fleet.submit(prompt="this is POISON", max_tokens=20)
    healthy = [await fleet.submit(prompt=f"healthy {i} ", max_tokens=40) for i in range(3)]

    failed = await fleet.wait_done(poison, timeout_s=40)
    assert failed["status"] == "failed" and "gave up after 3 attempts" in failed["error"]
    for i, request_id in enumerate(healthy):
        done = await fleet.wait_done(request_id, timeout_s=40)
        assert done["status"] == "completed" and done["text"] == echo(f"healthy {i} ", 40)
    [(_, fields)] = await redis.xrange(keys.dead_letters(TEST_MODEL))
    assert fields[b"request_id"].decode() == poison and b"gave up" in fields[b"reason"]
    assert sum(p.poll() is not None for p in fleet.processes) == 3
    assert await redis.xlen(keys.job_stream(TEST_MODEL)) == 0


async def test_sigterm_finishes_what_it_can_hands_back_the_rest_and_exits_0(start_fleet: StartFleet, redis) -> None:
    """Worker A holds a medium job (done within the 2 s grace), two long ones (running past it)
    and a third long one it read but has no KV room for. On SIGTERM it finishes the medium one,
    hands the other three back with their output so far, and exits 0; B continues them."""
    fleet = await start_fleet(workers=0)
    a = fleet.spawn_worker("a", env={"LLM_FLEET_DRAIN_TIMEOUT_S": "2"}, step_delay_ms=20,
                           kv_cache_tokens=500, max_num_seqs=4)
    await fleet.wait_ready()
    jobs = {"medium ": 40, "long one ": 200, "long two ": 200, "long three ": 200}
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        ids = {}
        for prompt, max_tokens in jobs.items():
            await ws.send_json({"model": TEST_MODEL, "prompt": prompt, "max_tokens": max_tokens, "id": prompt})
            ids[prompt] = (await ws.receive_json())["request_id"]
        await wait_until(lambda: _pending_for(redis, "a", 4))  # all four read by A, three running
        await asyncio.sleep(0.3)
        a.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(a.wait, 15) == 0

        assert (await fleet.get(f"/v1/requests/{ids['medium ']}"))[1]["status"] == "completed"
        for prompt in ("long one ", "long two "):
            state = (await fleet.get(f"/v1/requests/{ids[prompt]}"))[1]
            assert state["status"] == "queued" and 0 < len(state["text"]) < 200, state  # handed back mid-way
        assert (await fleet.get(f"/v1/requests/{ids['long three ']}"))[1]["last_seq"] == 0
        assert await redis.xlen(keys.job_stream(TEST_MODEL)) == 3

        fleet.spawn_worker("b", step_delay_ms=5)
        messages = await ws_collect(ws, set(ids.values()), timeout_s=30)
    for prompt, max_tokens in jobs.items():
        assert assert_contiguous(messages[ids[prompt]]) == echo(prompt, max_tokens)
    assert await redis.xlen(keys.job_stream(TEST_MODEL)) == 0


async def _pending_for(redis: Any, consumer: str, count: int) -> bool:
    try:
        rows = await redis.xpending_range(keys.job_stream(TEST_MODEL), keys.CONSUMER_GROUP, "-", "+", 10,
                                          consumername=consumer)
    except Exception:  # the group does not exist yet
        return False
    return len(rows) == count


async def test_a_gateway_restart_cancels_nothing_and_clients_reattach_with_last_seq(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 20})
    prompt = "restart-proof "
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"model": TEST_MODEL, "prompt": prompt, "max_tokens": 150})
        request_id = (await ws.receive_json())["request_id"]
        before = await chunk_messages(ws, 3)
        await fleet.restart_gateway()
        closing = await ws.receive()
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.GOING_AWAY

    last_seq = before[-1]["seq"]
    async with fleet.http.ws_connect(fleet.ws_url) as ws:  # the new gateway, same address
        await ws.send_json({"type": "attach", "request_id": request_id, "last_seq": last_seq})
        after = (await ws_collect(ws, {request_id}))[request_id]
    text = "".join(m["text"] for m in before) + assert_contiguous(after, after=last_seq)
    assert text == echo(prompt, 150)
    assert (await fleet.get(f"/v1/requests/{request_id}"))[1]["status"] == "completed"


async def test_queued_and_running_requests_complete_across_a_redis_restart(start_fleet: StartFleet, tmp_path) -> None:
    server = EmbeddedValkey(data_dir=tmp_path / "valkey")  # AOF on
    server.start()
    try:
        fleet = await start_fleet(redis_url=server.url, redis_timeout_s=0.5,
                                  engine={"step_delay_ms": 20, "max_num_seqs": 1})
        async with fleet.http.ws_connect(fleet.ws_url) as ws:  # streamed live through the outage
            await ws.send_json({"model": TEST_MODEL, "prompt": "streamed ", "max_tokens": 60})
            streamed = (await ws.receive_json())["request_id"]
            ids = [await fleet.submit(prompt=f"survivor {i} ", max_tokens=60) for i in range(3)]
            await wait_until(lambda: _status_is(fleet, streamed, "running"))
            await asyncio.sleep(0.3)
            server.stop()  # one running, three queued
            await asyncio.sleep(1.5)
            server.start()
            messages = (await ws_collect(ws, {streamed}, timeout_s=30))[streamed]
        assert assert_contiguous(messages) == echo("streamed ", 60)
        for i, request_id in enumerate(ids):
            done = await fleet.wait_done(request_id, timeout_s=30)
            assert done["status"] == "completed" and done["text"] == echo(f"survivor {i} ", 60), done
    finally:
        server.stop()


async def test_finished_results_expire_after_the_configured_ttl(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(workers=0)
    await fleet.start_worker({"result_ttl_s": 1})
    await fleet.wait_ready()
    request_id = await fleet.submit(prompt="short-lived", max_tokens=5)
    assert (await fleet.wait_done(request_id))["status"] == "completed"
    await asyncio.sleep(2.2)
    status, reply = await fleet.get(f"/v1/requests/{request_id}")
    assert status == 404 and "expired" in reply["error"]["message"]
