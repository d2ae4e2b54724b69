"""Prefix affinity on the CPU: cache hits, balance, TTFT and throughput, affinity on vs off.

The fleet runs N test-engine workers (the deterministic test engine, not a model) with its simulated
prefix cache: each worker holds `--kv-tokens` of KV (its cache and its admission budget), a decoding
step costs `--step-ms`, and prefill costs `--prefill-ms-per-token` of engine time per prompt token the
cache did not hold (the whole batch waits for it, as on a GPU). Two workloads run at once through
the OpenAI completions route:

- conversations: `--conversations` chats of `--turns` turns, all interleaved; each turn's prompt is the
  last turn's prompt + the reply + a new user message; each chat opens with its own system prompt;
- shared system prompt: `--shared-requests` questions after one long system prompt, `--shared-clients`
  at a time.

Reported: the hit ratio sum(cached_tokens) / sum(prompt_tokens) against what one worker holding all the
fleet's cache would get (the same prompts, in the order the fleet started them, through one simulated
cache of N x kv-tokens), load imbalance (max / mean busy time per worker: the union of its requests'
start..finish intervals), TTFT p50 / p99 (enqueue to first token, the fleet's own timestamps), output
tokens/s over the run, and every text checked. `--kill` SIGKILLs one worker a third of the way in: 0
lost, and the dead worker's own stream is drained by the others.

    python bench/affinity.py --workers 4,8 --out bench/results/.../affinity.json
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_fleet import MODEL, ProcessFleet
from common import keys
from common.prefix_blocks import PrefixCache
from worker.engines.echo import byte_tokenizer

WORDS = ("cache", "prefix", "stream", "worker", "token", "queue", "engine", "block", "batch", "model", "fleet")


@dataclass
class Outcome:
    request_ids: list[str] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)
    wrong: int = 0
    failed: int = 0


def expected(prompt: str, tokens: int) -> str:
    return (prompt * (tokens // len(prompt) + 1))[:tokens]


def text_of(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def complete(http: aiohttp.ClientSession, base: str, prompt: str, max_tokens: int, out: Outcome) -> str:
    """One completion; its text ("" when it failed). Retries a 429 (the queue was full) after Retry-After."""
    while True:
        try:
            async with http.post(f"{base}/v1/completions", json={
                    "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}) as response:
                body = await response.json()
                if response.status == 429:
                    await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                    continue
        except (TimeoutError, aiohttp.ClientError):
            out.failed += 1
            return ""
        if response.status != 200:
            out.failed += 1
            return ""
        request_id = body["id"].removeprefix("cmpl-")
        out.request_ids.append(request_id)
        out.prompts[request_id] = prompt
        out.usage[request_id] = body["usage"]
        text = body["choices"][0]["text"]
        out.wrong += text != expected(prompt, max_tokens)
        return text


async def conversation(http: aiohttp.ClientSession, base: str, args: argparse.Namespace, index: int,
                       out: Outcome) -> None:
    rng = random.Random(index)
    prompt = f"system: you are assistant number {index}. " + text_of(rng, args.system_words) + "\n"
    await asyncio.sleep(rng.uniform(0, 2.0))  # the conversations start spread out, as users do
    for turn in range(args.turns):
        prompt += f"user: turn {turn}, " + text_of(rng, args.user_words) + "\nassistant: "
        reply = await complete(http, base, prompt, args.max_tokens, out)
        prompt += reply + "\n"
        await asyncio.sleep(rng.uniform(0.0, 0.3))  # the user reads, then types


async def shared_prompt(http: aiohttp.ClientSession, base: str, args: argparse.Namespace, queue: asyncio.Queue,
                        out: Outcome) -> None:
    system = "system: one long system prompt that every request of this product shares. " + \
        text_of(random.Random(-1), args.shared_system_words) + "\n"
    while not queue.empty():
        i = queue.get_nowait()
        await complete(http, base, system + f"user: question {i}, " + text_of(random.Random(1000 + i), 12)
                       + "\nassistant: ", args.max_tokens, out)


def ideal_hit_ratio(started: list[tuple[float, str]], prompts: dict[str, str], capacity_tokens: int,
                    block_size: int) -> float:
    """One worker with all the fleet's cache, fed the same prompts in the order they started."""
    tokenizer = byte_tokenizer()
    cache = PrefixCache(block_size, capacity_tokens // block_size)
    cached = total = 0
    for _, request_id in sorted(started):
        ids = tokenizer.encode(prompts[request_id]).ids
        cached += cache.lookup_and_store(ids)
        total += len(ids)
    return cached / total


def busy_time(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


async def run(args: argparse.Namespace, workers: int, affinity: bool, kill: bool) -> dict[str, Any]:
    fleet = ProcessFleet(workers, {
        "max_model_len": 8192, "max_num_seqs": args.seqs, "kv_cache_tokens": args.kv_tokens,
        "step_delay_ms": args.step_ms, "prefix_block_size": args.block_size,
        "prefill_ms_per_token": args.prefill_ms_per_token},
        gateway_env={"LLM_FLEET_MAX_OUTSTANDING": "10000", "LLM_FLEET_PREFIX_AFFINITY": "1" if affinity else "0",
                     "LLM_FLEET_AFFINITY_QUEUE_BATCHES": str(args.queue_batches)},
        worker_env={"LLM_FLEET_FLUSH_INTERVAL_MS": "50", "LLM_FLEET_HEARTBEAT_TTL_S": "3",
                    "LLM_FLEET_RECLAIM_INTERVAL_S": "1"})
    fleet.start()
    out = Outcome()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=300)) as http:
            await fleet.wait_ready(http)
            await asyncio.sleep(1.5)  # every gateway view of the workers (refreshed each second) has them all
            questions: asyncio.Queue[int] = asyncio.Queue()
            for i in range(args.shared_requests):
                questions.put_nowait(i)
            started = time.monotonic()
            tasks = [asyncio.create_task(conversation(http, fleet.base, args, i, out))
                     for i in range(args.conversations)]
            tasks += [asyncio.create_task(shared_prompt(http, fleet.base, args, questions, out))
                      for _ in range(args.shared_clients)]
            victim = fleet.workers[0]
            if kill:
                await asyncio.sleep(args.kill_after_s)
                victim.send_signal(signal.SIGKILL)
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - started
        redis = aioredis.from_url(fleet.valkey.url)
        async with redis.pipeline(transaction=False) as pipe:
            for request_id in out.request_ids:
                pipe.hmget(keys.request(request_id), ["worker", "started_at", "finished_at", "created_at",
                                                      "first_token_at"])
            rows = await pipe.execute()
        victim_stream = keys.job_stream(MODEL, "worker-0")
        victim_left = await redis.xlen(victim_stream) if kill else None
        await redis.aclose()
    finally:
        fleet.stop()

    per_worker: dict[str, list[tuple[float, float]]] = {}
    ttft, started_at = [], []
    for request_id, (worker, start, finish, created, first) in zip(out.request_ids, rows, strict=True):
        per_worker.setdefault(worker.decode(), []).append((float(start), float(finish)))
        ttft.append(float(first) - float(created))
        started_at.append((float(start), request_id))
    busy = {worker: busy_time(intervals) for worker, intervals in per_worker.items()}
    prompt_tokens = sum(u["prompt_tokens"] for u in out.usage.values())
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in out.usage.values())
    ideal = ideal_hit_ratio(started_at, out.prompts, workers * args.kv_tokens, args.block_size)
    live_busy = [b for w, b in busy.items() if not (kill and w == "worker-0")]
    served = [len(v) for w, v in per_worker.items() if not (kill and w == "worker-0")]
    ttft.sort()
    return {
        "workers": workers, "affinity": affinity, "killed_one": kill, "requests": len(out.request_ids),
        "expected_requests": args.conversations * args.turns + args.shared_requests,
        "wrong_text": out.wrong, "failed": out.failed, "hit_ratio": cached / prompt_tokens,
        "ideal_hit_ratio": ideal, "hit_vs_ideal": cached / prompt_tokens / ideal,
        "imbalance": max(live_busy) / statistics.mean(live_busy), "busy_s": busy,
        "requests_imbalance": max(served) / statistics.mean(served),
        "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))],
        "output_tok_s": len(out.request_ids) * args.max_tokens / elapsed, "elapsed_s": elapsed,
        "victim_stream_left": victim_left,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="4,8")
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-words", type=int, default=60)
    parser.add_argument("--user-words", type=int, default=10)
    parser.add_argument("--shared-requests", type=int, default=400)
    parser.add_argument("--shared-clients", type=int, default=16)
    parser.add_argument("--shared-system-words", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seqs", type=int, default=8, help="test engine: sequences per worker")
    parser.add_argument("--kv-tokens", type=int, default=24576, help="test engine: KV (and cache) per worker")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.05)
    parser.add_argument("--kill-after-s", type=float, default=5.0)
    parser.add_argument("--queue-batches", type=float, default=1.0,
                        help="the gateways' affinity_queue_batches: how much an engine's own stream may hold")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    runs = []
    for workers in (int(n) for n in args.workers.split(",")):
        for affinity in (False, True):
            runs.append(asyncio.run(run(args, workers, affinity, kill=False)))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "busy_s"}), file=sys.stderr)
    runs.append(asyncio.run(run(args, int(args.workers.split(",")[0]), True, kill=True)))

    print(f"\nprefix affinity, test engine: {args.seqs} seqs and {args.kv_tokens} KV tokens per worker, "
          f"{args.step_ms:g} ms/step, prefill {args.prefill_ms_per_token:g} ms per uncached token; "
          f"{args.conversations} conversations x {args.turns} turns + {args.shared_requests} shared-system-prompt "
          f"requests ({args.shared_clients} at a time), {args.max_tokens} tokens out each; "
          f"affinity_queue_batches {args.queue_batches:g}")
    print("| workers | affinity | SIGKILL | requests | hit ratio | one-worker ideal | vs ideal | imbalance "
          "(max/mean busy) | max/mean requests | TTFT p50 ms | TTFT p99 ms | output tok/s | wrong | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['workers']} | {'on' if r['affinity'] else 'off'} | {'one worker' if r['killed_one'] else '-'} | "
              f"{r['requests']}/{r['expected_requests']} | {r['hit_ratio']:.3f} | {r['ideal_hit_ratio']:.3f} | "
              f"{r['hit_vs_ideal']:.2f} | {r['imbalance']:.2f} | {r['requests_imbalance']:.2f} | "
              f"{r['ttft_p50_s'] * 1000:.0f} | "
              f"{r['ttft_p99_s'] * 1000:.0f} | {r['output_tok_s']:.0f} | {r['wrong_text']} | {r['failed']} |")
    killed = runs[-1]
    print(f"\nSIGKILL run: the dead worker's own stream holds {killed['victim_stream_left']} entries at the end "
          f"(its jobs were continued by the others)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"runs": runs, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
