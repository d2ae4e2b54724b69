"""`llm-fleet status`: workers, their models and KV use, queues, output tokens/s.

Reads Redis only (no gateway needed). Two looks `--interval` apart give each worker's tokens/s
(from the cumulative count in its heartbeat). `--json` for scripts, `--watch` to refresh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from common import fleet_state
from common.redis_conn import connect
from common.settings import GatewaySettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis/Valkey URL (env LLM_FLEET_REDIS_URL)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between the two looks (tokens/s)")
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")


def run(args: argparse.Namespace) -> None:
    try:
        asyncio.run(_run(args))
    except KeyboardInterrupt:
        pass


async def _run(args: argparse.Namespace) -> None:
    redis = connect(GatewaySettings.from_env(redis_url=args.redis_url).redis_url, timeout_s=5.0)
    try:
        before = await fleet_state.live_workers(redis)
        while True:
            await asyncio.sleep(args.interval)
            now = await fleet_state.live_workers(redis)
            snapshot = {"at": time.time(), "workers": fleet_state.worker_rows(now, before),
                        "queues": await fleet_state.queues(redis)}
            if args.json:
                print(json.dumps(snapshot), flush=True)
            else:
                if args.watch:
                    sys.stdout.write("\x1b[H\x1b[2J")  # clear the terminal
                print(render(snapshot), flush=True)
            if not args.watch:
                return
            before = now
    finally:
        await redis.aclose()


def render(snapshot: dict[str, Any]) -> str:
    lines = [f"{len(snapshot['workers'])} worker(s)"]
    table = [("WORKER", "STATE", "MODEL", "MODEL STATE", "RUNNING", "KV USED", "TOKENS/S", "GPU MEM")]
    for worker in snapshot["workers"]:
        gpu = worker["gpu"].get("devices") or []
        gpu_mem = ", ".join(f"{d['memory_used_bytes'] / 2**30:.1f}/{d['memory_total_bytes'] / 2**30:.0f}G"
                            for d in gpu if "memory_used_bytes" in d and "memory_total_bytes" in d) or "-"
        rate = "-" if worker["tokens_per_s"] is None else f"{worker['tokens_per_s']:.0f}"
        for name, model in sorted(worker["models"].items()) or [("-", {})]:
            state = model.get("state", "-")
            if state == "loading":
                state = f"loading {model.get('progress', 0):.0%}"
            capacity = model.get("kv_capacity_tokens") or 0
            kv = f"{model.get('kv_used_tokens', 0) / capacity:.0%} of {capacity}" if capacity else "-"
            running = f"{model.get('running', 0)}/{model.get('max_num_seqs', 0)}" if model else "-"
            table.append((worker["worker_id"], worker["state"], name, state, running, kv, rate, gpu_mem))
    lines += _columns(table)
    lines.append("")
    queues = [("MODEL", "OUTSTANDING", "WAITING", "HELD BY WORKERS", "OF THEM BATCH", "DEAD LETTERS")]
    queues += [(name, str(q["outstanding"]), str(q["waiting"]), str(q["held_by_workers"]),
                str(q["batch_outstanding"]), str(q["dead_letters"]))
               for name, q in snapshot["queues"].items()]
    lines += _columns(queues)
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]
