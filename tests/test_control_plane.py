"""The model control plane: hot load/unload through the admin API and arq, under traffic; the
503 for a known model nobody serves; housekeeping (the functions, and the cron running them)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sys
import time
import weakref
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import api_keys, fleet_state, keys
from common.api_keys import ApiKey
from common.embedded_redis import EmbeddedValkey
from common.progress import load_fraction
from common.protocol import Job, WorkerStatus
from common.request_store import RequestStore
from tests.conftest import TEST_MODEL, Fleet, StartFleet
from worker import housekeeping

OTHER = "echo-b"


def catalogue(tmp_path: Path, step_delay_ms: int = 2, load_delay_s: float = 0.3) -> str:
    """test-echo and a second test-engine model, echo-b (which takes `load_delay_s` to load)."""
    options = {"max_model_len": 4096, "max_num_seqs": 64, "kv_cache_tokens": 65536, "step_delay_ms": step_delay_ms}
    path = tmp_path / "two-models.json"
    path.write_text(json.dumps({TEST_MODEL: {"engine": "test", "options": options},
                                OTHER: {"engine": "test", "options": {**options, "load_delay_s": load_delay_s}}}))
    return str(path)


async def admin_fleet(start_fleet: StartFleet, redis, tmp_path: Path, workers: int = 2,
                      step_delay_ms: int = 2) -> Fleet:
    fleet = await start_fleet(workers=0, auth=True)
    admin = await api_keys.create(redis, ApiKey(name="ops", admin=True))
    fleet.headers = {"Authorization": f"Bearer {admin}"}
    path = catalogue(tmp_path, step_delay_ms)
    for _ in range(workers):
        await fleet.start_worker(settings={"catalogue": path})
    await fleet.wait_ready()
    return fleet


async def control(fleet: Fleet, action: str, model: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    status, reply, _ = await fleet.post(f"/admin/models/{model}/{action}", body, headers=fleet.headers)
    return status, reply


async def generate(fleet: Fleet, model: str, prompt: str, max_tokens: int) -> tuple[int, Any]:
    status, reply, _ = await fleet.post("/v1/generate", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                         "ignore_eos": True}, headers=fleet.headers)
    return status, reply


def served_by(listing: dict[str, Any], model: str) -> dict[str, str]:
    entry = next((m for m in listing["data"] if m["id"] == model), None)
    return {} if entry is None else {w["worker_id"]: w["state"] for w in entry["workers"]}


async def test_load_and_unload_a_model_on_a_running_worker(start_fleet: StartFleet, redis, tmp_path: Path) -> None:
    fleet = await admin_fleet(start_fleet, redis, tmp_path)
    status, listing = await fleet.get("/admin/workers")
    assert status == 200 and [w["worker_id"] for w in listing["workers"]] == ["w0", "w1"]
    assert all({OTHER, TEST_MODEL} <= set(w["catalogue"]) and list(w["models"]) == [TEST_MODEL]
               for w in listing["workers"])

    status, reply = await control(fleet, "load", OTHER, {"workers": ["w1"]})
    assert status == 202 and [w["worker_id"] for w in reply["workers"]] == ["w1"] and reply["workers"][0]["job_id"]
    async with asyncio.timeout(5):  # loading (0.3 s) is visible, then ready
        while served_by((await fleet.get("/v1/models"))[1], OTHER).get("w1") != "ready":
            await asyncio.sleep(0.02)
    (model,) = [m for m in (await fleet.get("/v1/models"))[1]["data"] if m["id"] == OTHER]
    assert model["workers"][0]["kv_capacity_tokens"] == 65536 and model["max_model_len"] == 4096
    status, accepted = await generate(fleet, OTHER, "served by w1 only", 4)
    assert status == 202
    assert (await fleet.wait_done(accepted["request_id"]))["text"] == echo("served by w1 only", 4)

    status, reply = await control(fleet, "unload", OTHER, {"wait": True})
    assert status == 200 and reply["workers"] == [{"worker_id": "w1", "job_id": reply["workers"][0]["job_id"],
                                                   "ok": True, "result": {"state": "unloaded"}}]
    assert served_by((await fleet.get("/v1/models"))[1], OTHER) == {}
    assert OTHER not in fleet.workers[1].loader.engines
    await asyncio.sleep(1.1)  # the gateway's view of what is served is at most 1 s old
    status, reply = await generate(fleet, OTHER, "nobody serves me", 4)
    assert status == 503 and "not loaded on any of the 2 live worker(s)" in reply["error"]["message"]
    assert await redis.xlen(keys.job_stream(OTHER)) == 0  # refused, not queued forever

    status, reply = await control(fleet, "load", OTHER, {"replicas": 2, "wait": True})
    assert status == 200 and sorted(w["worker_id"] for w in reply["workers"]) == ["w0", "w1"]
    assert all(w["ok"] and w["result"]["state"] == "ready" for w in reply["workers"])
    status, reply = await control(fleet, "load", OTHER, {"replicas": 2})
    assert status == 200 and reply["workers"] == []  # already 2 replicas: nothing to do


async def test_unloading_under_traffic_loses_no_request(start_fleet: StartFleet, redis, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """40 requests of ~1 s each run on two workers; one worker unloads the model mid-way with a
    short drain: what it could not finish is handed back and continued by the other, exactly."""
    fleet = await admin_fleet(start_fleet, redis, tmp_path, step_delay_ms=20)
    fleet.workers[0].settings = dataclass_replace(fleet.workers[0].settings, drain_timeout_s=0.3)
    prompts = [f"request {i:02d} " + "word " * 40 for i in range(40)]
    ids = []
    for prompt in prompts:
        status, reply = await generate(fleet, TEST_MODEL, prompt, 48)
        assert status == 202
        ids.append(reply["request_id"])
    async with asyncio.timeout(5):
        while not fleet.workers[0].budgets[TEST_MODEL].used_tokens:
            await asyncio.sleep(0.01)
    status, reply = await control(fleet, "unload", TEST_MODEL, {"workers": ["w0"], "wait": True})
    assert status == 200 and reply["workers"][0]["ok"], reply
    assert fleet.workers[0].loader.status.keys() == set()
    results = [await fleet.wait_done(rid, timeout_s=30) for rid in ids]
    assert [r["status"] for r in results] == ["completed"] * 40
    assert [r["text"] for r in results] == [echo(p, 48) for p in prompts]  # no gap, no duplicate
    # The path under test ran: w0 handed back jobs it could not finish within its 0.3 s drain.
    assert any(r.getMessage().startswith("handing back ") for r in caplog.records)
    assert served_by((await fleet.get("/v1/models"))[1], TEST_MODEL) == {"w1": "ready"}
    assert await redis.xlen(keys.job_stream(TEST_MODEL)) == 0


async def test_a_loaded_model_is_frozen_out_of_the_collectors_sight_and_freed_after_unload(
    start_fleet: StartFleet, redis, tmp_path: Path
) -> None:
    """Full collections must not walk a loaded model's objects (common/heap.py), and freezing them must
    not keep an unloaded model alive."""
    fleet = await admin_fleet(start_fleet, redis, tmp_path)
    assert (await control(fleet, "load", OTHER, {"workers": ["w1"], "wait": True}))[0] == 200
    loaded = fleet.workers[1].loader.engines[OTHER]
    assert not any(o is loaded for o in gc.get_objects())  # frozen: no generation holds it
    loaded.cycle = [loaded]  # as a real engine's objects do (tasks, callbacks): only a collection frees it
    engine = weakref.ref(loaded)
    del loaded
    assert (await control(fleet, "unload", OTHER, {"wait": True}))[0] == 200
    assert engine() is None


async def test_admin_model_routes_refuse_what_they_cannot_do(start_fleet: StartFleet, redis, tmp_path: Path) -> None:
    fleet = await admin_fleet(start_fleet, redis, tmp_path, workers=1)
    assert (await control(fleet, "load", "/etc/passwd"))[0] == 404
    status, reply = await control(fleet, "load", "not-in-any-catalogue")
    assert status == 404 and "catalogue" in reply["error"]["message"]
    assert (await control(fleet, "load", OTHER, {"workers": ["no-such-worker"]}))[0] == 404
    status, reply = await control(fleet, "load", OTHER, {"replicas": 3})
    assert status == 422 and "only 1 live worker" in reply["error"]["message"]
    assert (await control(fleet, "load", OTHER, {"replicas": 1, "workers": ["w0"]}))[0] == 422
    assert (await control(fleet, "load", OTHER, {"wait": "yes"}))[0] == 422
    assert (await control(fleet, "load", OTHER, {"path": "/models/x"}))[0] == 422
    assert (await control(fleet, "unload", OTHER, {"workers": []}))[0] == 422
    status, reply = await control(fleet, "unload", OTHER)
    assert status == 200 and reply["workers"] == []  # not loaded anywhere: nothing to do
    status, reply, _ = await fleet.post(f"/admin/models/{OTHER}/load", {})  # no key
    assert status == 401
    assert fleet.workers[0].loader.status.keys() == {TEST_MODEL}  # nothing was loaded by any of these


async def test_a_failed_load_reports_the_reason_and_can_be_retried(start_fleet: StartFleet, redis,
                                                                   tmp_path: Path) -> None:
    fleet = await admin_fleet(start_fleet, redis, tmp_path, workers=1)
    good = fleet.workers[0].catalogue[OTHER]
    fleet.workers[0].catalogue[OTHER] = dataclass_replace(good, options={**good.options, "max_model_len": "broken"})
    status, reply = await control(fleet, "load", OTHER, {"wait": True})
    assert status == 200 and not reply["workers"][0]["ok"] and "broken" in reply["workers"][0]["error"]
    assert served_by((await fleet.get("/v1/models"))[1], OTHER) == {"w0": "failed"}
    fleet.workers[0].catalogue[OTHER] = good
    status, reply = await control(fleet, "load", OTHER, {"wait": True})
    assert reply["workers"][0]["ok"] and reply["workers"][0]["result"]["state"] == "ready"


async def test_housekeeping_functions(redis, caplog: pytest.LogCaptureFixture) -> None:
    store = RequestStore(redis)
    await redis.hset(keys.MODELS, TEST_MODEL, b"card")
    # expire: a queued job whose request expired is marked skipped (it stays in the stream, unread, so
    # the group's lag stays defined) and stops counting against the cap; a live one stays.
    jobs = [Job(request_id=f"r{i}", model=TEST_MODEL, prompt_token_ids=[1, 2], sampling={"max_tokens": 3},
                enqueued_at=time.time()) for i in range(3)]
    for job in jobs:
        assert await store.enqueue(job, max_outstanding=10, ttl_s=60)
    await redis.delete(keys.request("r1"))
    await redis.xadd(keys.dead_letters(TEST_MODEL), {"job": b"x", "reason": "old"}, id="1000-0")
    await redis.xadd(keys.dead_letters(TEST_MODEL), {"job": b"x", "reason": "kept for a week"})
    assert await housekeeping.expire(redis, dead_letter_ttl_s=3600) == {"expired_jobs": 1, "dead_letters_trimmed": 1}
    entries = {Job.unpack(f[b"job"]).request_id: entry for entry, f in await redis.xrange(keys.job_stream(TEST_MODEL))}
    assert await redis.smembers(keys.skipped_jobs(TEST_MODEL)) == {entries["r1"]}
    assert (await fleet_state.queues(redis))[TEST_MODEL]["outstanding"] == 2
    assert await housekeeping.expire(redis, dead_letter_ttl_s=3600) == {"expired_jobs": 0, "dead_letters_trimmed": 0}
    await redis.xdel(keys.job_stream(TEST_MODEL), entries["r1"])  # gone some other way: its mark goes too
    await housekeeping.expire(redis, dead_letter_ttl_s=3600)
    assert not await redis.smembers(keys.skipped_jobs(TEST_MODEL))

    stats = await housekeeping.dead_letter_stats(redis)
    assert stats[TEST_MODEL]["count"] == 1 and stats[TEST_MODEL]["new"] == 1
    assert stats[TEST_MODEL]["newest_reason"] == "kept for a week"
    assert (await housekeeping.dead_letter_stats(redis))[TEST_MODEL]["new"] == 0

    # sweep: a dead consumer holding nothing is removed (after its idle time); one holding a job stays.
    await redis.xgroup_create(keys.job_stream(TEST_MODEL), keys.CONSUMER_GROUP, id="0")
    await redis.xreadgroup(keys.CONSUMER_GROUP, "dead-holder", {keys.job_stream(TEST_MODEL): ">"}, count=1)
    await redis.xgroup_createconsumer(keys.job_stream(TEST_MODEL), keys.CONSUMER_GROUP, "dead-idle")
    await redis.sadd(keys.WORKERS, "dead-holder", "dead-idle")
    # A second model, also served by no one, with two stranded jobs: each model's warning counts its own.
    other = "other-model"
    await redis.hset(keys.MODELS, other, b"card")
    for i in range(2):
        await store.enqueue(Job(request_id=f"o{i}", model=other, prompt_token_ids=[1], sampling={"max_tokens": 1},
                                enqueued_at=time.time()), max_outstanding=10, ttl_s=60)
    await redis.xgroup_create(keys.job_stream(other), keys.CONSUMER_GROUP, id="0")
    await redis.xreadgroup(keys.CONSUMER_GROUP, "dead-holder", {keys.job_stream(other): ">"}, count=2)
    # A dead worker's consumer of the nudges stream goes even holding a nudge (a wake-up, not a job).
    nudges = keys.idle_nudges(TEST_MODEL)
    await redis.xgroup_create(nudges, keys.CONSUMER_GROUP, id="0", mkstream=True)
    await redis.xadd(nudges, {"stream": "x"})
    await redis.xreadgroup(keys.CONSUMER_GROUP, "dead-holder", {nudges: ">"}, count=1)
    with caplog.at_level(logging.WARNING, logger="worker.housekeeping"):
        result = await housekeeping.sweep(redis, dead_consumer_idle_ms=0)
    assert result == {"live_workers": 0, "consumers_removed": 2, "stranded_jobs": 3, "engine_streams_removed": 0}
    assert not await redis.xinfo_consumers(nudges, keys.CONSUMER_GROUP)
    warnings = sorted(r.getMessage() for r in caplog.records if "held by dead workers" in r.getMessage())
    assert warnings[0].startswith(f"1 job(s) of {TEST_MODEL} ") and warnings[1].startswith(f"2 job(s) of {other} ")
    consumers = await redis.xinfo_consumers(keys.job_stream(TEST_MODEL), keys.CONSUMER_GROUP)
    assert [c["name"] for c in consumers] == [b"dead-holder"] and not await redis.smembers(keys.WORKERS)


async def test_housekeeping_runs_as_a_cron_job_on_a_worker(start_fleet: StartFleet, redis) -> None:
    """The sweep cron (every 10 s) runs on the fleet's worker: a stale id left in `workers` is pruned."""
    await start_fleet(workers=1)
    await redis.sadd(keys.WORKERS, "long-gone")
    async with asyncio.timeout(15):
        while await redis.sismember(keys.WORKERS, "long-gone"):
            await asyncio.sleep(0.2)


