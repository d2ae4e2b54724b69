"""The engine's own floor for interactive TTFT beside a batch: `vllm serve` alone, no fleet, measured the
way bench/batch_priority.py measures the fleet. Streamed probes (same prompts, pauses and clients), first
with the server idle, then beside N other requests of 64 tokens each, sent back to back without streaming
by a separate client process (a batch: nobody streams it), for each N of `--loads`.

If a lone request's first token comes 1.3x later beside 64 others on vLLM itself, a fleet that keeps a
batch to 64 sequences beside interactive work cannot do better than that on this engine.

    python bench/beside_load.py --model-dir /tmp/models/smollm2-135m --loads 64,256 --out DIR/beside-load.json
(on the GPU machine after bench/gpu_setup.sh; `--base-url` measures a server already running instead, and
`--fleet` the fleet, `llm-fleet up` with one vLLM worker of the same model, the load interactive like the
probes: the same comparison as vllm serve's, request for request)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.batch_priority import VllmFleet, percentile, probes
from bench.local_fleet import wait_ready
from bench.vllm_vs_fleet import VLLM_CLI, log, server


async def load(base_url: str, model: str, streams: int, tokens: int) -> None:
    """`streams` clients, each sending one non-streamed completion after another, until killed."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def client(index: int) -> None:
            sent = 0
            while True:
                body = {"model": model, "prompt": f"batch line {index}.{sent} ", "max_tokens": tokens,
                        "ignore_eos": True}
                async with http.post(f"{base_url}/v1/completions", json=body) as response:
                    await response.read()
                sent += 1

        await asyncio.gather(*(client(i) for i in range(streams)))


async def measure(args: argparse.Namespace, base_url: str) -> list[dict[str, Any]]:
    rows = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        for streams in [0, *args.loads]:
            loader = None
            if streams:
                loader = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--load", str(streams), "--base-url", base_url, "--model", args.model,
                    "--load-tokens", str(args.load_tokens))
                await asyncio.sleep(args.settle_s)  # every load stream running
            try:
                measured = await probes(http, base_url, args)
            finally:
                if loader is not None:
                    loader.kill()
                    await loader.wait()
            ttfts = [p.ttft * 1000 for p in measured]
            per_token = [(p.last_text - p.first_text) * 1000 / (p.texts - 1) for p in measured if p.texts > 1]
            rows.append({"beside": streams, "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99),
                         "per_token_p50_ms": statistics.median(per_token)})
            log(f"beside {streams}: {rows[-1]}")
            await asyncio.sleep(1)
    idle = rows[0]["ttft_p50_ms"]
    for row in rows:
        row["over_idle"] = row["ttft_p50_ms"] / idle
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| beside (streams of 64 tokens) | TTFT p50 / p99 ms | over idle (p50) | per token p50 ms |",
             "|---|---|---|---|"]
    lines += [f"| {r['beside']} | {r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['over_idle']:.2f} | "
              f"{r['per_token_p50_ms']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/tmp/models/smollm2-135m")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--base-url", help="a server already running (else `vllm serve` of --model-dir)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--loads", type=lambda text: [int(n) for n in text.split(",")], default=[64, 256])
    parser.add_argument("--load-tokens", type=int, default=64)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--probe-clients", type=int, default=2)
    parser.add_argument("--probe-tokens", type=int, default=16)
    parser.add_argument("--probe-gap-s", type=float, default=0.05)
    parser.add_argument("--fleet", action="store_true", help="measure llm-fleet (one vLLM worker) instead")
    parser.add_argument("--frontends", type=int, default=1,
                        help="the fleet's front-ends (catalogue `frontends`), or vllm serve's --api-server-count")
    parser.add_argument("--fleet-log", default=os.devnull, help="with --fleet: the fleet's log")
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)  # the load process itself
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.load:
        asyncio.run(load(args.base_url, args.model, args.load, args.load_tokens))
        return
    if args.base_url:
        rows = asyncio.run(measure(args, args.base_url))
    elif args.fleet:
        args.vllm, args.max_seqs, args.real_weights = args.model_dir, args.max_num_seqs, True
        fleet = VllmFleet(args, {"LLM_FLEET_MAX_OUTSTANDING": "100000"})
        try:
            asyncio.run(wait_ready(fleet.base, 900))
            rows = asyncio.run(measure(args, fleet.base))
        finally:
            fleet.stop()
    else:
        port = 8100
        argv = [*VLLM_CLI, "serve", args.model_dir, "--served-model-name", args.model, "--port", str(port),
                "--max-num-seqs", str(args.max_num_seqs), "--api-server-count", str(args.frontends)]
        log_path = (args.out.parent if args.out else Path(".")) / "vllm-serve-beside-load.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with server(argv, f"http://127.0.0.1:{port}/v1/models", log_path, dict(os.environ), 600):
            log(f"vllm serve ready in {time.monotonic() - started:.0f}s")
            rows = asyncio.run(measure(args, f"http://127.0.0.1:{port}"))
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "table": table(rows)}, indent=1))


if __name__ == "__main__":
    main()
