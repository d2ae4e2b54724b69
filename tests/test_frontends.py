"""Several front-end processes for one model's engine (`frontends: N`, worker/frontends.py).

They share the model's stream and the engine's capacity, stop with the model, and a front-end that
dies makes its worker stop (so that the supervisor restarts the group) while its jobs are reclaimed.
The test engine stands in for vLLM's shared engine core (each front-end runs its own copy); the
vLLM side runs in tests/test_gpu_vllm.py on a GPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from common import keys
from common.control import plan_load, plan_unload
from common.fleet_state import live_workers
from common.protocol import WorkerStatus
from common.settings import ModelSpec
from tests.conftest import TEST_MODEL, Fleet, StartFleet
from tests.test_faults import echo
from worker.consumer import Worker

# Front-ends heartbeat fast, and a dead one's jobs are reclaimed within ~2 s.
FAST = {"heartbeat_interval_s": 0.3, "heartbeat_ttl_s": 2.0, "reclaim_interval_s": 0.5, "drain_timeout_s": 5.0}


def frontend_catalogue(tmp_path: Path, frontends: int, engine: str = "test", **options: Any) -> str:
    options = {"max_model_len": 4096, "max_num_seqs": 30, "kv_cache_tokens": 30_000, "step_delay_ms": 5, **options}
    path = tmp_path / f"frontends-{frontends}-{engine}.json"
    path.write_text(json.dumps({TEST_MODEL: {"engine": engine, "frontends": frontends, "options": options}}))
    return str(path)


async def start_group(fleet: Fleet, tmp_path: Path, frontends: int = 3,
                      **settings: Any) -> tuple[Worker, dict[str, WorkerStatus]]:
    """The loading worker w0 plus its front-ends, all serving; returns w0 and every live heartbeat."""
    worker = await fleet.start_worker(settings={"catalogue": frontend_catalogue(tmp_path, frontends), **FAST,
                                                **settings})
    wanted = {"w0", *(f"w0-fe{i}" for i in range(1, frontends))}
    redis = aioredis.from_url(fleet.redis_url)
    try:
        async with asyncio.timeout(30):
            while True:
                live = {w.worker_id: w for w in await live_workers(redis)}
                if set(live) == wanted and all(w.models.get(TEST_MODEL, {}).get("state") == "ready"
                                               for w in live.values()):
                    return worker, live
                await asyncio.sleep(0.1)
    finally:
        await redis.aclose()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_frontends_share_the_stream_and_the_engine_capacity(start_fleet: StartFleet, redis,
                                                                   tmp_path: Path) -> None:
    fleet = await start_fleet(workers=0)
    _, live = await start_group(fleet, tmp_path, frontends=3)

    # Each process admits a third of the engine's KV and sequences: together they never overfill it.
    for status in live.values():
        assert status.models[TEST_MODEL]["kv_capacity_tokens"] == 10_000
        assert status.models[TEST_MODEL]["max_num_seqs"] == 10
    assert live["w0-fe1"].frontend_of == live["w0-fe2"].frontend_of == "w0"
    assert live["w0"].frontend_of == "" and live["w0-fe1"].catalogue == []

    # 60 requests at once: more than one process's 10 sequences, so every front-end takes some.
    prompts = [f"frontend request {i}. " for i in range(60)]
    ids = await asyncio.gather(*(fleet.submit(prompt=p, max_tokens=40, ignore_eos=True) for p in prompts))
    results = await asyncio.gather(*(fleet.wait_done(rid, timeout_s=60) for rid in ids))
    assert [r["text"] for r in results] == [echo(p, 40) for p in prompts]
    served_by = {(await redis.hget(keys.request(rid), "worker")).decode() for rid in ids}
    assert served_by == {"w0", "w0-fe1", "w0-fe2"}


async def test_unloading_stops_the_frontends_and_a_reload_starts_them_again(start_fleet: StartFleet, redis,
                                                                            tmp_path: Path) -> None:
    fleet = await start_fleet(workers=0)
    worker, _ = await start_group(fleet, tmp_path, frontends=2)
    pids = worker.loader.frontends[TEST_MODEL].pids
    # Jobs running on the front-end while it unloads finish (drain) with the exact text.
    prompts = [f"drained {i}. " for i in range(20)]
    ids = await asyncio.gather(*(fleet.submit(prompt=p, max_tokens=150, ignore_eos=True) for p in prompts))
    await asyncio.sleep(0.3)
    assert await worker.unload(TEST_MODEL) == {"state": "unloaded"}
    assert not any(pid_alive(pid) for pid in pids)
    assert TEST_MODEL not in worker.loader.frontends
    assert {w.worker_id for w in await live_workers(redis)} == {"w0"}

    await worker.load(TEST_MODEL)
    new_pids = worker.loader.frontends[TEST_MODEL].pids
    assert len(new_pids) == 1 and all(pid_alive(pid) for pid in new_pids)
    results = await asyncio.gather(*(fleet.wait_done(rid, timeout_s=60) for rid in ids))
    assert [r["text"] for r in results] == [echo(p, 150) for p in prompts]

    await fleet.stop_workers()  # the worker's stop takes its front-ends down too
    assert not any(pid_alive(pid) for pid in new_pids)


async def test_a_dead_frontend_stops_its_worker_and_its_jobs_are_reclaimed(start_fleet: StartFleet, redis,
                                                                           tmp_path: Path) -> None:
    fleet = await start_fleet(workers=0)
    worker, _ = await start_group(fleet, tmp_path, frontends=2)
    [pid] = worker.loader.frontends[TEST_MODEL].pids
    prompts = [f"reclaimed {i}. " for i in range(30)]
    ids = await asyncio.gather(*(fleet.submit(prompt=p, max_tokens=200, ignore_eos=True) for p in prompts))
    async with asyncio.timeout(10):  # wait until the front-end holds some of them
        while b"w0-fe1" not in [await redis.hget(keys.request(rid), "worker") for rid in ids]:
            await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGKILL)

    async with asyncio.timeout(10):  # the worker notices and stops itself, for its supervisor to restart it
        await asyncio.gather(*fleet._worker_tasks)
    assert worker.exit_code == 1
    fleet.workers.clear()
    fleet._worker_tasks.clear()
    # A fresh worker (what the supervisor starts) continues every job: the killed front-end's by reclaim,
    # the stopped worker's from what it handed back.
    await fleet.start_worker(settings={"worker_id": "w1", **FAST})
    results = await asyncio.gather(*(fleet.wait_done(rid, timeout_s=60) for rid in ids))
    assert [r["text"] for r in results] == [echo(p, 200) for p in prompts]


async def test_a_frontend_dies_with_its_worker(start_fleet: StartFleet, tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a worker killed outright leaves no front-end behind."""
    fleet = await start_fleet(workers=0)
    catalogue = frontend_catalogue(tmp_path, 2)
    parent = fleet.spawn_worker("p0", catalogue=catalogue)
    redis = aioredis.from_url(fleet.redis_url)
    try:
        async with asyncio.timeout(30):
            while not (front := [w for w in await live_workers(redis) if w.frontend_of == "p0"]):
                await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
    parent.kill()
    parent.wait()
    async with asyncio.timeout(15):
        while pid_alive(front[0].pid):
            await asyncio.sleep(0.1)


