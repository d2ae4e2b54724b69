"""The aiohttp application: routes, error handling, start-up and shutdown."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from common import heap
from common.control import arq_client
from common.errors import FleetError, Overloaded, PayloadTooLarge
from common.redis_conn import REDIS_UNAVAILABLE, connect, describe, unavailable
from common.replication import replication_for
from common.request_store import RequestStore
from common.settings import GatewaySettings
from common.supervision import Supervisor
from gateway import (
    admin_api,
    admin_models,
    batches_api,
    console_api,
    files_api,
    health,
    http_api,
    metrics,
    openai_api,
    openapi,
    pages,
    tokenize_api,
    ws,
)
from gateway.auth import Authenticator, guard
from gateway.batch_runner import BatchRunner
from gateway.batch_store import BatchStore
from gateway.context import GATEWAY_KEY, REQUEST_ID_KEY, Gateway
from gateway.disconnects import DisconnectWatcher
from gateway.file_store import FileStore
from gateway.models import ModelRegistry
from gateway.rejections import RejectionTally
from gateway.relay import Relay
from gateway.submit import Submitter, new_request_id

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: FleetError) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    return web.json_response(exc.to_dict(), status=exc.status, headers=headers)


@web.middleware
async def request_id_header(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every response carries X-Request-Id; a request that creates a job uses it as the job's id."""
    request[REQUEST_ID_KEY] = new_request_id()
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-Id"] = request[REQUEST_ID_KEY]
    return response


@web.middleware
async def api_keys(request: web.Request, handler: Handler) -> web.StreamResponse:
    gateway = request.app[GATEWAY_KEY]
    await guard(request, gateway.auth, gateway.settings.auth)
    return await handler(request)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as a JSON error with the right status; a 500 (JSON too) only for a real bug.
    A handler that has started a response (a stream) reports its own errors in that stream."""
    try:
        return await handler(request)
    except FleetError as exc:
        log.info("refused %d: %s", exc.status, exc.message,
                 extra={"request_id": request.get(REQUEST_ID_KEY), "path": request.path})
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[GATEWAY_KEY].settings.max_body_bytes
        return error_response(PayloadTooLarge(f"body is larger than the limit of {limit} bytes"))
    except REDIS_UNAVAILABLE as exc:
        log.warning("%s", describe(exc), extra={"request_id": request.get(REQUEST_ID_KEY), "path": request.path})
        return error_response(unavailable(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = FleetError(exc.reason)
        error.status, error.type = exc.status, "invalid_request_error"
        return web.json_response(error.to_dict(), status=exc.status, headers={
            k: v for k, v in exc.headers.items() if k.lower() == "allow"
        })
    except Exception:
        log.exception("internal error", extra={"request_id": request.get(REQUEST_ID_KEY), "path": request.path})
        return error_response(FleetError("internal error; the gateway's log has the details"))


def create_app(settings: GatewaySettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[metrics.count_requests, request_id_header, errors_as_json, api_keys])
    app[metrics.METRICS_KEY] = gateway_metrics = metrics.GatewayMetrics()
    routes = [
        web.post("/v1/generate", http_api.generate),
        web.post("/generate", http_api.generate),
        web.post("/v1/completions", openai_api.completions),
        web.post("/v1/chat/completions", openai_api.chat_completions),
        web.post("/tokenize", tokenize_api.tokenize),
        web.post("/detokenize", tokenize_api.detokenize),
        web.get("/v1/requests/{request_id}", http_api.get_request),
        web.delete("/v1/requests/{request_id}", http_api.cancel_request),
        web.get("/ws/generate", ws.websocket),
        web.get("/health", health.health),
        web.get("/ready", health.ready),
        web.get("/v1/models", health.models),
        web.get("/models", health.models),
        web.get("/openapi.json", openapi.openapi_json),
        web.get("/metrics", metrics.metrics_endpoint),
        web.get("/queue/{model}", metrics.queue_endpoint),
        web.get("/v1/fleet", console_api.fleet),
        web.post("/v1/files", files_api.create_file),
        web.get("/v1/files", files_api.list_files),
        web.get("/v1/files/{file_id}", files_api.get_file),
        web.get("/v1/files/{file_id}/content", files_api.file_content),
        web.delete("/v1/files/{file_id}", files_api.delete_file),
        web.post("/v1/batches", batches_api.create_batch),
        web.get("/v1/batches", batches_api.list_batches),
        web.get("/v1/batches/{batch_id}", batches_api.get_batch),
        web.post("/v1/batches/{batch_id}/cancel", batches_api.cancel_batch),
        web.post("/admin/keys", admin_api.create_key),
        web.get("/admin/keys", admin_api.list_keys),
        web.delete("/admin/keys/{name}", admin_api.revoke_key),
        web.get("/admin/workers", admin_models.list_workers),
        web.post("/admin/models/{name}/load", admin_models.load_model),
        web.post("/admin/models/{name}/unload", admin_models.unload_model),
        *pages.routes(),
    ]
    app.add_routes(routes)
    app.cleanup_ctx.append(_lifecycle(settings, gateway_metrics))
    app.on_shutdown.append(_going_away)
    return app


async def _going_away(app: web.Application) -> None:
    gateway = app[GATEWAY_KEY]
    gateway.stopping = True
    await ws.close_all(gateway)


def _lifecycle(settings: GatewaySettings,
               gateway_metrics: metrics.GatewayMetrics) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        redis = connect(settings.redis_url, timeout_s=settings.redis_timeout_s,
                        max_connections=settings.redis_max_connections)
        replication = replication_for(redis, settings.redis_url, timeout_ms=settings.replica_ack_timeout_ms)
        store = RequestStore(redis, replication)
        registry = ModelRegistry(redis, queue_unserved=settings.queue_unserved_models)
        arq = arq_client(settings.redis_url, timeout_s=settings.redis_timeout_s)
        relay = Relay(redis, store, resync_s=settings.stream_resync_s, outage_grace_s=settings.stream_outage_grace_s)
        supervisor = Supervisor(on_crash=lambda task: gateway_metrics.task_crashes.labels(task).inc())
        relay.start(supervisor)
        await replication.start(supervisor)
        disconnects = DisconnectWatcher()
        disconnects.start(supervisor)
        rejections = RejectionTally(redis)
        rejections.start(supervisor)

        def on_rejected(model: str) -> None:
            gateway_metrics.rejected.labels(model).inc()
            rejections.add(model)

        submitter = Submitter(settings, store, registry, on_rejected=on_rejected,
                              on_routed=lambda model, to_engine: gateway_metrics.routed.labels(
                                  model, "engine" if to_engine else "shared").inc())
        files, batches = FileStore(redis), BatchStore(redis)
        app[GATEWAY_KEY] = Gateway(settings, redis, store, registry, submitter, relay,
                                   Authenticator(redis, settings.auth_cache_s), arq, supervisor, disconnects,
                                   rejections, files, batches)
        runner = BatchRunner(redis, settings, store, submitter, files, batches)
        supervisor.start("batch_runner", runner.run)
        heap.freeze()  # what start-up built lives as long as the process (common/heap.py)
        yield
        await supervisor.stop()
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await rejections.flush()
        await relay.close()
        await redis.aclose()
        await arq.connection_pool.disconnect()

    return lifecycle
