"""Redis unreachable: the gateway answers 503 at once; when Redis is back, the fleet serves again."""

from __future__ import annotations

import asyncio

from common.embedded_redis import EmbeddedValkey, free_port
from tests.conftest import TEST_MODEL, StartFleet


async def test_gateway_answers_503_at_once_when_redis_is_unreachable(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(workers=0, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5)
    async with asyncio.timeout(5):  # "at once": well inside any client's patience, no hang
        status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "x"})
        assert status == 503 and reply["error"]["type"] == "service_unavailable"
        assert (await fleet.get("/v1/requests/abc"))[0] == 503
        status, reply = await fleet.get("/ready")
        assert status == 503 and "Redis" in reply["reason"]
        assert (await fleet.get("/health"))[0] == 200
        async with fleet.http.ws_connect(fleet.ws_url) as ws:
            await ws.send_json({"model": TEST_MODEL, "prompt": "x"})
            assert (await ws.receive_json())["status"] == 503


async def test_fleet_recovers_after_a_redis_restart(start_fleet: StartFleet, tmp_path) -> None:
    server = EmbeddedValkey(data_dir=tmp_path / "valkey")
    server.start()
    try:
        fleet = await start_fleet(redis_url=server.url, redis_timeout_s=0.5)
        assert (await fleet.wait_done(await fleet.submit(prompt="before", max_tokens=6)))["text"] == "before"

        server.stop()
        status, _, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "x"})
        assert status == 503

        server.start()  # same port and data directory (AOF): the model registry is still there
        async with asyncio.timeout(20):
            while True:
                status, reply, _ = await fleet.post("/v1/generate", {"model": TEST_MODEL, "prompt": "after",
                                                                     "max_tokens": 5})
                if status == 202:
                    break
                assert status == 503
                await asyncio.sleep(0.2)
        assert (await fleet.wait_done(reply["request_id"]))["text"] == "after"
    finally:
        server.stop()


async def test_worker_reloads_its_scripts_when_redis_lost_them(start_fleet: StartFleet, redis) -> None:
    """A restarted Redis has an empty script cache: the worker's EVALSHA gets NOSCRIPT, loads the
    scripts and sends those calls again, so starting, streaming and finishing all still work."""
    fleet = await start_fleet()
    first = await fleet.wait_done(await fleet.submit(prompt="before", max_tokens=6))
    assert first["text"] == "before"
    await redis.script_flush()
    second = await fleet.wait_done(await fleet.submit(prompt="after", max_tokens=12))
    assert second["status"] == "completed" and second["text"] == "afterafteraf"
