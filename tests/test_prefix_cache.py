"""Prefix-cache hits, reported as OpenAI's `usage.prompt_tokens_details.cached_tokens` everywhere a
usage is (poll, native WebSocket, OpenAI JSON and SSE) and counted on the worker's /metrics. The test
engine simulates the cache (common/prefix_blocks.py); vLLM reports its own (`num_cached_tokens`)."""

from __future__ import annotations

import json

from common.prefix_blocks import PrefixCache, block_hashes
from tests.conftest import TEST_MODEL, StartFleet

PROMPT = "a system prompt that many requests share, long enough for several blocks of the cache. "  # 87 bytes


def test_a_prefix_is_shared_only_up_to_the_first_block_that_differs() -> None:
    cache = PrefixCache(block_size=4, capacity_blocks=4)
    assert cache.lookup_and_store(list(range(10))) == 0  # blocks [0-3] [4-7]; 8, 9 are no whole block
    assert cache.lookup_and_store(list(range(10))) == 8
    assert cache.lookup_and_store(list(range(8))) == 7, "the last prompt token is always computed"
    assert cache.lookup_and_store([99, *range(1, 10)]) == 0, "a changed first block changes every hash after it"
    assert block_hashes([1, 2, 3], 4) == [] and block_hashes(list(range(8)), 4) == block_hashes(list(range(9)), 4)
    cache.lookup_and_store(list(range(100, 112)))  # three new blocks: the least recently used go
    assert cache.lookup_and_store(list(range(10))) == 0


async def test_cached_tokens_are_reported_on_every_route(start_fleet: StartFleet) -> None:
    fleet = await start_fleet(engine={"prefix_block_size": 16})
    first = await fleet.wait_done(await fleet.submit(prompt=PROMPT + "first", max_tokens=4))
    again = await fleet.wait_done(await fleet.submit(prompt=PROMPT + "second", max_tokens=4))
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 80}  # 5 whole blocks of the shared 87

    status, completion, _ = await fleet.post("/v1/completions", {"model": TEST_MODEL, "prompt": PROMPT + "third",
                                                                 "max_tokens": 4})
    assert status == 200 and completion["usage"]["prompt_tokens_details"] == {"cached_tokens": 80}
    async with fleet.http.post(fleet.base_url + "/v1/completions", json={
            "model": TEST_MODEL, "prompt": PROMPT + "fourth", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        events = [json.loads(line[6:]) for line in (await response.text()).splitlines()
                  if line.startswith("data: {")]
    assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 80}
    async with fleet.http.ws_connect(fleet.ws_url) as ws:
        await ws.send_json({"model": TEST_MODEL, "prompt": "nothing in common " * 3, "max_tokens": 4})
        while (message := await ws.receive_json())["type"] != "done":
            pass
    assert message["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}

    worker = fleet.workers[0]
    metrics = worker.metrics.render(await worker.status()).decode()
    assert f'llm_fleet_prompt_tokens_cached_total{{model="{TEST_MODEL}"}} 240.0' in metrics
