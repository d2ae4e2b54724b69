"""Overload benchmark: offer 10x the fleet's capacity for a minute.

`llm-fleet up` (test engine, fixed per-token delay) on its own embedded Valkey. First the
fleet's capacity (completed requests/s) is measured with a closed loop; then requests are
offered open-loop at MULTIPLE x that rate for DURATION seconds (submit-then-poll). Reports:
accepted / 429 (each must carry Retry-After) / 5xx / other failures, whether every accepted
request completed, latency of the accepted ones, and the peak gateway RSS and Redis
used_memory (sampled every 0.5 s), which must stay bounded.

    python bench/overload.py                 # 10x for 60 s
    python bench/overload.py --duration 20   # shorter
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psutil
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_fleet import wait_ready
from common.embedded_redis import EmbeddedValkey, free_port
from common.fleet import interrupt

MODEL = "test-echo"
BODY = {"model": MODEL, "prompt": "overload ", "max_tokens": 100}


def start_fleet(redis_url: str, port: int, step_ms: float, max_outstanding: int) -> subprocess.Popen:
    catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
    catalogue.write_text(json.dumps({MODEL: {"engine": "test", "options": {
        "max_model_len": 4096, "max_num_seqs": 64, "kv_cache_tokens": 65536, "step_delay_ms": step_ms}}}))
    return subprocess.Popen(
        [sys.executable, "-m", "common.cli", "up", "--redis-url", redis_url, "--port", str(port),
            "--worker-http-port", "0", "--model", MODEL,
         "--catalogue", str(catalogue)],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "LLM_FLEET_MAX_OUTSTANDING": str(max_outstanding)})


async def run_request(http: aiohttp.ClientSession, base: str, counts: Counter, latencies: list[float]) -> None:
    started = time.monotonic()
    try:
        async with http.post(f"{base}/v1/generate", json=BODY) as response:
            if response.status == 429:
                counts["429"] += 1
                counts["429 without Retry-After"] += "Retry-After" not in response.headers
                return
            if response.status >= 500:
                counts["5xx"] += 1
                return
            if response.status != 202:
                counts[f"other {response.status}"] += 1
                return
            request_id = (await response.json())["request_id"]
        counts["accepted"] += 1
        while True:
            await asyncio.sleep(1.0)
            async with http.get(f"{base}/v1/requests/{request_id}") as response:
                if response.status >= 500:
                    counts["5xx"] += 1
                    continue
                state = await response.json()
            if state["status"] in ("completed", "failed", "cancelled"):
                counts[f"accepted and {state['status']}"] += 1
                latencies.append(time.monotonic() - started)
                return
    except (aiohttp.ClientError, TimeoutError) as exc:
        counts[f"client error {type(exc).__name__}"] += 1


async def capacity(http: aiohttp.ClientSession, base: str, seconds: float, concurrency: int) -> float:
    """Completed requests per second with `concurrency` clients, each submitting again at once."""
    done = 0
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            counts: Counter = Counter()
            await run_request(http, base, counts, [])
            done += counts["accepted and completed"]

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.monotonic() - started)


async def sample(gateway: psutil.Process, redis: aioredis.Redis, peaks: dict[str, float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            peaks["gateway_rss_mb"] = max(peaks["gateway_rss_mb"], gateway.memory_info().rss / 2**20)
            memory = await redis.info("memory")
            peaks["redis_used_memory_mb"] = max(peaks["redis_used_memory_mb"], memory["used_memory"] / 2**20)
        except (psutil.Error, OSError):
            pass
        await asyncio.sleep(0.5)


async def main_async(args: argparse.Namespace) -> dict:
    valkey = EmbeddedValkey()
    valkey.start()
    port = free_port()
    fleet = await asyncio.to_thread(start_fleet, valkey.url, port, args.step_ms, args.max_outstanding)
    base = f"http://127.0.0.1:{port}"
    redis = aioredis.from_url(valkey.url)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            await wait_ready(base, timeout_s=60)
            gateway = next(c for c in psutil.Process(fleet.pid).children() if "gateway" in c.cmdline())
            rate = await capacity(http, base, args.calibrate_s, args.max_outstanding // 2)
            offered_rate = rate * args.multiple
            peaks = {"gateway_rss_mb": 0.0, "redis_used_memory_mb": 0.0}
            before = {"gateway_rss_mb": gateway.memory_info().rss / 2**20,
                      "redis_used_memory_mb": (await redis.info("memory"))["used_memory"] / 2**20}
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(gateway, redis, peaks, stop))
            counts: Counter = Counter()
            latencies: list[float] = []
            tasks = []
            started = time.monotonic()
            sent = 0
            while time.monotonic() - started < args.duration:
                due = int((time.monotonic() - started) * offered_rate)
                for _ in range(due - sent):
                    tasks.append(asyncio.create_task(run_request(http, base, counts, latencies)))
                sent = due
                await asyncio.sleep(0.01)
            await asyncio.gather(*tasks)
            stop.set()
            await sampler
    finally:
        await redis.aclose()
        interrupt(fleet, 60)
        valkey.stop()
    lat = sorted(latencies)
    return {"capacity_rps": round(rate, 1), "offered_rps": round(offered_rate, 1), "duration_s": args.duration,
            "offered": sent, **counts,
            "accepted_p50_s": round(statistics.median(lat), 2) if lat else None,
            "accepted_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 2) if lat else None,
            "before": {k: round(v, 1) for k, v in before.items()}, "peak": {k: round(v, 1) for k, v in peaks.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiple", type=float, default=10.0, help="offered load / capacity")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--calibrate-s", type=float, default=15.0)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--max-outstanding", type=int, default=256)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
