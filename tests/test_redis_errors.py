"""Redis that answers but says no, or says something odd: every request still reaches its end.

A killed or restarted Redis is covered in test_faults.py and test_redis_down.py. Here Redis stays up
and refuses (OOM under maxmemory, BUSY behind a long script, READONLY as a replica), pauses its
clients (CLIENT PAUSE, shorter and longer than the gateway's timeouts), or carries messages and
entries that are not what the fleet wrote. Each test streams real requests through a real gateway
and worker on its own Valkey, injects the fault mid-generation and checks that every stream ends
with its exact text (no gap, no duplicate) and that the fleet serves new requests afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import keys
from common.embedded_redis import EmbeddedValkey, free_port
from common.settings import WorkerSettings, load_catalogue
from common.supervision import Supervisor
from gateway.relay import Relay
from tests.conftest import TEST_MODEL, Fleet, StartFleet, ws_collect
from tests.test_faults import assert_contiguous, echo, wait_until
from worker.consumer import Worker

STREAMS = 20
TOKENS = 60  # ~1.2 s at 20 ms a step: the fault lands mid-generation


@pytest.fixture
async def own_valkey(tmp_path) -> AsyncIterator[EmbeddedValkey]:
    """A Valkey of this test's own: the faults change its configuration."""
    server = EmbeddedValkey(data_dir=tmp_path / "valkey")
    server.start()
    yield server
    server.stop()


async def _oom(admin: aioredis.Redis, seconds: float) -> None:
    await admin.config_set("maxmemory", 1)
    await asyncio.sleep(seconds)
    await admin.config_set("maxmemory", 0)


async def _busy(admin: aioredis.Redis, seconds: float) -> None:
    """A script that runs `seconds` (reads only): every other client gets BUSY past the threshold."""
    await admin.config_set("busy-reply-threshold", 50)
    await admin.eval("local s = redis.call('TIME') while true do local t = redis.call('TIME') "
                     "if (t[1] - s[1]) * 1000000 + (t[2] - s[2]) > tonumber(ARGV[1]) then return 1 end end",
                     0, int(seconds * 1_000_000))


async def _readonly(admin: aioredis.Redis, seconds: float) -> None:
    """The server becomes a replica (of a primary that is not there, so it keeps its data): writes get
    READONLY, as they would from a demoted primary, until it is promoted again."""
    await admin.execute_command("REPLICAOF", "127.0.0.1", free_port())
    await asyncio.sleep(seconds)
    await admin.execute_command("REPLICAOF", "NO", "ONE")


async def _pause(admin: aioredis.Redis, seconds: float) -> None:
    await admin.execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")
    await asyncio.sleep(seconds)


Fault = Callable[[aioredis.Redis, float], Awaitable[None]]
FAULTS: dict[str, tuple[Fault, float]] = {
    "oom": (_oom, 0.5),
    "busy": (_busy, 0.5),
    "readonly": (_readonly, 0.5),
    "pause": (_pause, 0.5),
    # Longer than the gateway's Redis timeout (0.5 s here): calls time out, streams ride it out.
    "slow": (_pause, 1.5),
}


async def _stream_through(fleet: Fleet, fault: Callable[[], Awaitable[None]]) -> dict[str, list[dict[str, Any]]]:
    """STREAMS WebSocket requests; the fault once they are all generating; every message by request."""
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        for i in range(STREAMS):
            await ws.send_json({"model": TEST_MODEL, "prompt": f"stream {i} ", "max_tokens": TOKENS})
        early: dict[str, list[dict[str, Any]]] = {}
        async with asyncio.timeout(10):
            while len(early) < STREAMS:  # chunks of the first requests interleave with later acceptances
                message = await ws.receive_json()
                assert message["type"] in ("accepted", "chunk"), message
                early.setdefault(message["request_id"], []).extend([message] if message["type"] == "chunk" else [])
        await asyncio.sleep(0.3)
        await fault()
        late = await ws_collect(ws, set(early), timeout_s=30)
    return {request_id: early[request_id] + late[request_id] for request_id in early}


@pytest.mark.parametrize("name", list(FAULTS))
async def test_every_stream_completes_through_a_redis_that_refuses_or_stalls(
    own_valkey: EmbeddedValkey, start_fleet: StartFleet, name: str
) -> None:
    fleet = await start_fleet(redis_url=own_valkey.url, redis_timeout_s=0.5, engine={"step_delay_ms": 20})
    admin = aioredis.from_url(own_valkey.url)
    inject, seconds = FAULTS[name]
    during: list[tuple[int, Any]] = []

    async def fault() -> None:
        task = asyncio.create_task(inject(admin, seconds))
        await asyncio.sleep(0.15)
        if name in ("oom", "busy", "readonly"):  # a submit meanwhile: a clear 503, never a 500
            status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "meanwhile"})
            during.append((status, reply))
        await task

    try:
        messages = await _stream_through(fleet, fault)
    finally:
        await admin.aclose()
    texts = {assert_contiguous(m) for m in messages.values()}
    assert texts == {echo(f"stream {i} ", TOKENS) for i in range(STREAMS)}
    for status, reply in during:
        assert status == 503 and "refused" in reply["error"]["message"], (status, reply)
    after = await fleet.wait_done(await fleet.submit(prompt="after the fault ", max_tokens=20), timeout_s=10)
    assert after["status"] == "completed" and after["text"] == echo("after the fault ", 20)
    assert (await fleet.get("/ready"))[0] == 200
    stream = keys.job_stream(TEST_MODEL)
    assert (await fleet.workers[0].redis.xpending(stream, keys.CONSUMER_GROUP))["pending"] == 0


