"""Smooth streams on the CPU: does each token reach a client as the engine makes it, and does the
fleet keep up with the engine when many stream at once?

`llm-fleet up` with the deterministic test engine (5 ms per decoding step, every running request gets
a token per step), clients on WebSocket, one socket each. Per flush setting (the default, 0: flush
when the previous flush is done; and a fixed interval, the old default, to compare):
- a lone stream: the gap between chunks as the client sees them (median, p99, in engine steps) and
  how many tokens a chunk holds;
- N concurrent streams (default 64): tokens/s all clients together received, against the engine's
  rate (N tokens per step), and the gaps each of them saw.

Run: .venv/bin/python bench/streams.py [--step-ms 5] [--streams 64] [--flush-intervals 0 15] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from vllm_vs_fleet import FLEET_CLI, server

MODEL = "test-echo"


async def one_stream(http: aiohttp.ClientSession, ws_url: str, tokens: int) -> dict:
    """One WebSocket request; when each chunk came and how many tokens it held."""
    arrivals: list[tuple[float, int]] = []
    async with http.ws_connect(ws_url) as ws:
        started = time.perf_counter()
        await ws.send_json({"model": MODEL, "prompt": "abcdefghijklmnopqrstuvwxyz", "max_tokens": tokens,
                            "ignore_eos": True})
        async for message in ws:
            body = json.loads(message.data)
            if body["type"] == "chunk":
                arrivals.append((time.perf_counter(), len(body["text"])))  # the test engine: 1 byte = 1 token
            elif body["type"] in ("done", "error"):
                break
    return {"started": started, "arrivals": arrivals}


def gaps_ms(streams: list[dict]) -> list[float]:
    return [1000 * (b[0] - a[0]) for s in streams for a, b in zip(s["arrivals"], s["arrivals"][1:], strict=False)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run_load(url: str, streams: int, tokens: int) -> dict:
    ws_url = url.replace("http", "ws", 1) + "/ws/generate"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, ws_url, tokens) for _ in range(streams)))
        wall = time.perf_counter() - started
    received = sum(n for s in results for _, n in s["arrivals"])
    first = [s["arrivals"][0][0] - s["started"] for s in results if s["arrivals"]]
    chunks = sum(len(s["arrivals"]) for s in results)
    gaps = gaps_ms(results)
    return {"streams": streams, "tokens": received, "wall_s": wall, "tokens_per_s": received / wall,
            "ttft_p50_ms": 1000 * statistics.median(first), "tokens_per_chunk": received / max(chunks, 1),
            "gap_p50_ms": percentile(gaps, 0.5), "gap_p99_ms": percentile(gaps, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=400, help="per stream")
    parser.add_argument("--flush-intervals", type=float, nargs="+", default=[0, 15])
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()
    catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
    catalogue.write_text(json.dumps({MODEL: {"engine": "test", "options": {
        "max_model_len": 8192, "max_num_seqs": 1024, "kv_cache_tokens": 10**7, "step_delay_ms": args.step_ms}}}))
    print(f"test engine at {args.step_ms:g} ms/step; {args.tokens} tokens per stream; WebSocket; "
          f"{os.cpu_count()} CPUs\n")
    print("| flush interval ms | streams | tokens/s | of the engine's rate | tokens per chunk | "
          "chunk gap p50 ms (steps) | gap p99 ms | TTFT p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for interval in args.flush_intervals:
        port = 8400
        env = {**os.environ, "LLM_FLEET_FLUSH_INTERVAL_MS": str(interval), "LLM_FLEET_MAX_OUTSTANDING": "100000"}
        argv = [*FLEET_CLI, "up", "--port", str(port), "--worker-http-port", "0", "--model", MODEL,
                "--catalogue", str(catalogue)]
        with server(argv, f"http://127.0.0.1:{port}/ready", Path(tempfile.mktemp(suffix=".log")), env, 60,
                    ready=lambda body: bool(json.loads(body).get("models"))):
            url = f"http://127.0.0.1:{port}"
            asyncio.run(run_load(url, 4, 50))  # warm-up
            for streams in (1, args.streams):
                result = {"flush_interval_ms": interval, **asyncio.run(run_load(url, streams, args.tokens))}
                rate = streams * 1000 / args.step_ms
                result["of_engine_rate"] = result["tokens_per_s"] / rate
                rows.append(result)
                print(f"| {interval:g} | {streams} | {result['tokens_per_s']:,.0f} | {result['of_engine_rate']:.0%} | "
                      f"{result['tokens_per_chunk']:.2f} | {result['gap_p50_ms']:.1f} "
                      f"({result['gap_p50_ms'] / args.step_ms:.2f}) | {result['gap_p99_ms']:.1f} | "
                      f"{result['ttft_p50_ms']:.0f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"step_ms": args.step_ms, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
