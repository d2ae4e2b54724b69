"""`llm-fleet models load|unload NAME`: the control plane from a terminal, straight through Redis and
arq (the same jobs the gateway's /admin/models routes send); a progress bar follows the load."""

from __future__ import annotations

import argparse
import asyncio
import json

import redis.asyncio as aioredis
from arq.jobs import Job

from common import control, fleet_state
from common.errors import FleetError
from common.progress import advance, load_bar, load_fraction
from common.redis_conn import connect
from common.settings import GatewaySettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis/Valkey URL (env LLM_FLEET_REDIS_URL)")
    actions = parser.add_subparsers(dest="action", required=True)
    load = actions.add_parser("load", help="load a catalogue model on workers (default: 1 replica)")
    load.add_argument("name")
    load.add_argument("--workers", help="comma-separated worker ids")
    load.add_argument("--replicas", type=int, help="make this many workers serve it")
    unload = actions.add_parser("unload", help="unload a model (default: from every worker)")
    unload.add_argument("name")
    unload.add_argument("--workers", help="comma-separated worker ids")
    for action in (load, unload):
        action.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the workers")


def run(args: argparse.Namespace) -> None:
    try:
        asyncio.run(_run(args))
    except FleetError as exc:
        raise SystemExit(f"llm-fleet models {args.action}: {exc.message}") from None


async def _run(args: argparse.Namespace) -> None:
    url = GatewaySettings.from_env(redis_url=args.redis_url).redis_url
    redis = connect(url, timeout_s=10.0)
    arq = control.arq_client(url, timeout_s=10.0)
    try:
        workers = await fleet_state.live_workers(redis)
        worker_ids = args.workers.split(",") if args.workers else None
        if args.action == "load":
            targets = control.plan_load(workers, args.name, worker_ids=worker_ids, replicas=args.replicas)
            action = control.LOAD_MODEL
        else:
            targets = control.plan_unload(workers, args.name, worker_ids=worker_ids)
            action = control.UNLOAD_MODEL
        if not targets:
            print(json.dumps({"model": args.name, "action": action, "workers": [], "note": "nothing to do"}))
            return
        jobs = await control.send(arq, action, args.name, targets)
        if action == control.LOAD_MODEL:
            await _follow_load(redis, args.name, set(targets), jobs, args.timeout)
        outcomes = await asyncio.gather(*(control.outcome(job, args.timeout) for job in jobs))
        for worker_id, outcome in zip(targets, outcomes, strict=True):
            print(json.dumps({"worker_id": worker_id, **outcome}))
        if not all(o["ok"] for o in outcomes):
            raise SystemExit(1)
    finally:
        await redis.aclose()
        await arq.connection_pool.disconnect()


async def _follow_load(redis: aioredis.Redis, model: str, targets: set[str], jobs: list[Job], timeout_s: float) -> None:
    with load_bar(f"loading {model} on {len(targets)} worker(s)") as bar:
        async with asyncio.timeout(timeout_s):
            while True:
                advance(bar, load_fraction(await fleet_state.live_workers(redis), model, targets))
                if all([await job.result_info() is not None for job in jobs]):
                    return
                await asyncio.sleep(0.5)
