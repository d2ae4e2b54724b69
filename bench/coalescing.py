"""What coalescing output deltas buys: the same streamed load at several flush intervals.

`llm-fleet up` with the deterministic test engine (fixed 7 ms per decoding step, the step time of
smollm2-135m at c=100 on an H100), N concurrent SSE completions of 256 tokens. Per interval:
throughput, TTFT, SSE events per request, and CPU milliseconds per 1k tokens in the gateway,
the worker and Valkey (the per-token cost coalescing exists to cut).

Run: .venv/bin/python bench/coalescing.py [--concurrency 100] [--intervals 0 5 15 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from vllm_vs_fleet import FLEET_CLI, process_tree, server

OUTPUT_TOKENS = 256


async def stream_one(http: aiohttp.ClientSession, url: str) -> tuple[float, int]:
    body = {"model": "test-echo", "prompt": "hello world " * 20, "max_tokens": OUTPUT_TOKENS, "ignore_eos": True,
            "stream": True}
    started, first, events = time.perf_counter(), 0.0, 0
    async with http.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data: {"):
                events += 1
                first = first or time.perf_counter() - started
    return first, events


async def load(url: str, concurrency: int, requests: int) -> tuple[float, list[tuple[float, int]]]:
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one() -> tuple[float, int]:
            async with gate:
                return await stream_one(http, url)
        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(requests)))
        return time.perf_counter() - started, results


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--intervals", type=float, nargs="+", default=[0, 5, 15, 30])
    args = parser.parse_args()
    catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
    catalogue.write_text(json.dumps({"test-echo": {"engine": "test", "options": {
        "max_model_len": 4096, "max_num_seqs": 1024, "kv_cache_tokens": 10**6, "step_delay_ms": 7}}}))
    print(f"c={args.concurrency}, {args.requests} requests x {OUTPUT_TOKENS} tokens, test engine at 7 ms/step\n")
    print("| flush interval ms | output tok/s | TTFT p50 ms | SSE events/request | "
          "CPU ms per 1k tokens: gateway | worker | valkey |")
    print("|---|---|---|---|---|---|---|")
    for interval in args.intervals:
        port = 8300
        env = {**os.environ, "LLM_FLEET_FLUSH_INTERVAL_MS": str(interval), "LLM_FLEET_MAX_OUTSTANDING": "100000"}
        argv = [*FLEET_CLI, "up", "--port", str(port),
            "--worker-http-port", "0", "--model", "test-echo", "--catalogue", str(catalogue)]
        with server(argv, f"http://127.0.0.1:{port}/ready", Path(tempfile.mktemp(suffix=".log")), env, 60,
                    ready=lambda body: bool(json.loads(body).get("models"))) as pid:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(load(url, 10, 20))  # warm-up
            roles = process_tree(pid)
            before = {role: cpu_s(p) for role, p in roles.items()}
            wall, results = asyncio.run(load(url, args.concurrency, args.requests))
            tokens = args.requests * OUTPUT_TOKENS
            cpu = {role: 1000 * (cpu_s(p) - before[role]) / (tokens / 1000) for role, p in roles.items()}
        ttft = sorted(first for first, _ in results)[len(results) // 2] * 1000
        events = sum(n for _, n in results) / len(results)
        print(f"| {interval:g} | {tokens / wall:,.0f} | {ttft:.0f} | {events:.0f} | {cpu['gateway']:.1f} | "
              f"{cpu['worker']:.1f} | {cpu['valkey']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
