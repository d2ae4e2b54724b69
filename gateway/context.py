"""The gateway's shared parts, built once per process and reachable from every handler."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiohttp import web
from arq.connections import ArqRedis
from redis.asyncio import Redis

from common.errors import NotFound
from common.protocol import Job
from common.request_store import RequestStore
from common.settings import GatewaySettings
from gateway.auth import Authenticator, Caller
from gateway.models import ModelRegistry
from gateway.relay import Relay, Subscription
from gateway.submit import Submitter

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    settings: GatewaySettings
    redis: Redis
    store: RequestStore
    registry: ModelRegistry
    submitter: Submitter
    relay: Relay
    auth: Authenticator
    arq: ArqRedis  # the control plane's client: load/unload jobs on workers' queues
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    # Shutting down (a restart, a deploy): open sockets are closed with "going away" and their
    # requests keep running, for the client to re-attach elsewhere; they are not abandoned.
    stopping: bool = False

    @staticmethod
    def of(request: web.Request) -> Gateway:
        return request.app[GATEWAY_KEY]

    async def submit(self, job: Job, caller: Caller | None) -> None:
        """Enqueue, counted against the caller's concurrency limit."""
        await self.auth.acquire(caller, job.request_id)
        try:
            await self.submitter.enqueue(job)
        except BaseException:
            await self.auth.release(caller, job.request_id)
            raise
        log.info("accepted", extra={"request_id": job.request_id, "model": job.model,
                                    "prompt_tokens": len(job.prompt_token_ids),
                                    "max_tokens": job.sampling["max_tokens"]})

    async def submit_streaming(self, job: Job, caller: Caller | None) -> Subscription:
        """Enqueue a job whose output this process relays. Subscribes first: a worker may publish
        the moment the job is in the stream."""
        subscription = await self.relay.subscribe(job.request_id)
        try:
            await self.submit(job, caller)
        except BaseException:
            subscription.close()
            raise
        return subscription

    async def cancel(self, request_id: str) -> str:
        """Cancel a request; the status it ends in (a finished one keeps its own)."""
        model = await self.store.model_of(request_id)
        status = None if model is None else await self.store.cancel(
            request_id, model, result_ttl_s=self.settings.result_ttl_s
        )
        if status is None:
            raise NotFound(f"request {request_id} does not exist (or its result expired)", param="request_id")
        return status


GATEWAY_KEY = web.AppKey("gateway", Gateway)
REQUEST_ID_KEY = web.RequestKey("request_id", str)
