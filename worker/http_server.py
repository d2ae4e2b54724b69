"""The worker's own small HTTP endpoint, for Kubernetes probes and Prometheus.

/health: the process is up (liveness). /ready: a model is loaded and the worker is not draining
(readiness: Kubernetes sends no traffic to a worker, but a rollout waits for this). /metrics:
Prometheus exposition, with the worker's front-end processes folded in. Off unless `http_port` is set.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from common.protocol import ModelState, WorkerStatus
from worker import frontend_metrics
from worker.metrics import WorkerMetrics

FrontendUrls = Callable[[], list[tuple[str, str]]]
_STATUS_KEY = web.AppKey("status", Callable[[], Awaitable[WorkerStatus]])
_METRICS_KEY = web.AppKey("metrics", WorkerMetrics)
_FRONTENDS_KEY = web.AppKey("frontends", FrontendUrls)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    status = await request.app[_STATUS_KEY]()
    ready = sorted(name for name, m in status.models.items() if m["state"] == ModelState.READY)
    if status.state != "serving" or not ready:
        reason = f"worker is {status.state}" if status.state != "serving" else "no model is ready yet"
        return web.json_response({"ready": False, "reason": reason, "models": status.models}, status=503)
    return web.json_response({"ready": True, "models": ready})


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[_METRICS_KEY]
    body = metrics.render(await request.app[_STATUS_KEY]())
    frontends = await frontend_metrics.scrape(request.app[_FRONTENDS_KEY]())
    if frontends:
        body = frontend_metrics.merge(body, frontends, metrics.per_process_families)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(host: str, port: int, status: Callable[[], Awaitable[WorkerStatus]],
                metrics: WorkerMetrics, frontends: FrontendUrls = list) -> web.AppRunner:
    """Start serving; the caller cleans up the returned runner. Port 0 picks a free port. `frontends`
    gives the /metrics URLs of the worker's front-end processes, by front-end index."""
    app = web.Application()
    app[_STATUS_KEY], app[_METRICS_KEY], app[_FRONTENDS_KEY] = status, metrics, frontends
    app.add_routes([web.get("/health", _health), web.get("/ready", _ready), web.get("/metrics", _metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    (address, *_) = runner.addresses
    return int(address[1])