def echo(prompt: str, tokens: int) -> str:
    """What the test engine answers: the (ASCII) prompt repeated, one byte per token."""
    return (prompt * (tokens // len(prompt) + 1))[:tokens]


async def test_models_cli_loads_and_unloads_through_the_control_plane(start_fleet: StartFleet, redis,
                                                                      tmp_path: Path) -> None:
    fleet = await admin_fleet(start_fleet, redis, tmp_path, workers=1)

    async def cli(*args: str) -> tuple[int, list[dict[str, Any]], str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "common.cli", "models", "--redis-url", fleet.redis_url, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).parent.parent)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode or 0, [json.loads(line) for line in out.decode().splitlines()], err.decode()

    code, lines, _ = await cli("load", OTHER, "--workers", "w0")
    assert code == 0 and lines == [{"worker_id": "w0", "ok": True, "result": lines[0]["result"]}]
    assert lines[0]["result"]["state"] == "ready" and fleet.workers[0].loader.status[OTHER].state == "ready"
    code, lines, err = await cli("load", "no-such-model")
    assert code == 1 and "no live worker has model 'no-such-model'" in err
    code, lines, _ = await cli("unload", OTHER)
    assert code == 0 and lines[0]["result"] == {"state": "unloaded"} and OTHER not in fleet.workers[0].loader.status


def test_load_fraction_counts_ready_as_done_and_missing_as_zero() -> None:
    def worker(worker_id: str, **models: dict[str, Any]) -> WorkerStatus:
        return WorkerStatus(worker_id=worker_id, host="h", pid=1, state="serving", started_at=0, heartbeat_at=0,
                            models=models)

    workers = [worker("a", m={"state": "loading", "progress": 0.5}), worker("b", m={"state": "ready", "progress": 1}),
               worker("c")]
    assert load_fraction(workers, "m") == (0.5 + 1 + 0) / 3
    assert load_fraction(workers, "m", {"a", "b"}) == 0.75
    assert load_fraction(workers) == 0.75  # every model each worker lists
    assert load_fraction([worker("d", m={"state": "failed", "progress": 0.9})], "m") == 0


async def test_control_jobs_work_again_after_a_redis_restart(start_fleet: StartFleet, tmp_path: Path) -> None:
    """arq's poll loop dies with its connection; the worker restarts it, so an admin load still works."""
    server = EmbeddedValkey(data_dir=tmp_path / "valkey")
    server.start()
    try:
        fleet = await start_fleet(workers=0, redis_url=server.url, redis_timeout_s=0.5, auth=True,
                                  control_wait_timeout_s=20)
        client = aioredis.from_url(server.url)
        admin = await api_keys.create(client, ApiKey(name="ops", admin=True))
        await client.aclose()
        fleet.headers = {"Authorization": f"Bearer {admin}"}
        await fleet.start_worker(settings={"catalogue": catalogue(tmp_path)})
        await fleet.wait_ready()
        server.stop()
        await asyncio.sleep(2.0)  # the control plane's loop fails and backs off meanwhile
        server.start()
        await fleet.wait_ready()
        status, reply = await control(fleet, "load", OTHER, {"wait": True})
        assert status == 200 and reply["workers"][0]["ok"], reply
        assert fleet.workers[0].loader.status[OTHER].state == "ready"
    finally:
        server.stop()


async def test_a_job_handed_back_and_continued_on_the_same_worker_finishes_there(start_fleet: StartFleet) -> None:
    """Unload mid-generation (handed back), load again: the same worker continues the job, and it ends
    as a finished job of that worker, not as a second hand-back."""
    fleet = await start_fleet(workers=0)
    worker = await fleet.start_worker({"drain_timeout_s": 0.1}, step_delay_ms=20)
    await fleet.wait_ready()
    request_id = await fleet.submit(prompt="twice on one worker ", max_tokens=60)
    async with asyncio.timeout(5):
        while (await fleet.get(f"/v1/requests/{request_id}"))[1]["last_seq"] < 2:
            await asyncio.sleep(0.02)
    await worker.unload(TEST_MODEL)
    assert (await fleet.get(f"/v1/requests/{request_id}"))[1]["status"] == "queued"
    await worker.load(TEST_MODEL)
    done = await fleet.wait_done(request_id)
    assert done["status"] == "completed" and done["text"] == echo("twice on one worker ", 60)
    assert worker.metrics.handed_back.labels(TEST_MODEL)._value.get() == 1
    async with asyncio.timeout(2):  # counted once its entry is acked, just after the final write
        while worker.metrics.finished.labels(TEST_MODEL, "length")._value.get() != 1:
            await asyncio.sleep(0.02)
