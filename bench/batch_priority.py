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
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.local_fleet import MODEL, ProcessFleet, wait_ready
from common.embedded_redis import EmbeddedValkey, free_port
from common.fleet import interrupt


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def probe(http: aiohttp.ClientSession, base: str, index: int, args: argparse.Namespace) -> float:
    """One interactive streamed completion; seconds to its first text."""
    started = time.perf_counter()
    async with http.post(f"{base}/v1/completions", json={
            "model": args.model, "prompt": f"interactive probe {index} ", "max_tokens": args.probe_tokens,
            "ignore_eos": True, "stream": True}) as response:
        assert response.status == 200, await response.text()
        first = None
        async for line in response.content:
            if first is None and line.startswith(b"data: {") and b'"text": ""' not in line:
                first = time.perf_counter() - started
        assert first is not None
        return first


async def probes(http: aiohttp.ClientSession, base: str, args: argparse.Namespace) -> list[float]:
    queue = list(range(args.probes))
    ttfts: list[float] = []

    gaps = random.Random(7)

    async def client() -> None:
        while queue:
            ttfts.append(await probe(http, base, queue.pop(), args))
            # A random pause: a fixed one would send every probe at the same phase of the engine's step clock
            # (a probe ends with a step), and a batched engine admits a newcomer at its next step.
            await asyncio.sleep(gaps.uniform(0.5, 1.5) * args.probe_gap_s)

    await asyncio.gather(*(client() for _ in range(args.probe_clients)))
    return ttfts


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
        catalogue.write_text(json.dumps({args.model: {"engine": "vllm", "source": args.vllm, "options": {
            "load_format": "auto" if args.real_weights else "dummy", "max_num_seqs": args.max_seqs}}}))
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
    fleet: ProcessFleet | VllmFleet
    if args.vllm:
        fleet = VllmFleet(args, env)
    else:
        fleet = ProcessFleet(1, {"max_model_len": 4096, "max_num_seqs": args.max_seqs, "kv_cache_tokens": 1 << 20,
                                 "step_delay_ms": args.step_ms}, gateway_env=env)
        fleet.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            await fleet.wait_ready(http)
            base = fleet.base
            idle = await probes(http, base, args)
            fleet_tps = await interactive_throughput(http, base, args)

            batch_id = await submit_batch(http, base, args, "alone")
            started = time.perf_counter()
            alone = await wait_batch(http, base, batch_id)
            batch_tps = args.lines * args.tokens / (time.perf_counter() - started)
            assert alone["request_counts"]["completed"] == args.lines, alone

            batch_id = await submit_batch(http, base, args, "busy")
            while True:  # until its lines fill the worker's slots
                if (await batch_state(http, base, batch_id))["request_counts"]["completed"] >= args.max_seqs:
                    break
                await asyncio.sleep(0.05)
            busy = await probes(http, base, args)
            during = await batch_state(http, base, batch_id)
            busy_batch = await wait_batch(http, base, batch_id)
            assert busy_batch["request_counts"]["completed"] == args.lines, busy_batch
            assert during["status"] == "in_progress", "the batch ended before the probes did: use more lines"
    finally:
        fleet.stop()
    return {
        "args": vars(args),
        "idle_ttft_ms": {"p50": percentile(idle, 50) * 1000, "p99": percentile(idle, 99) * 1000,
                         "mean": statistics.mean(idle) * 1000},
        "busy_ttft_ms": {"p50": percentile(busy, 50) * 1000, "p99": percentile(busy, 99) * 1000,
                         "mean": statistics.mean(busy) * 1000},
        "fleet_tokens_per_s": fleet_tps, "batch_tokens_per_s": batch_tps,
        "batch_share_of_fleet": batch_tps / fleet_tps,
        "ttft_p50_busy_over_idle": percentile(busy, 50) / percentile(idle, 50),
        "batch_lines_done_during_probes": during["request_counts"]["completed"],
    }


def table(result: dict[str, Any]) -> str:
    return "\n".join([
        "| measurement | value |", "|---|---|",
        f"| interactive TTFT idle p50 / p99 ms | {result['idle_ttft_ms']['p50']:.1f} / "
        f"{result['idle_ttft_ms']['p99']:.1f} |",
        f"| interactive TTFT during a batch p50 / p99 ms | {result['busy_ttft_ms']['p50']:.1f} / "
        f"{result['busy_ttft_ms']['p99']:.1f} |",
        f"| TTFT p50 during / idle | {result['ttft_p50_busy_over_idle']:.2f} |",
        f"| fleet output tok/s, the lines as interactive requests | {result['fleet_tokens_per_s']:,.0f} |",
        f"| batch alone output tok/s | {result['batch_tokens_per_s']:,.0f} |",
        f"| batch share of the fleet's throughput | {result['batch_share_of_fleet']:.2f} |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per line")
    parser.add_argument("--max-seqs", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=1024, help="the gateway's batch_window")
    parser.add_argument("--clients", type=int, default=128, help="interactive clients for the fleet's throughput")
    parser.add_argument("--probes", type=int, default=60)
    parser.add_argument("--probe-clients", type=int, default=2)
    parser.add_argument("--probe-tokens", type=int, default=16)
    parser.add_argument("--probe-gap-s", type=float, default=0.05)
    parser.add_argument("--vllm", help="a vLLM worker of the model in this directory, instead of the test engine")
    parser.add_argument("--real-weights", action="store_true", help="with --vllm: load the weights (else dummy)")
    parser.add_argument("--fleet-log", default=os.devnull, help="with --vllm: the fleet's log")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.model = "smollm2-135m" if args.vllm else MODEL
    result = asyncio.run(run(args))
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    result["table"] = table(result)
    print(result["table"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
