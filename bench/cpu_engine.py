"""CPU engine throughput through the whole fleet (embedded Valkey, gateway, one SmolLM2 worker).

Starts `llm-fleet up` like a newcomer would, then measures over WebSocket:
time to /ready, single-stream tokens/s, and aggregate tokens/s with N concurrent streams.
Prints a Markdown table. Usage: python bench/cpu_engine.py [--concurrency 16] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from common.embedded_redis import free_port

PROMPT = "Write a long, detailed story about a dragon who learns to cook."


async def _one(session: aiohttp.ClientSession, ws_url: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, total_s, completion_tokens) of one streamed request."""
    async with session.ws_connect(ws_url) as ws:
        start = time.perf_counter()
        await ws.send_json({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                            "temperature": 0})
        first = None
        while True:
            message = await ws.receive_json()
            if message["type"] == "chunk" and first is None:
                first = time.perf_counter()
            if message["type"] == "done":
                return (first or time.perf_counter()) - start, time.perf_counter() - start, \
                    message["usage"]["completion_tokens"]
            if message["type"] == "error":
                raise RuntimeError(message)


async def _measure(base: str, concurrency: int, max_tokens: int) -> list[tuple[str, str]]:
    ws_url = base.replace("http", "ws", 1) + "/ws/generate"
    rows = []
    async with aiohttp.ClientSession() as session:
        await _one(session, ws_url, 8)  # warm-up
        ttft, total, tokens = await _one(session, ws_url, max_tokens)
        rows.append(("single stream: output tokens/s", f"{tokens / total:.1f}"))
        rows.append(("single stream: decode tokens/s (after first token)", f"{(tokens - 1) / (total - ttft):.1f}"))
        rows.append(("single stream: TTFT ms", f"{ttft * 1000:.0f}"))
        start = time.perf_counter()
        results = await asyncio.gather(*[_one(session, ws_url, max_tokens) for _ in range(concurrency)])
        wall = time.perf_counter() - start
        total_tokens = sum(r[2] for r in results)
        ttfts = sorted(r[0] for r in results)
        rows.append((f"{concurrency} concurrent: aggregate output tokens/s", f"{total_tokens / wall:.1f}"))
        rows.append((f"{concurrency} concurrent: per-stream tokens/s (mean)",
                     f"{sum(r[2] / r[1] for r in results) / concurrency:.1f}"))
        rows.append((f"{concurrency} concurrent: TTFT p50 / max ms",
                     f"{ttfts[len(ttfts) // 2] * 1000:.0f} / {ttfts[-1] * 1000:.0f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    port = free_port()
    exe = str(Path(sys.executable).parent / "llm-fleet")
    started = time.perf_counter()
    fleet = subprocess.Popen([exe, "up", "--port", str(port),
        "--worker-http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        for line in fleet.stdout:  # type: ignore[union-attr]
            if "ready in" in line:
                break
        ready_s = time.perf_counter() - started
        rows = [("`llm-fleet up` to /ready, s", f"{ready_s:.1f}")]
        rows += asyncio.run(_measure(f"http://127.0.0.1:{port}", args.concurrency, args.max_tokens))
    finally:
        fleet.send_signal(signal.SIGINT)
        fleet.wait(60)
    print(f"\nSmolLM2-135M-Instruct, CPU engine (fp32), max_tokens={args.max_tokens}, greedy\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(json.dumps(dict(rows)), file=sys.stderr)


if __name__ == "__main__":
    main()
