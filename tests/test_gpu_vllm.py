"""The vLLM worker on a real GPU: `llm-fleet up` (embedded Valkey, gateway, one vLLM worker)
serving the real SmolLM2-135M-Instruct weights. Skipped where there is no vLLM or no GPU.

Run on the GPU machine with `pytest -m gpu` (bench/device/README.md says how to get vLLM there);
LLM_FLEET_TEST_VLLM_MODEL names the model directory (default /tmp/models/smollm2-135m).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from common import keys
from common.embedded_redis import free_port
from common.fleet import interrupt
from common.protocol import WorkerStatus

MODEL_DIR = Path(os.environ.get("LLM_FLEET_TEST_VLLM_MODEL", "/tmp/models/smollm2-135m"))
MODEL = "smollm2-135m"


def _why_skip() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if not (MODEL_DIR / "model.safetensors").exists():
        return f"no real weights in {MODEL_DIR}"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]


@dataclass
class GpuFleet:
    base_url: str
    redis_url: str


@pytest.fixture(scope="module")
def gpu_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuFleet]:
    """`llm-fleet up` with the model served by vLLM instead of the CPU engine (same name)."""
    catalogue = tmp_path_factory.mktemp("gpu") / "catalogue.json"
    catalogue.write_text(json.dumps({MODEL: {"engine": "vllm", "source": str(MODEL_DIR), "options": {
        "dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.4, "enforce_eager": True}}}))
    port = free_port()
    fleet = subprocess.Popen(
        [sys.executable, "-c", "from common.cli import main; main()", "up", "--port", str(port),
         "--model", MODEL, "--catalogue", str(catalogue)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 600
        assert fleet.stdout is not None
        output = ""
        for line in fleet.stdout:
            print(line, end="")
            output += line
            if "ready in" in line or time.monotonic() > deadline:
                break
        assert "ready in" in output, "the vLLM worker became ready"
        redis_url = re.search(r"embedded Valkey on (\S+)", output)
        assert redis_url is not None
        yield GpuFleet(f"http://127.0.0.1:{port}", redis_url.group(1))
    finally:
        interrupt(fleet, 120)


async def _poll(http: aiohttp.ClientSession, base_url: str, request_id: str, until: set[str]) -> dict:
    async with asyncio.timeout(60):
        while True:
            async with http.get(f"{base_url}/v1/requests/{request_id}") as response:
                reply = await response.json()
            if reply["status"] in until:
                return reply
            await asyncio.sleep(0.05)


async def _worker_model_status(http: aiohttp.ClientSession, base_url: str) -> dict:
    async with http.get(f"{base_url}/v1/models") as response:
        models = {m["id"]: m for m in (await response.json())["data"]}
    [status] = models[MODEL]["workers"]
    return status


async def test_real_weights_give_a_coherent_greedy_answer(gpu_fleet: GpuFleet) -> None:
    base_url = gpu_fleet.base_url
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/v1/generate", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hello, how are you?"}],
            "max_tokens": 32, "temperature": 0}) as response:
            assert response.status == 202
            request_id = (await response.json())["request_id"]
        done = await _poll(http, base_url, request_id, {"completed", "failed"})
    print("greedy answer:", done["text"])
    assert done["status"] == "completed"
    words = re.findall(r"[a-z']+", done["text"].lower())
    assert len(words) >= 5 and {"i", "i'm", "am", "you", "help", "doing", "well"} & set(words), done["text"]
    assert done["usage"]["prompt_tokens"] > 5 and 0 < done["usage"]["completion_tokens"] <= 32


async def test_native_websocket_and_openai_requests_are_served(gpu_fleet: GpuFleet) -> None:
    base_url = gpu_fleet.base_url
    from openai import AsyncOpenAI

    async with aiohttp.ClientSession() as http:
        # WebSocket: chunks arrive in seq order, then `done` with usage.
        async with http.ws_connect(base_url.replace("http", "ws", 1) + "/ws/generate") as ws:
            await ws.send_json({"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0})
            accepted = await ws.receive_json()
            assert accepted["type"] == "accepted"
            messages = []
            async with asyncio.timeout(60):
                while not messages or messages[-1]["type"] not in ("done", "error"):
                    messages.append(await ws.receive_json())
        chunks = [m for m in messages if m["type"] == "chunk"]
        assert [m["seq"] for m in chunks] == list(range(1, len(chunks) + 1))
        assert messages[-1]["type"] == "done" and 0 < messages[-1]["usage"]["completion_tokens"] <= 16
        assert "".join(m["text"] for m in chunks).strip()

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused")
    # Streaming chat, with usage in the last chunk, and ignore_eos (what benchmarks send).
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to five."}], max_tokens=40,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    pieces, usage = [], None
    async for event in stream:
        pieces += [c.delta.content or "" for c in event.choices]
        usage = event.usage or usage
    assert "".join(pieces).strip() and usage is not None and usage.completion_tokens == 40
    # Non-streaming completions.
    completion = await client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0)
    assert completion.choices[0].text.strip() and completion.usage.completion_tokens <= 8
    await client.close()


async def test_cancel_aborts_in_vllm_and_frees_the_kv_budget(gpu_fleet: GpuFleet) -> None:
    base_url = gpu_fleet.base_url
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/v1/generate", json={
            "model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1800, "ignore_eos": True,
            "temperature": 0}) as response:
            request_id = (await response.json())["request_id"]
        await _poll(http, base_url, request_id, {"running"})
        async with asyncio.timeout(10):
            # A heartbeat taken once vLLM's scheduler reported the job running (the first one after
            # admission may predate vLLM's first step): the job's budget is held.
            while (held := await _worker_model_status(http, base_url))["kv_used_tokens"] < 1800 or (
                    held["engine_running"] != 1):
                await asyncio.sleep(0.1)
        assert held["running"] == 1 and held["engine_kv_usage"] > 0
        async with http.delete(f"{base_url}/v1/requests/{request_id}") as response:
            assert response.status == 200
        cancelled = await _poll(http, base_url, request_id, {"cancelled", "completed"})
        assert cancelled["status"] == "cancelled"
        async with asyncio.timeout(10):
            while (status := await _worker_model_status(http, base_url))["kv_used_tokens"] != 0:
                await asyncio.sleep(0.1)
        assert status["running"] == 0 and status["engine_running"] == 0 and status["kv_capacity_tokens"] > 100_000
        # The heartbeat carries the GPU's memory and utilization from NVML.
        redis = aioredis.from_url(gpu_fleet.redis_url)
        [worker_id] = await redis.smembers(keys.WORKERS)
        heartbeat = WorkerStatus.unpack(await redis.get(keys.worker(worker_id.decode())))
        await redis.aclose()
        assert heartbeat.gpu["available"] is True, heartbeat.gpu
        assert all(0 < d["memory_used_bytes"] < d["memory_total_bytes"] for d in heartbeat.gpu["devices"])
        # The engine is free again: a new request runs to completion at once.
        async with http.post(f"{base_url}/v1/generate", json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 4, "ignore_eos": True}) as response:
            follow_up = (await response.json())["request_id"]
        assert (await _poll(http, base_url, follow_up, {"completed", "failed"}))["status"] == "completed"
