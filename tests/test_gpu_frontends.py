"""Two front-end processes sharing one vLLM engine core (`frontends: 2`, worker/frontends.py) on a
real GPU: both serve, greedy answers agree whichever front-end ran them, each admits half of the
engine's KV capacity, and an unload stops the front-end and frees the GPU. Skipped without vLLM or
a GPU, like tests/test_gpu_vllm.py."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from common import keys
from common.fleet_state import live_workers
from tests.test_gpu_vllm import MODEL, GpuFleet, _generate, _poll, _scrape, _why_skip, start_gpu_fleet

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]


@pytest.fixture(scope="module")
def shared_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuFleet]:
    with start_gpu_fleet(tmp_path_factory.mktemp("gpu-frontends"), frontends=2) as fleet:
        yield fleet


async def test_two_frontends_share_one_vllm_engine(shared_fleet: GpuFleet) -> None:
    redis = aioredis.from_url(shared_fleet.redis_url)
    try:
        async with asyncio.timeout(300):  # the second front-end attaches once the engine core is up
            while len(ready := [w for w in await live_workers(redis)
                                if w.models.get(MODEL, {}).get("state") == "ready"]) < 2:
                await asyncio.sleep(0.5)
        parent = next(w for w in ready if not w.frontend_of)
        frontend = next(w for w in ready if w.frontend_of)
        assert frontend.frontend_of == parent.worker_id
        halves = [w.models[MODEL]["kv_capacity_tokens"] for w in (parent, frontend)]
        print("KV tokens per front-end:", halves)
        assert halves[0] == halves[1] > 10_000

        prompt = [{"role": "user", "content": "Hello, how are you?"}]
        async with aiohttp.ClientSession() as http:
            ids = []
            for _ in range(40):
                async with http.post(f"{shared_fleet.base_url}/v1/generate", json={
                        "model": MODEL, "messages": prompt, "max_tokens": 24, "temperature": 0}) as response:
                    assert response.status == 202
                    ids.append((await response.json())["request_id"])
            done = await asyncio.gather(*(_poll(http, shared_fleet.base_url, i, {"completed", "failed"}) for i in ids))
            assert {d["status"] for d in done} == {"completed"}
            texts = {d["text"] for d in done}
            served_by = {(await redis.hget(keys.request(i), "worker")).decode() for i in ids}
        print("served by", served_by, "answer:", texts)
        assert served_by == {parent.worker_id, frontend.worker_id}
        assert len(texts) == 1 and "".join(texts).strip()  # one engine: the same greedy answer everywhere
    finally:
        await redis.aclose()


async def test_unload_stops_the_frontend_and_frees_the_gpu(shared_fleet: GpuFleet) -> None:
    gpu = ("llm_fleet_gpu_memory_used_bytes", (("gpu", "0"),))
    async with aiohttp.ClientSession() as http:
        loaded = (await _scrape(http, shared_fleet.worker_url))[gpu]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from common.cli import main; main()", "models", "--redis-url",
            shared_fleet.redis_url, "unload", MODEL, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(process.communicate(), 300)
        assert process.returncode == 0 and '"state": "unloaded"' in out.decode(), out
        await asyncio.sleep(2.0)
        unloaded = (await _scrape(http, shared_fleet.worker_url))[gpu]
        print(f"GPU memory used: loaded {loaded / 1e9:.1f} GB, unloaded {unloaded / 1e9:.1f} GB")
        assert unloaded < loaded - 1e9
    redis = aioredis.from_url(shared_fleet.redis_url)
    try:
        assert [w.worker_id for w in await live_workers(redis) if w.frontend_of] == []
    finally:
        await redis.aclose()
    assert (await _generate_refused(shared_fleet))["status"] == 503


async def _generate_refused(fleet: GpuFleet) -> dict:
    await asyncio.sleep(1.1)  # the gateway's view of what is served is at most 1 s old
    async with aiohttp.ClientSession() as http:
        return await _generate(http, fleet.base_url, "nobody serves me", 4)
