"""Do workers scale out? Throughput at N = 1, 2, 4, 8 workers, and a scale-in under load.

Each worker serves the deterministic test engine (the test engine, not a model): `--seqs` sequences
at a time and a fixed `--step-ms` per decoding step, so one worker's capacity is known
(seqs x 1000/step_ms tokens/s) and one small machine can hold eight. A closed-loop client keeps
`2 x N x seqs` requests in flight (enough to fill every slot) through the OpenAI completions route,
and counts what completes within the measured window. Target: throughput(N) >= 0.9 x N x throughput(1).

Scale-in: with 4 workers under the same load, one worker gets SIGTERM (drain 1 s, shorter than a
request): it must exit 0, hand back what it could not finish, and every request must still complete
with exactly the expected text (the test engine's text is known).

The fleet runs as separate processes (Valkey, one gateway, N workers), not under `llm-fleet up`:
its supervisor would restart the worker the scale-in stops.

    python bench/scaling.py                       # N = 1,2,4,8 and the scale-in; prints the tables
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_fleet import MODEL, ProcessFleet


class Fleet(ProcessFleet):
    def __init__(self, args: argparse.Namespace, workers: int) -> None:
        # Flushes every 100 ms: a few chunks per request instead of one per token, so the one gateway
        # and Valkey on this small machine are not what limits eight workers.
        super().__init__(workers, {"max_model_len": 4096, "max_num_seqs": args.seqs, "kv_cache_tokens": 65536,
                                   "step_delay_ms": args.step_ms},
                         gateway_env={"LLM_FLEET_MAX_OUTSTANDING": "10000"},
                         worker_env={"LLM_FLEET_FLUSH_INTERVAL_MS": "100", "LLM_FLEET_DRAIN_TIMEOUT_S": "1",
                                     "LLM_FLEET_HEARTBEAT_TTL_S": "3"})
        self.args = args


def expected(prompt: str, tokens: int) -> str:
    return (prompt * (tokens // len(prompt) + 1))[:tokens]


async def load(fleet: Fleet, http: aiohttp.ClientSession, concurrency: int, warmup_s: float, measure_s: float,
               during: asyncio.Event | None = None) -> dict:
    """Closed loop: `concurrency` clients, each sending the next request when its last one finished.
    Counts requests that finished inside the window; checks every text."""
    max_tokens = fleet.args.max_tokens
    window = [0.0, 0.0]
    done: list[tuple[float, float]] = []  # (finished at, latency) of every request
    wrong = failed = 0
    stop = asyncio.Event()

    async def client(c: int) -> None:
        nonlocal wrong, failed
        # Spread the starts over the warm-up: clients that start together stay in lockstep (every
        # request takes the same time) and finish in waves, which a finite window counts unevenly.
        await asyncio.sleep(random.uniform(0, warmup_s / 2))
        i = 0
        while not stop.is_set():
            prompt = f"client {c:03d} request {i:05d} "
            i += 1
            started = time.monotonic()
            try:
                async with http.post(f"{fleet.base}/v1/completions", json={
                        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}) as response:
                    body = await response.json()
            except (TimeoutError, aiohttp.ClientError):
                failed += 1
                continue
            if response.status != 200:
                failed += 1
                continue
            wrong += body["choices"][0]["text"] != expected(prompt, max_tokens)
            done.append((time.monotonic(), time.monotonic() - started))

    clients = [asyncio.create_task(client(c)) for c in range(concurrency)]
    await asyncio.sleep(warmup_s)
    window[0] = time.monotonic()
    with tqdm(total=int(measure_s), desc=f"{fleet.count} worker(s)", unit="s", leave=False,
              disable=not sys.stderr.isatty()) as bar:
        for second in range(int(measure_s)):
            await asyncio.sleep(1.0)
            bar.update(1)
            if during is not None and second == int(measure_s) // 3:
                during.set()
    window[1] = time.monotonic()
    stop.set()
    await asyncio.gather(*clients)  # in-flight requests finish (and are checked)
    inside = [lat for at, lat in done if window[0] <= at < window[1]]
    seconds = window[1] - window[0]
    return {"requests_per_s": len(inside) / seconds, "tokens_per_s": len(inside) * max_tokens / seconds,
            "p50_latency_s": statistics.median(inside) if inside else None, "completed": len(done),
            "wrong_text": wrong, "failed": failed}


async def throughput(args: argparse.Namespace, workers: int) -> dict:
    fleet = Fleet(args, workers)
    fleet.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120)) as http:
            await fleet.wait_ready(http)
            result = await load(fleet, http, 2 * workers * args.seqs, args.warmup_s, args.measure_s)
    finally:
        fleet.stop()
    return {"workers": workers, "concurrency": 2 * workers * args.seqs, **result}


async def scale_in(args: argparse.Namespace) -> dict:
    fleet = Fleet(args, 4)
    fleet.start()
    stop_one = asyncio.Event()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120)) as http:
            await fleet.wait_ready(http)
            victim = fleet.workers[0]

            async def terminate() -> int:
                await stop_one.wait()
                victim.send_signal(signal.SIGTERM)
                return await asyncio.to_thread(victim.wait, 60)

            exit_code = asyncio.create_task(terminate())
            result = await load(fleet, http, 2 * 4 * args.seqs, args.warmup_s, args.measure_s, during=stop_one)
            return {"workers": "4 -> 3", "sigterm_exit_code": await exit_code,
                    "handed_back": fleet.handed_back(victim), **result}
    finally:
        fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts to measure")
    parser.add_argument("--seqs", type=int, default=8, help="test engine: sequences per worker")
    parser.add_argument("--step-ms", type=float, default=40.0, help="test engine: delay per decoding step")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--warmup-s", type=float, default=8.0)
    parser.add_argument("--measure-s", type=float, default=30.0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    runs = [asyncio.run(throughput(args, int(n))) for n in args.workers.split(",")]
    shrink = asyncio.run(scale_in(args))
    base = runs[0]["tokens_per_s"] / runs[0]["workers"]
    per_worker = args.seqs * 1000 / args.step_ms
    print(f"\nscaling: test engine ({args.seqs} seqs/worker, {args.step_ms:g} ms/step: at most {per_worker:.0f} "
          f"tok/s per worker), max_tokens {args.max_tokens}, {args.measure_s:g} s measured, closed loop of "
          "2 x N x seqs clients, OpenAI completions route")
    print("| workers | clients | req/s | tok/s | x throughput(1) | efficiency | p50 latency s | wrong | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        speedup = r["tokens_per_s"] / runs[0]["tokens_per_s"]
        print(f"| {r['workers']} | {r['concurrency']} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{speedup:.2f} | {r['tokens_per_s'] / (base * r['workers']):.2f} | {r['p50_latency_s']:.2f} | "
              f"{r['wrong_text']} | {r['failed']} |")
    print("\nscale-in under load: 4 workers, one SIGTERMed a third of the way in (drain 1 s)")
    print("| workers | SIGTERM exit code | jobs handed back | completed | wrong text | failed | req/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {shrink['workers']} | {shrink['sigterm_exit_code']} | {shrink['handed_back']} | {shrink['completed']} | "
          f"{shrink['wrong_text']} | {shrink['failed']} | {shrink['requests_per_s']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "scale_in": shrink, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