def test_frontends_need_an_engine_that_can_be_shared(tmp_path: Path) -> None:
    for bad in (0, 17, "2", True, 1.5):
        with pytest.raises(ValueError, match="frontends must be an integer from 1 to 16"):
            ModelSpec(name="m", engine="test", frontends=bad)  # type: ignore[arg-type]


async def test_a_cpu_model_with_frontends_fails_to_load_with_the_reason(start_fleet: StartFleet,
                                                                         tmp_path: Path) -> None:
    fleet = await start_fleet(workers=0)
    worker = await fleet.start_worker(settings={"catalogue": frontend_catalogue(tmp_path, 2, engine="cpu"),
                                                "models": []})
    with pytest.raises(ValueError, match="the cpu engine cannot be shared by several front-ends"):
        await worker.load(TEST_MODEL)


def test_control_jobs_go_to_the_loading_worker_not_to_its_frontends() -> None:
    def status(worker_id: str, frontend_of: str = "", **models: str) -> WorkerStatus:
        return WorkerStatus(worker_id=worker_id, host="h", pid=1, state="serving", started_at=0, heartbeat_at=0,
                            models={m: {"state": s} for m, s in models.items()},
                            catalogue=[] if frontend_of else ["m"], frontend_of=frontend_of)

    workers = [status("a", m="ready"), status("a-fe1", "a", m="ready"), status("b")]
    assert plan_unload(workers, "m", worker_ids=None) == ["a"]
    # Two replicas: a (with its front-end) is one, b is the other.
    assert plan_load(workers, "m", worker_ids=None, replicas=2) == ["b"]


async def test_the_workers_metrics_include_its_frontends(start_fleet: StartFleet, tmp_path: Path) -> None:
    """Prometheus scrapes the worker's port only: per-process series of the front-ends are folded in
    (labelled `frontend`), engine and GPU series are not repeated."""
    from prometheus_client.parser import text_string_to_metric_families

    fleet = await start_fleet(workers=0)
    worker, _ = await start_group(fleet, tmp_path, frontends=2, http_port=0)
    prompts = [f"metrics {i}. " for i in range(40)]
    ids = await asyncio.gather(*(fleet.submit(prompt=p, max_tokens=60, ignore_eos=True) for p in prompts))
    await asyncio.gather(*(fleet.wait_done(rid, timeout_s=60) for rid in ids))

    async with fleet.http.get(f"http://127.0.0.1:{worker.http_port}/metrics") as response:
        assert response.status == 200
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    tokens = {s.labels.get("frontend", "0"): s.value for s in families["llm_fleet_generation_tokens"].samples
              if s.name.endswith("_total")}
    assert sum(tokens.values()) == 40 * 60 and tokens["0"] > 0 and tokens["1"] > 0, tokens
    capacity = [s.value for s in families["llm_fleet_kv_cache_capacity_tokens"].samples]
    assert sorted(capacity) == [15_000, 15_000]  # each its half; together the engine's 30,000
    ttft_counts = [s.value for s in families["llm_fleet_time_to_first_token_seconds"].samples
                   if s.name.endswith("_count")]
    assert sum(ttft_counts) == 40
    assert all("frontend" not in s.labels for s in families["llm_fleet_model_state"].samples)
    assert all("frontend" not in s.labels for s in families["llm_fleet_gpu_available"].samples)
