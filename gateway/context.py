"""The gateway's shared parts, built once per process and reachable from every handler."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from aiohttp import web
from arq.connections import ArqRedis
from redis.asyncio import Redis

from common.errors import NotFound
from common.fleet_state import HeartbeatHistory
from common.protocol import Job
from common.request_store import Idempotency, RequestMeta, RequestStore
from common.settings import GatewaySettings
from common.supervision import Supervisor
from gateway.auth import Authenticator, Caller
from gateway.batch_store import BatchStore
from gateway.disconnects import DisconnectWatcher
from gateway.file_store import FileStore
from gateway.models import ModelRegistry
from gateway.rejections import RejectionTally
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
    supervisor: Supervisor  # the gateway's long-lived tasks (relay reader, disconnects); /ready reports failures
    disconnects: DisconnectWatcher
    rejections: RejectionTally  # 429s per model, fleet-wide (the console)
    files: FileStore
    batches: BatchStore
    heartbeats: HeartbeatHistory = field(default_factory=HeartbeatHistory)  # workers' tokens/s (the console)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    # Shutting down (a restart, a deploy): open sockets are closed with "going away" and their
    # requests keep running, for the client to re-attach elsewhere; they are not abandoned.
    stopping: bool = False

    @staticmethod
    def of(request: web.Request) -> Gateway:
        return request.app[GATEWAY_KEY]

    async def submit(self, job: Job, caller: Caller | None, idempotency: Idempotency | None = None) -> str:
        """Enqueue, counted against the caller's concurrency limit. The id of the request this submit
        stands for: the job's, or the earlier one a repeated idempotency key names."""
        await self.auth.acquire(caller, job.request_id)
        try:
            request_id = await self.submitter.enqueue(job, owner=caller.digest if caller else "",
                                                      idempotency=idempotency)
        except BaseException:
            await self.auth.release(caller, job.request_id)
            raise
        if request_id != job.request_id:
            await self.auth.release(caller, job.request_id)
            log.info("replayed (idempotency key)", extra={"request_id": request_id})
            return request_id
        log.info("accepted", extra={"request_id": job.request_id, "model": job.model,
                                    "prompt_tokens": len(job.prompt_token_ids),
                                    "max_tokens": job.sampling["max_tokens"]})
        return request_id

    async def submit_streaming(self, job: Job, caller: Caller | None,
                               idempotency: Idempotency | None = None) -> Subscription:
        """Enqueue a job whose output this process relays. Subscribes first: a worker may publish
        the moment the job is in the stream. A replay is relayed from the earlier request's start."""
        subscription = await self.relay.subscribe(job.request_id)
        try:
            request_id = await self.submit(job, caller, idempotency)
        except BaseException:
            subscription.close()
            raise
        if request_id != job.request_id:
            subscription.close()
            subscription = await self.relay.subscribe(request_id)
        return subscription

    async def cancel(self, request_id: str, caller: Caller | None) -> str:
        """Cancel a request the caller may touch; the status it ends in (a finished one keeps its own)."""
        meta = await self.request_for(request_id, caller)
        status = await self.store.cancel(request_id, meta.model, result_ttl_s=self.settings.result_ttl_s)
        if status is None:
            raise not_found(request_id)
        return status

    async def request_for(self, request_id: str, caller: Caller | None) -> RequestMeta:
        """A request the caller may read, cancel or attach to; 404 otherwise."""
        meta = await self.store.meta(request_id)
        if meta is None or not may_access(caller, meta.owner):
            raise not_found(request_id)
        return meta


def may_access(caller: Caller | None, owner: str) -> bool:
    """A request belongs to the API key that created it; an admin key reaches every request. Without
    API keys (caller None) there are no owners. Others get the 404 a missing request gets: whether
    another key's request exists is not theirs to learn."""
    return caller is None or caller.key.admin or caller.digest == owner


def not_found(request_id: str) -> NotFound:
    return NotFound(f"request {request_id} does not exist (or its result expired)", param="request_id")


GATEWAY_KEY = web.AppKey("gateway", Gateway)
REQUEST_ID_KEY = web.RequestKey("request_id", str)
