"""`llm-fleet status`: what an operator sees, as JSON and as a table, while requests flow."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from common import fleet_state
from tests.conftest import TEST_MODEL, StartFleet
from tests.test_faults import wait_until

REPO = Path(__file__).resolve().parent.parent


async def status(redis_url: str, *flags: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "common.cli", "status", "--redis-url", redis_url, *flags, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_status_reports_workers_models_queues_and_tokens_per_second(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"step_delay_ms": 20, "max_num_seqs": 2})
    ids = [await fleet.submit(prompt=f"busy {i} ", max_tokens=150) for i in range(5)]  # 2 run, 3 wait

    snapshot = json.loads(await status(fleet.redis_url, "--json", "--interval", "1.5"))
    [worker] = snapshot["workers"]
    model = worker["models"][TEST_MODEL]
    assert worker["worker_id"] == "w0" and worker["state"] == "serving" and model["state"] == "ready"
    assert model["running"] == 2 and model["kv_used_tokens"] > 0 and model["kv_capacity_tokens"] == 65536
    assert worker["tokens_per_s"] > 20  # two streams at ~50 tokens/s each
    queue = snapshot["queues"][TEST_MODEL]
    assert queue["outstanding"] == 5 and queue["held_by_workers"] >= 2 and queue["dead_letters"] == 0

    table = await status(fleet.redis_url, "--interval", "0.2")
    assert "w0" in table and TEST_MODEL in table and "2/2" in table and "OUTSTANDING" in table
    for request_id in ids:
        await fleet.wait_done(request_id, timeout_s=30)
    await wait_until(lambda: _idle_heartbeat(fleet))  # a heartbeat carries the final count
    idle = json.loads(await status(fleet.redis_url, "--json", "--interval", "1.2"))
    assert idle["queues"][TEST_MODEL]["outstanding"] == 0 and idle["workers"][0]["tokens_per_s"] == 0


async def _idle_heartbeat(fleet) -> bool:
    workers = await fleet_state.live_workers(fleet.gateway.redis)
    return bool(workers) and workers[0].models[TEST_MODEL]["running"] == 0


async def test_the_consoles_fleet_endpoint_has_workers_rates_queues_and_every_gateways_429s(
        start_fleet: StartFleet) -> None:
    fleet = await start_fleet(max_outstanding=3, engine={"step_delay_ms": 20, "max_num_seqs": 2},
                              workers=0)
    other_gateway = await start_fleet(workers=0, max_outstanding=3)  # same Redis: a second gateway
    await fleet.start_worker(settings={"heartbeat_interval_s": 0.2}, step_delay_ms=20, max_num_seqs=2)
    await fleet.wait_ready()
    for _ in range(3):
        await fleet.submit(prompt="busy ", max_tokens=200)
    statuses = [(await gateway.post("/v1/generate", {"model": TEST_MODEL, "prompt": "x", "max_tokens": 2}))[0]
                for gateway in (fleet, fleet, other_gateway)]
    assert statuses == [429, 429, 429]

    async def fleet_view() -> dict:
        status, view = await fleet.get("/v1/fleet")
        assert status == 200, view
        return view

    await fleet_view()  # the first look records the heartbeats that the rates are measured from
    await asyncio.sleep(0.5)
    view = await fleet_view()
    [worker] = view["workers"]
    assert worker["worker_id"] == "w0" and worker["models"][TEST_MODEL]["running"] == 2
    assert worker["tokens_per_s"] > 20 and TEST_MODEL in worker["catalogue"]
    queue = view["queues"][TEST_MODEL]
    assert queue["outstanding"] == 3 and queue["waiting"] == 1 and queue["oldest_waiting_s"] > 0
    assert queue["rejected"] >= 2, "this gateway's own count, before any flush"

    async def every_gateways_429s_counted() -> bool:  # the other gateway's tally reaches Redis (every 2 s)
        return (await fleet_view())["queues"][TEST_MODEL]["rejected"] == 3

    await wait_until(every_gateways_429s_counted, 10)
