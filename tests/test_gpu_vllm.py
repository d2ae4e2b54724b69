"""The vLLM worker on a real GPU: `llm-fleet up` (embedded Valkey, gateway, one vLLM worker)
serving the real SmolLM2-135M-Instruct weights. Skipped where there is no vLLM or no GPU.

Run on the GPU machine with `pytest -m gpu` (bench/device/README.md says how to get vLLM there);
LLM_FLEET_TEST_VLLM_MODEL names the model directory (default /tmp/models/smollm2-135m).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
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
    worker_url: str  # the worker's /metrics, /ready


@contextlib.contextmanager
def start_gpu_fleet(directory: Path, **entry: object) -> Iterator[GpuFleet]:
    """`llm-fleet up` with the model served by vLLM instead of the CPU engine (same name); `entry`
    adds to its catalogue entry."""
    catalogue = directory / "catalogue.json"
    catalogue.write_text(json.dumps({MODEL: {"engine": "vllm", "source": str(MODEL_DIR), "options": {
        "dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.4, "enforce_eager": True},
        **entry}}))
    port, worker_port = free_port(), free_port()
    fleet = subprocess.Popen(
        [sys.executable, "-c", "from common.cli import main; main()", "up", "--port", str(port),
         "--worker-http-port", str(worker_port), "--model", MODEL, "--catalogue", str(catalogue)],
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
        # Keep reading its output: a full pipe would stall the fleet's logging, and the fleet with it.
        threading.Thread(target=collections.deque, args=(fleet.stdout, 0), daemon=True).start()
        yield GpuFleet(f"http://127.0.0.1:{port}", redis_url.group(1), f"http://127.0.0.1:{worker_port}")
    finally:
        interrupt(fleet, 120)


@pytest.fixture(scope="module")
def gpu_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuFleet]:
    with start_gpu_fleet(tmp_path_factory.mktemp("gpu")) as fleet:
        yield fleet


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


async def test_a_batch_jobs_tokens_handed_over_in_pieces_make_the_same_answer(gpu_fleet: GpuFleet) -> None:
    """A batch job's output comes from vLLM 16 tokens at a time (worker/engines/base.py BATCH_OUTPUT_EVERY,
    vLLM's stream interval set on that request alone): the pieces add up to the interactive answer, token
    for token, with the text and usage that go with it."""
    base_url = gpu_fleet.base_url
    body = {"model": MODEL, "prompt": "List the planets of the solar system:", "max_tokens": 50,
            "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as http:
        done = {}
        for priority in ("interactive", "batch"):
            async with http.post(f"{base_url}/v1/generate", json={**body, "priority": priority}) as response:
                assert response.status == 202, await response.text()
                request_id = (await response.json())["request_id"]
            done[priority] = await _poll(http, base_url, request_id, {"completed", "failed"})
    assert done["batch"]["status"] == "completed"
    assert done["batch"]["usage"]["completion_tokens"] == 50 == done["interactive"]["usage"]["completion_tokens"]
    assert done["batch"]["text"] == done["interactive"]["text"] and done["batch"]["text"]


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
        seqs = [m["seq"] for m in chunks]  # increasing from 1 (pieces a slow reader missed come merged)
        assert seqs[0] == 1 and seqs == sorted(set(seqs)), seqs
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


async def _scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with http.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _generate(http: aiohttp.ClientSession, base_url: str, prompt: str, max_tokens: int) -> dict:
    async with http.post(f"{base_url}/v1/generate", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                           "ignore_eos": True}) as response:
        reply = await response.json()
        if response.status != 202:
            return {"status": response.status, **reply}
    return await _poll(http, base_url, reply["request_id"], {"completed", "failed"})


async def test_vllm_prefix_cache_hits_are_reported_as_cached_tokens(gpu_fleet: GpuFleet) -> None:
    """The same long prefix twice: vLLM's prefix cache serves the second's shared blocks, and the fleet
    reports them (`usage.prompt_tokens_details.cached_tokens`, from vLLM's num_cached_tokens)."""
    shared = "You are a careful assistant. " * 40  # several KV blocks
    async with aiohttp.ClientSession() as http:
        first = await _generate(http, gpu_fleet.base_url, shared + "Question one?", 4)
        second = await _generate(http, gpu_fleet.base_url, shared + "Question two?", 4)
    print("cached tokens:", first["usage"], second["usage"])
    assert first["status"] == second["status"] == "completed"
    prompt = second["usage"]["prompt_tokens"]
    assert prompt - 32 <= second["usage"]["prompt_tokens_details"]["cached_tokens"] < prompt


async def test_worker_metrics_report_the_gpu_kv_and_latencies(gpu_fleet: GpuFleet) -> None:
    model = (("model", MODEL),)
    async with aiohttp.ClientSession() as http:
        before = await _scrape(http, gpu_fleet.worker_url)
        results = await asyncio.gather(*(_generate(http, gpu_fleet.base_url, f"metrics {i}", 16) for i in range(4)))
        after = await _scrape(http, gpu_fleet.worker_url)
        gateway = await _scrape(http, gpu_fleet.base_url)
    assert [r["status"] for r in results] == ["completed"] * 4
    print({k: v for k, v in after.items() if "gpu" in k[0] or "kv" in k[0]})
    assert after[("llm_fleet_gpu_available", ())] == 1
    assert after[("llm_fleet_gpu_memory_used_bytes", (("gpu", "0"),))] > 1e9
    assert 0 <= after[("llm_fleet_gpu_utilization_ratio", (("gpu", "0"),))] <= 1
    assert after[("llm_fleet_kv_cache_capacity_tokens", model)] > 10_000
    assert after[("llm_fleet_generation_tokens_total", model)] - before.get(
        ("llm_fleet_generation_tokens_total", model), 0) == 64
    ttft = ("llm_fleet_time_to_first_token_seconds_count", model)
    assert after[ttft] - before.get(ttft, 0) == 4
    assert gateway[("llm_fleet_model_ready_workers", model)] == 1


async def test_hot_unload_frees_the_gpu_and_a_reload_serves_again(gpu_fleet: GpuFleet) -> None:
    """`llm-fleet models unload` / `load` (the arq control plane) on a live vLLM worker."""
    gpu = ("llm_fleet_gpu_memory_used_bytes", (("gpu", "0"),))

    async def models_cli(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from common.cli import main; main()", "models", "--redis-url", gpu_fleet.redis_url,
            *args, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(process.communicate(), 600)
        return process.returncode or 0, out.decode()

    async with aiohttp.ClientSession() as http:
        loaded = (await _scrape(http, gpu_fleet.worker_url))[gpu]
        code, out = await models_cli("unload", MODEL)
        assert code == 0 and '"state": "unloaded"' in out, out
        await asyncio.sleep(2.0)
        unloaded = (await _scrape(http, gpu_fleet.worker_url))[gpu]
        print(f"GPU memory used: loaded {loaded / 1e9:.1f} GB, unloaded {unloaded / 1e9:.1f} GB")
        assert unloaded < loaded - 1e9  # the engine's weights and KV cache were freed
        async with http.get(gpu_fleet.worker_url + "/ready") as response:
            assert response.status == 503
        await asyncio.sleep(1.1)  # the gateway's view of what is served is at most 1 s old
        refused = await _generate(http, gpu_fleet.base_url, "nobody serves me", 4)
        assert refused["status"] == 503 and "not loaded on any" in refused["error"]["message"]

        started = time.monotonic()
        code, out = await models_cli("load", MODEL)
        assert code == 0 and '"state": "ready"' in out, out
        print(f"reload took {time.monotonic() - started:.1f}s")
        assert (await _generate(http, gpu_fleet.base_url, "back again", 8))["status"] == "completed"
