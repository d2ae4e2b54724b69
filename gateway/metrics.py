"""The gateway's Prometheus metrics, at /metrics (public, like /health: scraped from inside the cluster),
and one model's queue as JSON at /queue/{model} (what KEDA scales workers on).

Requests are counted by route template (never the raw path: request ids would explode the series);
queue depth, lag and age per model, dead letters and live workers are read from Redis at scrape time,
so every gateway replica reports the same fleet-wide values (aggregate them with max, not sum).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common import fleet_state
from common.protocol import ModelState
from gateway.context import Gateway

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llm_fleet_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.duration = Histogram("llm_fleet_http_request_duration_seconds",
                                  "Time to the response (a stream: to its end)", ["route"], registry=r,
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.rejected = Counter("llm_fleet_admission_rejections", "Requests refused with 429: the model's queue "
                                "was full", ["model"], registry=r)
        self.routed = Counter("llm_fleet_jobs_routed", "Jobs enqueued, by the stream they went to: an engine's own "
                              "(prefix affinity: it holds the prompt's prefix) or the shared one", ["model", "to"],
                              registry=r)
        self.outstanding = Gauge("llm_fleet_queue_outstanding", "Unfinished jobs in the model's stream (XLEN less "
                                 "the cancelled or expired ones no worker has read yet)",
                                 ["model"], registry=r)
        self.waiting = Gauge("llm_fleet_queue_waiting", "Jobs no worker has read yet, less the cancelled ones",
                             ["model"], registry=r)
        self.lag = Gauge("llm_fleet_queue_lag", "The workers group's lag (XINFO GROUPS) summed over the model's "
                         "streams: entries no worker has read, cancelled ones included until read", ["model"],
                         registry=r)
        self.waiting_routed = Gauge("llm_fleet_queue_waiting_routed", "Unread jobs in engines' own streams "
                                    "(prefix affinity)", ["model"], registry=r)
        self.held = Gauge("llm_fleet_queue_held", "Jobs read by a worker, not finished", ["model"], registry=r)
        self.batch_outstanding = Gauge("llm_fleet_queue_batch_outstanding", "Of the outstanding jobs, batch-class "
                                       "ones (a batch's lines in the queue)", ["model"], registry=r)
        self.batch_waiting = Gauge("llm_fleet_queue_batch_waiting", "Of those, not read by a worker yet", ["model"],
                                   registry=r)
        self.oldest = Gauge("llm_fleet_queue_oldest_waiting_seconds", "Age of the oldest unread job", ["model"],
                            registry=r)
        self.dead_letters = Gauge("llm_fleet_dead_letters", "Jobs kept in the model's dead-letter stream", ["model"],
                                  registry=r)
        self.workers = Gauge("llm_fleet_workers_live", "Workers with a live heartbeat", registry=r)
        self.serving = Gauge("llm_fleet_model_ready_workers", "Live workers with the model ready", ["model"],
                             registry=r)
        self.task_crashes = Counter("llm_fleet_task_crashes", "Long-lived tasks (relay reader, disconnect "
                                    "watcher) that raised and were restarted", ["task"], registry=r)

    async def render(self, gateway: Gateway) -> bytes:
        queues = await fleet_state.queues(gateway.redis)
        workers = await gateway.registry.live_workers()
        for gauge in (self.outstanding, self.waiting, self.waiting_routed, self.lag, self.held, self.oldest,
                      self.batch_outstanding, self.batch_waiting,
                      self.dead_letters, self.serving):
            gauge.clear()
        for model, queue in queues.items():
            self.outstanding.labels(model).set(queue["outstanding"])
            self.waiting.labels(model).set(queue["waiting"])
            self.waiting_routed.labels(model).set(queue["waiting_in_engine_streams"])
            self.batch_outstanding.labels(model).set(queue["batch_outstanding"])
            self.batch_waiting.labels(model).set(queue["batch_waiting"])
            if queue["lag"] is not None:
                self.lag.labels(model).set(queue["lag"])
            self.held.labels(model).set(queue["held_by_workers"])
            self.oldest.labels(model).set(queue["oldest_waiting_s"])
            self.dead_letters.labels(model).set(queue["dead_letters"])
            self.serving.labels(model).set(sum(1 for w in workers
                                               if w.models.get(model, {}).get("state") == ModelState.READY))
        self.workers.set(len(workers))
        return generate_latest(self.registry)


METRICS_KEY = web.AppKey("metrics", GatewayMetrics)


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: sees every final status, the errors turned into JSON included."""
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics = request.app[METRICS_KEY]
        metrics.requests.labels(route, request.method, str(status)).inc()
        metrics.duration.labels(route).observe(time.perf_counter() - started)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = await request.app[METRICS_KEY].render(Gateway.of(request))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def queue_endpoint(request: web.Request) -> web.Response:
    """One model's queue as JSON, for KEDA's metrics-api trigger (public, like /metrics). A model no worker
    has registered yet has an empty queue, not a 404: the autoscaler of a group scaled to zero must read 0."""
    model = request.match_info["model"]
    return web.json_response((await fleet_state.queues(Gateway.of(request).redis, [model]))[model])
