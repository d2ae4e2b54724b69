"""Fixtures: a real embedded Valkey, and fleets of real gateways and workers on it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from common.embedded_redis import EmbeddedValkey, free_port
from common.settings import GatewaySettings, WorkerSettings, load_catalogue
from gateway.app import create_app
from gateway.context import GATEWAY_KEY, Gateway
from worker.consumer import Worker

TEST_MODEL = "test-echo"


@pytest.fixture(scope="session")
def valkey() -> EmbeddedValkey:
    server = EmbeddedValkey()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(valkey: EmbeddedValkey) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(valkey.url)
    await client.flushall()
    yield client
    await client.aclose()


@dataclass
class Fleet:
    base_url: str
    redis_url: str
    http: aiohttp.ClientSession
    workers: list[Worker] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    _worker_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _catalogue_path: Path | None = None
    headers: dict[str, str] = field(default_factory=dict)  # sent by get/delete (an API key)
    _settings: GatewaySettings | None = None
    _runner: web.AppRunner | None = None

    @property
    def gateway(self) -> Gateway:
        """The in-process gateway's shared parts (for fault injection and white-box checks)."""
        assert self._runner is not None
        return self._runner.app[GATEWAY_KEY]

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http", "ws", 1) + "/ws/generate"

    def write_catalogue(self, **options: Any) -> str:
        """A catalogue whose test-echo entry has these engine options (step_delay_ms, ...)."""
        assert self._catalogue_path is not None
        spec = load_catalogue(None)[TEST_MODEL]
        # A file per call: a worker process started a moment ago may not have read its own yet.
        path = self._catalogue_path.with_name(f"{self._catalogue_path.stem}-{len(self.workers) + len(self.processes)}"
                                              f"-{id(options)}.json")
        path.write_text(json.dumps({TEST_MODEL: {"engine": "test", "options": {**spec.options, **options}}}))
        return str(path)

    async def start_worker(self, settings: dict[str, Any] | None = None, **options: Any) -> Worker:
        """An in-process worker serving the test engine, with engine options and worker
        settings overridden."""
        settings_ = WorkerSettings(**{"redis_url": self.redis_url, "models": [TEST_MODEL],
                                      "worker_id": f"w{len(self.workers)}",
                                      # A stopping reader finishes its blocked read first: keep it short.
                                      "read_block_ms": 100,
                                      "catalogue": self.write_catalogue(**options), **(settings or {})})
        worker = Worker(settings_, load_catalogue(settings_.catalogue))
        self.workers.append(worker)
        self._worker_tasks.append(asyncio.create_task(worker.main(handle_signals=False)))
        return worker

    async def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        await asyncio.gather(*self._worker_tasks)
        self.workers.clear()
        self._worker_tasks.clear()

    def spawn_worker(self, worker_id: str, env: dict[str, str] | None = None, catalogue: str | None = None,
                     **options: Any) -> subprocess.Popen:
        """A worker in its own process (to SIGKILL or SIGTERM), with fast failure detection:
        heartbeat TTL 2 s, reclaim looks every 0.5 s. Settings can be overridden with `env`; the
        catalogue is a file, or test-echo with these engine options."""
        catalogue = catalogue or self.write_catalogue(**options)
        environment = {**os.environ, "LLM_FLEET_HEARTBEAT_INTERVAL_S": "0.5", "LLM_FLEET_HEARTBEAT_TTL_S": "2",
                       "LLM_FLEET_RECLAIM_INTERVAL_S": "0.5", **(env or {})}
        process = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "worker", "--redis-url", self.redis_url, "--model", TEST_MODEL,
             "--worker-id", worker_id, "--catalogue", catalogue, "--log-level", "WARNING"],
            env=environment, cwd=Path(__file__).parent.parent)
        self.processes.append(process)
        return process

    async def restart_gateway(self) -> None:
        """Stop this gateway gracefully and start a new one on the same port (a deploy)."""
        assert self._runner is not None
        await self._runner.cleanup()
        self._runner = await _serve(self._settings)

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.http.post(self.base_url + path, json=body, **kwargs) as response:
            return response.status, await response.json(content_type=None), response

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.base_url + path, headers=self.headers) as response:
            return response.status, await response.json(content_type=None)

    async def delete(self, path: str) -> tuple[int, Any]:
        async with self.http.delete(self.base_url + path, headers=self.headers) as response:
            return response.status, await response.json(content_type=None)

    async def submit(self, **body: Any) -> str:
        status, reply, _ = await self.post("/v1/generate", {"model": TEST_MODEL, **body})
        assert status == 202, reply
        return reply["request_id"]

    async def wait_done(self, request_id: str, timeout_s: float = 20.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                status, reply = await self.get(f"/v1/requests/{request_id}")
                assert status == 200, reply
                if reply["status"] in ("completed", "failed", "cancelled"):
                    return reply
                await asyncio.sleep(0.02)

    async def wait_ready(self, timeout_s: float = 20.0) -> None:
        """Until a worker has a model ready (the gateway's /ready lists it)."""
        async with asyncio.timeout(timeout_s):
            while not (await self.get("/ready"))[1].get("models"):
                await asyncio.sleep(0.05)


StartFleet = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def start_fleet(redis: aioredis.Redis, valkey: EmbeddedValkey, tmp_path: Path) -> AsyncIterator[StartFleet]:
    """Start a gateway (real HTTP server) with settings overrides; `workers=N` test-engine workers."""
    fleets: list[Fleet] = []

    async def start(workers: int = 1, redis_url: str | None = None, engine: dict[str, Any] | None = None,
                    **gateway_overrides: Any) -> Fleet:
        url = redis_url or valkey.url
        settings = GatewaySettings(redis_url=url, port=free_port(), **gateway_overrides)
        fleet = Fleet(f"http://127.0.0.1:{settings.port}", url, aiohttp.ClientSession(),
                      _catalogue_path=tmp_path / f"catalogue-{len(fleets)}.json", _settings=settings,
                      _runner=await _serve(settings))
        fleets.append(fleet)
        for _ in range(workers):
            await fleet.start_worker(**(engine or {}))
        if workers:
            await fleet.wait_ready()
        return fleet

    yield start
    for fleet in fleets:
        for process in fleet.processes:
            process.kill()
            process.wait()
        with contextlib.suppress(Exception):
            await fleet.stop_workers()
        await fleet.http.close()
        assert fleet._runner is not None
        await fleet._runner.cleanup()


async def _serve(settings: GatewaySettings) -> web.AppRunner:
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    return runner


async def ws_collect(ws: aiohttp.ClientWebSocketResponse, request_ids: set[str],
                     timeout_s: float = 20.0) -> dict[str, list[dict[str, Any]]]:
    """Read messages until every request in `request_ids` got its done/error; messages by request."""
    by_request: dict[str, list[dict[str, Any]]] = {rid: [] for rid in request_ids}
    pending = set(request_ids)
    async with asyncio.timeout(timeout_s):
        while pending:
            message = await ws.receive_json()
            rid = message.get("request_id")
            if rid in by_request:
                by_request[rid].append(message)
                if message["type"] in ("done", "error"):
                    pending.discard(rid)
    return by_request


@pytest.fixture
async def sdk() -> AsyncIterator[Callable[[Fleet], tuple[openai.OpenAI, openai.AsyncOpenAI]]]:
    """SDK clients (sync, async) for a fleet; closed after the test."""
    made: list[tuple[openai.OpenAI, openai.AsyncOpenAI]] = []

    def clients(fleet: Fleet) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
        base = fleet.base_url + "/v1"
        made.append((openai.OpenAI(base_url=base, api_key="none", max_retries=0),
                     openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)))
        return made[-1]

    yield clients
    for sync, client in made:
        sync.close()
        await client.close()
