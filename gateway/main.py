"""`llm-fleet gateway`: one gateway process."""

from __future__ import annotations

import argparse

from aiohttp import web

from common.event_loop import new_event_loop
from common.logs import add_log_arguments, setup_logging
from common.settings import GatewaySettings
from gateway.app import create_app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis/Valkey URL (env LLM_FLEET_REDIS_URL)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--max-outstanding", type=int, help="per-model queue cap before 429")
    parser.add_argument("--reuse-port", action="store_true",
                        help="SO_REUSEPORT: several gateway processes share the port (the kernel spreads connections)")
    add_log_arguments(parser)


def run(args: argparse.Namespace) -> None:
    setup_logging("gateway", args.log_level, args.log_format)
    settings = GatewaySettings.from_env(
        redis_url=args.redis_url, host=args.host, port=args.port, max_outstanding=args.max_outstanding
    )
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=None,
                shutdown_timeout=5.0, access_log=None, loop=new_event_loop(), reuse_port=args.reuse_port or None)
