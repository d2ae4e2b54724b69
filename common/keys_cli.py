"""`llm-fleet keys`: create, list and revoke API keys straight in Redis (the first admin key
is made this way; later ones can also go through the gateway's /admin/keys)."""

from __future__ import annotations

import argparse
import asyncio
import json

from common import api_keys
from common.api_keys import ApiKey
from common.redis_conn import connect
from common.settings import GatewaySettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis/Valkey URL (env LLM_FLEET_REDIS_URL)")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; prints it once")
    create.add_argument("--name", required=True)
    create.add_argument("--admin", action="store_true", help="may use /admin/* routes")
    create.add_argument("--rps", type=float, default=0.0, help="requests per second (0: no limit)")
    create.add_argument("--max-concurrent", type=int, default=0, help="unfinished requests at once (0: no limit)")
    actions.add_parser("list", help="the keys' names and limits (never the keys)")
    revoke = actions.add_parser("revoke", help="delete a key by name")
    revoke.add_argument("name")


def run(args: argparse.Namespace) -> None:
    asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> None:
    redis = connect(GatewaySettings.from_env(redis_url=args.redis_url).redis_url, timeout_s=5.0)
    try:
        if args.action == "create":
            secret = await api_keys.create(redis, ApiKey(name=args.name, admin=args.admin, rps=args.rps,
                                                         max_concurrent=args.max_concurrent))
            print(secret)
        elif args.action == "list":
            for key in (await api_keys.list_keys(redis)).values():
                print(json.dumps({"name": key.name, "admin": key.admin, "rps": key.rps,
                                  "max_concurrent": key.max_concurrent}))
        elif not await api_keys.revoke(redis, args.name):
            raise SystemExit(f"no API key named {args.name!r}")
    finally:
        await redis.aclose()
