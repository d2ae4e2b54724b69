"""Priority classes on the CPU, test engine: does a batch stay out of interactive users' way, and does it
still use the fleet when nobody else does?

One test-engine worker (`--max-seqs` slots, `--step-ms` per decoding step, whatever the batch size) behind
one gateway, each its own process (bench/local_fleet.py). Four measurements, each on the same fleet:

- idle: `--probes` interactive streamed completions (`--probe-clients` at a time), TTFT measured by the
  client (request sent to first text event);
- fleet: the batch's `--lines` requests sent as interactive completions by `--clients` concurrent clients:
  the fleet's output tokens/s on this shape;
- batch alone: the same lines as one batch through the Batch API (upload, create, poll until completed):
  output tokens/s from creation to completion, as a share of the fleet's;
- batch + interactive: a second batch of the same lines, and once its lines fill the worker's slots the same
  interactive probes again: their TTFT against idle's.

`--vllm MODEL_DIR` runs one vLLM worker instead (`llm-fleet up`, model `smollm2-135m` from that directory,
dummy weights unless `--real-weights`), on the GPU machine after bench/gpu_setup.sh.

    python bench/batch_priority.py --out bench/results/<dir>/batch-priority.json
    python bench/batch_priority.py --vllm /tmp/models/smollm2-135m --max-seqs 256 --lines 20000 --out ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_fleet import MODEL, ProcessFleet, wait_ready
from common import keys
from common.embedded_redis import EmbeddedValkey, free_port
from common.fleet import interrupt


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@dataclass
class Probe:
    """One interactive streamed completion, in wall-clock seconds (the fleet's own times are wall-clock too)."""

    request_id: str
    sent: float
    first_text: float
    last_text: float
    texts: int  # SSE events with text

    @property
    def ttft(self) -> float:
        return self.first_text - self.sent


async def probe(http: aiohttp.ClientSession, base: str, index: int, args: argparse.Namespace) -> Probe:
    sent = time.time()
    async with http.post(f"{base}/v1/completions", json={
            "model": args.model, "prompt": f"interactive probe {index} ", "max_tokens": args.probe_tokens,
            "ignore_eos": True, "stream": True}) as response:
        assert response.status == 200, await response.text()
        first = last = None
        texts = 0
        async for line in response.content:
            if line.startswith(b"data: {") and b'"text": ""' not in line:
                last = time.time()
                first = first or last
                texts += 1
        assert first is not None and last is not None
        return Probe(response.headers.get("X-Request-Id", ""), sent, first, last, texts)  # vllm serve: none


async def probes(http: aiohttp.ClientSession, base: str, args: argparse.Namespace) -> list[Probe]:
    queue = list(range(args.probes))
    ttfts: list[Probe] = []

    gaps = random.Random(7)

    async def client() -> None:
        while queue:
            ttfts.append(await probe(http, base, queue.pop(), args))
            # A random pause: a fixed one would send every probe at the same phase of the engine's step clock
            # (a probe ends with a step), and a batched engine admits a newcomer at its next step.
            await asyncio.sleep(gaps.uniform(0.5, 1.5) * args.probe_gap_s)

    await asyncio.gather(*(client() for _ in range(args.probe_clients)))
    return ttfts


async def breakdown(redis_url: str, measured: list[Probe]) -> dict[str, Any]:
    """Where a probe's time to first text went (medians, ms), from the request's own record: the client to the
    gateway's enqueue (`created_at`), waiting for a worker (`started_at`), the worker's start to its first
    stored output (`first_token_at`: engine, output handling, the flush), and on to the client (pub/sub,
    relay, SSE); and the time per token once streaming (the engine's step with the batch beside it)."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for p in measured:
                pipe.hmget(keys.request(p.request_id), "created_at", "started_at", "first_token_at")
            records = await pipe.execute()
    finally:
        await redis.aclose()
    parts: dict[str, list[float]] = {"client to enqueued": [], "queued": [], "started to first output stored": [],
                                     "stored to client": [], "per token after the first": []}
    slowest: list[tuple[float, list[float]]] = []
    for p, record in zip(measured, records, strict=True):
        if None in record:
            continue
        created, started, first_out = (float(x) for x in record)
        spans = [created - p.sent, started - created, first_out - started, p.first_text - first_out]
        for name, span in zip(parts, spans, strict=False):
            parts[name].append(span)
        slowest.append((p.ttft, spans))
        if p.texts > 1:
            parts["per token after the first"].append((p.last_text - p.first_text) / (p.texts - 1))
    result: dict[str, Any] = {name: round(statistics.median(values) * 1000, 2) if values else None
                              for name, values in parts.items()}
    # The slowest probes' own spans (ms, in the order above), to tell a tail's cause from the medians'.
    result["slowest"] = [[round(x * 1000, 1) for x in spans] for _, spans in sorted(slowest, reverse=True)[:3]]
    return result


def profile_workers(base: str, seconds: float, out_dir: Path, tag: str) -> list[subprocess.Popen]:
    """py-spy (collapsed stacks, idle included) of every worker process the fleet lists, for `seconds`."""
    with urllib.request.urlopen(f"{base}/v1/fleet") as response:
        workers = json.load(response)["workers"]
    out_dir.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(["py-spy", "record", "--pid", str(w["pid"]), "--duration", str(int(seconds)),
                              "--rate", "200", "--format", "raw", "--idle", "--nonblocking",
                              "--output", str(out_dir / f"{tag}-worker-{i}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i, w in enumerate(workers)]


def lines(args: argparse.Namespace, tag: str) -> list[dict[str, Any]]:
    return [{"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": args.model, "prompt": f"{tag} line {i} ", "max_tokens": args.tokens, "ignore_eos": True}}
            for i in range(args.lines)]


async def interactive_throughput(http: aiohttp.ClientSession, base: str, args: argparse.Namespace) -> float:
    bodies = [line["body"] for line in lines(args, "fleet")]
    started = time.perf_counter()

    async def client() -> None:
        while bodies:
            body = bodies.pop()
            while True:
                async with http.post(f"{base}/v1/completions", json=body) as response:
                    if response.status == 429:
                        await asyncio.sleep(0.05)
                        continue
                    assert response.status == 200, await response.text()
                    await response.read()
                    break

    await asyncio.gather(*(client() for _ in range(args.clients)))
    return args.lines * args.tokens / (time.perf_counter() - started)


async def submit_batch(http: aiohttp.ClientSession, base: str, args: argparse.Namespace, tag: str) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b"".join(json.dumps(x).encode() + b"\n" for x in lines(args, tag)),
                   filename=f"{tag}.jsonl")
    async with http.post(f"{base}/v1/files", data=form) as response:
        uploaded = await response.json()
    async with http.post(f"{base}/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions",
                                                     "completion_window": "24h"}) as response:
        return (await response.json())["id"]


async def batch_state(http: aiohttp.ClientSession, base: str, batch_id: str) -> dict[str, Any]:
    async with http.get(f"{base}/v1/batches/{batch_id}") as response:
        return await response.json()


async def wait_batch(http: aiohttp.ClientSession, base: str, batch_id: str) -> dict[str, Any]:
    while True:
        state = await batch_state(http, base, batch_id)
        if state["status"] in ("completed", "failed", "cancelled"):
            return state
        await asyncio.sleep(0.1)


class VllmFleet:
    """`llm-fleet up` with one vLLM worker of `args.model` on its own Valkey."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.valkey = EmbeddedValkey()
        self.valkey.start()
        self.base = f"http://127.0.0.1:{(port := free_port())}"
        catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
        options = {"load_format": "auto" if args.real_weights else "dummy", "max_num_seqs": args.max_seqs}
        if args.tokenizer:
            options["tokenizer"] = args.tokenizer
        catalogue.write_text(json.dumps({args.model: {"engine": "vllm", "source": args.vllm, "options": options,
                                                      "frontends": args.frontends}}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "up", "--redis-url", self.valkey.url, "--port", str(port),
             "--worker-http-port", "0", "--model", args.model, "--catalogue", str(catalogue)],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=open(args.fleet_log, "w"))

    async def wait_ready(self, http: aiohttp.ClientSession) -> None:
        await wait_ready(self.base, 900)

    def stop(self) -> None:
        interrupt(self.process, 90)
        self.valkey.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {"LLM_FLEET_MAX_OUTSTANDING": "100000", "LLM_FLEET_MAX_OUTSTANDING_BATCH": "100000",
           "LLM_FLEET_BATCH_WINDOW": str(args.window)}
    worker_env = {} if args.batch_share is None else {"LLM_FLEET_BATCH_SHARE_WITH_INTERACTIVE": str(args.batch_share)}
    fleet: ProcessFleet | VllmFleet
    if args.vllm:
        fleet = VllmFleet(args, {**env, **worker_env})
    else:
        fleet = ProcessFleet(1, {"max_model_len": 4096, "max_num_seqs": args.max_seqs, "kv_cache_tokens": 1 << 20,
                                 "step_delay_ms": args.step_ms, "decode_ms_per_seq": args.ms_per_seq},
                             gateway_env=env, worker_env=worker_env)
        fleet.start()
    result: dict[str, Any] = {"args": vars(args)}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            await fleet.wait_ready(http)
            base = fleet.base
            idle = await probes(http, base, args)
            result["idle_breakdown_ms"] = await breakdown(fleet.valkey.url, idle)
            if not args.skip_throughput:
                fleet_tps = await interactive_throughput(http, base, args)
                await asyncio.sleep(1.5)  # interactive work counts as served a second after it ends (the share)
                batch_id = await submit_batch(http, base, args, "alone")
                started = time.perf_counter()
                alone = await wait_batch(http, base, batch_id)
                batch_tps = args.lines * args.tokens / (time.perf_counter() - started)
                assert alone["request_counts"]["completed"] == args.lines, alone
                result.update(fleet_tokens_per_s=fleet_tps, batch_tokens_per_s=batch_tps,
                              batch_share_of_fleet=batch_tps / fleet_tps)

            batch_id = await submit_batch(http, base, args, "busy")
            while True:  # until its lines fill the worker's slots
                if (await batch_state(http, base, batch_id))["request_counts"]["completed"] >= args.max_seqs:
                    break
                await asyncio.sleep(0.05)
            profilers = profile_workers(base, args.profile_s, args.out.parent / "profiles", args.out.stem) \
                if args.profile_s and args.out else []
            busy = await probes(http, base, args)
            for profiler in profilers:
                profiler.wait()
            result["busy_breakdown_ms"] = await breakdown(fleet.valkey.url, busy)
            during = await batch_state(http, base, batch_id)
            busy_batch = await wait_batch(http, base, batch_id)
            assert busy_batch["request_counts"]["completed"] == args.lines, busy_batch
            assert during["status"] == "in_progress", "the batch ended before the probes did: use more lines"
    finally:
        fleet.stop()
    idle_s, busy_s = [p.ttft for p in idle], [p.ttft for p in busy]
    result.update({
        "idle_ttft_ms": {"p50": percentile(idle_s, 50) * 1000, "p99": percentile(idle_s, 99) * 1000,
                         "mean": statistics.mean(idle_s) * 1000},
        "busy_ttft_ms": {"p50": percentile(busy_s, 50) * 1000, "p99": percentile(busy_s, 99) * 1000,
                         "mean": statistics.mean(busy_s) * 1000},
        "ttft_p50_busy_over_idle": percentile(busy_s, 50) / percentile(idle_s, 50),
        "busy_ttfts_ms_in_order": [round(p.ttft * 1000, 1) for p in sorted(busy, key=lambda p: p.sent)],
        "batch_lines_done_during_probes": during["request_counts"]["completed"],
    })
    return result


def table(result: dict[str, Any]) -> str:
    rows = [
        "| measurement | value |", "|---|---|",
        f"| interactive TTFT idle p50 / p99 ms | {result['idle_ttft_ms']['p50']:.1f} / "
        f"{result['idle_ttft_ms']['p99']:.1f} |",
        f"| interactive TTFT during a batch p50 / p99 ms | {result['busy_ttft_ms']['p50']:.1f} / "
        f"{result['busy_ttft_ms']['p99']:.1f} |",
        f"| TTFT p50 during / idle | {result['ttft_p50_busy_over_idle']:.2f} |",
    ]
    for part in [name for name in result["idle_breakdown_ms"] if name != "slowest"]:
        rows.append(f"| {part}, p50 ms: idle / during | {result['idle_breakdown_ms'][part]} / "
                    f"{result['busy_breakdown_ms'][part]} |")
    if "fleet_tokens_per_s" in result:
        rows += [f"| fleet output tok/s, the lines as interactive requests | {result['fleet_tokens_per_s']:,.0f} |",
                 f"| batch alone output tok/s | {result['batch_tokens_per_s']:,.0f} |",
                 f"| batch share of the fleet's throughput | {result['batch_share_of_fleet']:.2f} |"]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per line")
    parser.add_argument("--max-seqs", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--ms-per-seq", type=float, default=0.0,
                        help="the test engine's step grows this much per running sequence (a batched GPU's does)")
    parser.add_argument("--window", type=int, default=1024, help="the gateway's batch_window")
    parser.add_argument("--clients", type=int, default=128, help="interactive clients for the fleet's throughput")
    parser.add_argument("--probes", type=int, default=60)
    parser.add_argument("--probe-clients", type=int, default=2)
    parser.add_argument("--probe-tokens", type=int, default=16)
    parser.add_argument("--probe-gap-s", type=float, default=0.05)
    parser.add_argument("--vllm", help="a vLLM worker of the model in this directory, instead of the test engine")
    parser.add_argument("--real-weights", action="store_true", help="with --vllm: load the weights (else dummy)")
    parser.add_argument("--tokenizer", help="with --vllm: a tokenizer directory, for a model without one")
    parser.add_argument("--fleet-log", default=os.devnull, help="with --vllm: the fleet's log")
    parser.add_argument("--frontends", type=int, default=1, help="with --vllm: the catalogue entry's front-ends")
    parser.add_argument("--batch-share", type=float, help="the workers' batch_share_with_interactive")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="only the probes, idle and during a batch (not the fleet's and the batch's tok/s)")
    parser.add_argument("--profile-s", type=float, default=0,
                        help="py-spy the worker processes this long while the probes run during the batch (with --out)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.model = Path(args.vllm).name if args.vllm else MODEL
    result = asyncio.run(run(args))
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["table"] = table(result)
    print(result["table"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
