"""`llm-fleet worker`: one worker process serving the configured models."""

from __future__ import annotations

import argparse
import asyncio

from common.event_loop import new_event_loop
from common.logs import add_log_arguments, setup_logging
from common.settings import WorkerSettings, load_catalogue
from worker.consumer import Worker
from worker.frontends import FrontendProcess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis/Valkey URL (env LLM_FLEET_REDIS_URL)")
    parser.add_argument("--model", action="append", dest="models", help="served model name (repeatable)")
    parser.add_argument("--worker-id", help="unique id (default: host-pid-random)")
    parser.add_argument("--catalogue", help="JSON file adding models to the built-in catalogue")
    parser.add_argument("--http-port", type=int, help="serve /health, /ready, /metrics on this port (0: any free)")
    parser.add_argument("--http-host", help="bind address for --http-port (default 127.0.0.1)")
    add_log_arguments(parser)


def run(args: argparse.Namespace) -> None:
    setup_logging("worker", args.log_level, args.log_format)
    frontend = FrontendProcess.from_env()
    if frontend is not None:  # started by another worker for its model (worker/frontends.py)
        frontend.die_with_parent()
        worker = Worker(frontend.settings, {frontend.spec.name: frontend.spec}, frontend)
    else:
        settings = WorkerSettings.from_env(
            redis_url=args.redis_url, models=args.models, worker_id=args.worker_id, catalogue=args.catalogue,
            http_port=args.http_port, http_host=args.http_host,
        )
        worker = Worker(settings, load_catalogue(settings.catalogue))
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(worker.main())
    raise SystemExit(worker.exit_code)
