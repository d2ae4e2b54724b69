"""What idle workers cost Redis: commands/s and Valkey CPU over 10 s with N test-engine workers and no
load, plus M extra (empty) engine streams registered, as engines that came and went leave them until
housekeeping drops them. An idle reader looks for overdue jobs of other engines every `affinity_wait_ms`
(worker/job_reader.py); the look should cost the same whatever M is.

    python bench/idle_readers.py --workers 8 --extra-streams 50
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_fleet import MODEL, ProcessFleet
from common import keys


async def measure(workers: int, extra_streams: int, seconds: float) -> dict[str, float]:
    fleet = ProcessFleet(workers, {"max_model_len": 4096, "max_num_seqs": 8, "kv_cache_tokens": 24576,
                                   "step_delay_ms": 10})
    fleet.start()
    try:
        async with aiohttp.ClientSession() as http:
            await fleet.wait_ready(http)
        client = redis.Redis.from_url(fleet.valkey.url)
        for i in range(extra_streams):
            stream = keys.job_stream(MODEL, f"gone-{i}")
            client.xgroup_create(stream, keys.CONSUMER_GROUP, id="0", mkstream=True)
            client.sadd(keys.engine_streams(MODEL), stream)
        await asyncio.sleep(3)
        before, started = client.info(), time.monotonic()
        await asyncio.sleep(seconds)
        after, elapsed = client.info(), time.monotonic() - started
    finally:
        fleet.stop()
    cpu = (after["used_cpu_user"] + after["used_cpu_sys"] - before["used_cpu_user"] - before["used_cpu_sys"])
    return {"commands_per_s": (after["total_commands_processed"] - before["total_commands_processed"]) / elapsed,
            "valkey_cpu_percent": cpu / elapsed * 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--extra-streams", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    result = asyncio.run(measure(args.workers, args.extra_streams, args.seconds))
    print(f"| {args.workers} | {args.extra_streams} | {result['commands_per_s']:.0f} | "
          f"{result['valkey_cpu_percent']:.1f}% |")


if __name__ == "__main__":
    main()