async def test_a_malformed_message_on_a_requests_channel_is_skipped(start_fleet: StartFleet, redis) -> None:
    """Something else publishes on `chunks:{id}`: the relay re-reads the stored chunks instead of dying."""
    fleet = await start_fleet(engine={"step_delay_ms": 20})
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"model": TEST_MODEL, "prompt": "undisturbed ", "max_tokens": TOKENS})
        request_id = (await ws.receive_json())["request_id"]
        first = await ws.receive_json()  # generating
        assert await redis.publish(keys.chunk_channel(request_id), b"\xc1 not msgpack") == 1
        messages = (await ws_collect(ws, {request_id}))[request_id]
    assert assert_contiguous([first, *messages]) == echo("undisturbed ", TOKENS)
    done = await fleet.wait_done(await fleet.submit(prompt="next ", max_tokens=10))
    assert done["text"] == echo("next ", 10)


async def test_a_crashed_relay_reader_is_restarted_counted_and_streams_go_on(
    start_fleet: StartFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 20})
    real_dispatch = Relay._dispatch
    crashes = []

    def dispatch_with_a_bug(self: Relay, message: dict[str, object]) -> None:
        if message["type"] == "message" and not crashes:
            crashes.append(message)
            raise RuntimeError("a bug in the relay")
        real_dispatch(self, message)

    monkeypatch.setattr(Relay, "_dispatch", dispatch_with_a_bug)
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"model": TEST_MODEL, "prompt": "carried on ", "max_tokens": TOKENS})
        request_id = (await ws.receive_json())["request_id"]
        messages = (await ws_collect(ws, {request_id}))[request_id]
    assert crashes and assert_contiguous(messages) == echo("carried on ", TOKENS)
    async with fleet.http.get(fleet.base_url + "/metrics") as response:
        assert 'llm_fleet_task_crashes_total{task="relay"} 1.0' in await response.text()
    assert (await fleet.get("/ready"))[0] == 200


async def test_an_entry_that_is_not_a_job_is_removed_and_the_worker_serves_on(start_fleet: StartFleet, redis) -> None:
    fleet = await start_fleet()
    stream = keys.job_stream(TEST_MODEL)
    bad = await redis.xadd(stream, {"job": b"\xc1 garbage"})
    await redis.xadd(stream, {"not-a-job": b"x"})
    done = await fleet.wait_done(await fleet.submit(prompt="served ", max_tokens=12))
    assert done["text"] == echo("served ", 12)
    await wait_until(lambda: _stream_empty(redis, stream))
    assert await redis.xrange(stream, min=bad, max=bad) == []


async def _stream_empty(redis: aioredis.Redis, stream: str) -> bool:
    return await redis.xlen(stream) == 0 and (await redis.xpending(stream, keys.CONSUMER_GROUP))["pending"] == 0


async def test_a_request_whose_output_cannot_be_stored_fails_with_the_reason(start_fleet: StartFleet, redis) -> None:
    """One request's output cannot be encoded: it fails (and is dead-lettered) with the reason, never
    left `running`; the requests beside it are untouched."""
    fleet = await start_fleet(engine={"step_delay_ms": 10, "unstorable_on_prompt": "BROKEN"})
    broken = await fleet.submit(prompt="BROKEN output ", max_tokens=30)
    healthy = [await fleet.submit(prompt=f"fine {i} ", max_tokens=30) for i in range(3)]
    failed = await fleet.wait_done(broken)
    assert failed["status"] == "failed" and "could not be stored" in failed["error"], failed
    for i, request_id in enumerate(healthy):
        assert (await fleet.wait_done(request_id))["text"] == echo(f"fine {i} ", 30)
    [(_, fields)] = await redis.xrange(keys.dead_letters(TEST_MODEL))
    assert fields[b"request_id"].decode() == broken
    await wait_until(lambda: _stream_empty(redis, keys.job_stream(TEST_MODEL)))


async def test_a_worker_task_that_keeps_crashing_stops_the_worker_with_exit_1(start_fleet: StartFleet,
                                                                              tmp_path) -> None:
    """The worker cannot serve without its cancel listener: after the supervisor gives up, it stops
    (exit 1, for its supervisor to restart it) instead of running on half-blind."""
    fleet = await start_fleet(workers=0)
    settings = WorkerSettings(redis_url=fleet.redis_url, models=[TEST_MODEL], worker_id="doomed",
                              catalogue=fleet.write_catalogue(), read_block_ms=100)
    worker = Worker(settings, load_catalogue(settings.catalogue))
    worker.supervisor = Supervisor(on_crash=lambda task: worker.metrics.task_crashes.labels(task).inc(),
                                   on_failed=worker._task_failed, give_up_after=3)

    async def broken_listener() -> None:
        raise RuntimeError("a bug in the cancel listener")

    worker._listen_for_cancels = broken_listener  # type: ignore[method-assign]
    await asyncio.wait_for(worker.main(handle_signals=False), 20)
    assert worker.exit_code == 1
    assert worker.metrics.task_crashes.labels("cancel_listener")._value.get() == 3
