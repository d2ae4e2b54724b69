"""What waiting for a replica (WAIT, common/replication.py) costs on the submit path.

Three set-ups of `llm-fleet up` (one gateway, one test-engine worker stepping every 2 ms) on
loopback: a lone Valkey (nothing to wait for), a primary with a replica and three Sentinels with
WAIT off (LLM_FLEET_REPLICA_ACK_TIMEOUT_MS=0: a 202 may be lost in a failover), and the same with
WAIT on (the default). For each: the latency of one submit at a time (POST /v1/generate -> 202),
the submits per second of --concurrency clients, and a lone WebSocket stream's gaps between chunks
(a worker flush, which waits for the replica too, sets their pace).

    python bench/replication.py --out bench/results/.../replication.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_fleet import MODEL, start_test_fleet, wait_ready
from common.embedded_redis import EmbeddedValkey, EmbeddedValkeyHA, free_port
from common.fleet import interrupt


async def submit(http: aiohttp.ClientSession, base_url: str, i: int) -> float:
    started = time.perf_counter()
    async with http.post(f"{base_url}/v1/generate", json={"model": MODEL, "prompt": f"r{i} ", "max_tokens": 2}) as r:
        assert r.status == 202, await r.text()
    return time.perf_counter() - started


async def measure(redis_url: str, wait_ms: int, sequential: int, concurrent: int, concurrency: int) -> dict:
    port = free_port()
    fleet = start_test_fleet(port, redis_url, kv_cache_tokens=1 << 20, env={
        "LLM_FLEET_REPLICA_ACK_TIMEOUT_MS": str(wait_ms), "LLM_FLEET_MAX_OUTSTANDING": "1000000"})
    base_url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base_url)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            for i in range(50):  # warm-up: connections, scripts loaded, tokenizer fetched
                await submit(http, base_url, i)
            latencies = sorted([await submit(http, base_url, i) for i in range(sequential)])
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int) -> None:
                async with gate:
                    await submit(http, base_url, i)

            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(concurrent)))
            rate = concurrent / (time.perf_counter() - started)
            await drained(http, base_url)  # the submitted work is done before the stream is timed
            gaps = await stream_gaps(http, base_url)
    finally:
        interrupt(fleet, 30)
    return {"p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2), "submits_per_s": round(rate),
            "stream_gap_p50_ms": round(1000 * statistics.median(gaps), 2)}


async def stream_gaps(http: aiohttp.ClientSession, base_url: str) -> list[float]:
    async with http.ws_connect(base_url.replace("http", "ws", 1) + "/ws/generate") as ws:
        await ws.send_json({"model": MODEL, "prompt": "a lone stream ", "max_tokens": 300})
        seen = []
        while True:
            message = await ws.receive_json()
            if message["type"] == "chunk":
                seen.append(time.perf_counter())
            elif message["type"] == "done":
                return [b - a for a, b in itertools.pairwise(seen)]


async def drained(http: aiohttp.ClientSession, base_url: str) -> None:
    for _ in range(1200):
        async with http.get(f"{base_url}/v1/fleet") as response:
            if not (await response.json())["queues"][MODEL]["outstanding"]:
                return
        await asyncio.sleep(0.5)


async def main_async(args: argparse.Namespace) -> list[dict]:
    rows = []
    lone = EmbeddedValkey()
    lone.start()
    try:
        rows.append({"redis": "one Valkey", "wait": "-", **await measure(lone.url, 1000, args.sequential,
                                                                       args.concurrent, args.concurrency)})
    finally:
        lone.stop()
    group = EmbeddedValkeyHA(replicas=1)
    group.start()
    try:
        for wait_ms, label in ((0, "off"), (1000, "on (1 replica)")):
            rows.append({"redis": "primary + replica + 3 Sentinels", "wait": label,
                         **await measure(group.url, wait_ms, args.sequential, args.concurrent, args.concurrency)})
    finally:
        group.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--concurrent", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    print(f"\nsubmit path (POST /v1/generate -> 202), loopback; {args.sequential} one at a time, then "
          f"{args.concurrent} by {args.concurrency} clients")
    print("| Redis | WAIT for a replica | submit p50 ms | p99 ms | submits/s | lone stream: gap p50 ms |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['redis']} | {row['wait']} | {row['p50_ms']} | {row['p99_ms']} | {row['submits_per_s']} | "
              f"{row['stream_gap_p50_ms']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
