"""Chaos during a batch: is every line in exactly one of the output or error files while parts die?

`llm-fleet up --workers N` on its own Valkey (AOF on), test engine; one batch of `--lines` completions
(each prompt echoed whole: its text is known) through the Batch API, and meanwhile bench/chaos.py's
agent: a random worker SIGKILLed every `--kill-every` s (the supervisor restarts it), the gateway
SIGKILLed once (a third of the way in; its batch runner's lease lapses and the restarted gateway carries
the batch on) and Valkey restarted once (two thirds in). Every client call retries through the outages.
Checked at the end: each custom_id in exactly one file, once; every output's text exact.

    python bench/batch_chaos.py --out bench/results/<dir>/batch-chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.chaos import RETRYABLE, Chaos, start_fleet
from bench.local_fleet import wait_ready
from common.embedded_redis import EmbeddedValkey, free_port
from common.fleet import interrupt


def prompt(i: int) -> str:
    return f"batch line {i} under chaos "


async def call(http: aiohttp.ClientSession, method: str, url: str, deadline: float, **kwargs: Any) -> Any:
    """The call's JSON (or bytes, for file content), retried through outages until `deadline`."""
    while time.monotonic() < deadline:
        try:
            async with http.request(method, url, **kwargs) as response:
                if response.status == 200:
                    return await (response.read() if url.endswith("/content") else response.json())
                if response.status < 500:
                    raise RuntimeError(f"{method} {url}: {response.status} {await response.text()}")
        except RETRYABLE:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{method} {url} never answered")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    valkey = EmbeddedValkey()
    valkey.start()
    port = free_port()
    args.model, args.cpu_threads, args.requests = "test-echo", 0, 100_000
    fleet = await asyncio.to_thread(start_fleet, args, valkey.url, port)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, 300)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            deadline = time.monotonic() + args.deadline_s
            lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                      "body": {"model": "test-echo", "prompt": prompt(i), "max_tokens": len(prompt(i))}}
                     for i in range(args.lines)]
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", b"".join(json.dumps(x).encode() + b"\n" for x in lines), filename="chaos.jsonl")
            uploaded = await call(http, "POST", f"{base}/v1/files", deadline, data=form)
            batch = await call(http, "POST", f"{base}/v1/batches", deadline, json={
                "input_file_id": uploaded["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
            started = time.monotonic()
            agent = Chaos(fleet, valkey, args.kill_every, args.chaos_s, set(args.faults.split(",")), base,
                          "test-echo")
            chaos = asyncio.create_task(agent.run())
            while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                await asyncio.sleep(0.5)
                batch = await call(http, "GET", f"{base}/v1/batches/{batch['id']}", deadline)
            wall = time.monotonic() - started
            await chaos
            files = {}
            for name in ("output_file_id", "error_file_id"):
                raw = b"" if batch[name] is None else await call(
                    http, "GET", f"{base}/v1/files/{batch[name]}/content", deadline)
                files[name] = [json.loads(line) for line in raw.splitlines()]
    finally:
        interrupt(fleet, 90)
        valkey.stop()
    seen = Counter(line["custom_id"] for lines_ in files.values() for line in lines_)
    expected = {f"line-{i}" for i in range(args.lines)}
    wrong = sum(1 for line in files["output_file_id"]
                if line["response"]["body"]["choices"][0]["text"] != prompt(int(line["custom_id"].split("-")[1])))
    return {"lines": args.lines, "status": batch["status"], "request_counts": batch["request_counts"],
            "outputs": len(files["output_file_id"]), "errors": len(files["error_file_id"]),
            "lost": len(expected - set(seen)), "duplicated": sum(n - 1 for n in seen.values() if n > 1),
            "unknown": len(set(seen) - expected), "wrong_text": wrong, "wall_s": round(wall, 1),
            "events": agent.events, "error_samples": files["error_file_id"][:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--chaos-s", type=float, default=20.0)
    parser.add_argument("--faults", default="workers,gateway,redis")
    parser.add_argument("--deadline-s", type=float, default=600.0)
    parser.add_argument("--fleet-log", default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print("| lines | status | outputs | errors | lost | duplicated | wrong text | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {result['lines']} | {result['status']} | {result['outputs']} | {result['errors']} | {result['lost']} | "
          f"{result['duplicated']} | {result['wrong_text']} | {result['wall_s']} |")
    for event in result["events"]:
        print("  ", event)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
