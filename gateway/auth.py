"""Optional API keys (`Authorization: Bearer <key>`) and their per-key limits.

With `auth` on, every route but the probes, the OpenAPI description and the browser pages needs
a key; /admin/* needs an admin key. A browser cannot set headers on a WebSocket, so there the key
may come as the subprotocol `bearer.<key>` offered beside `llm-fleet` (the gateway answers with
`llm-fleet`; the key never appears in a URL or a log). Keys are looked up by digest and cached
for `_CACHE_S`, so a revoked key stops working within that long without a Redis round trip per
request. Limits:
- requests per second: a one-second counter per key in Redis (shared by every gateway);
- concurrent generation requests: a set of the key's request ids; when it looks full, ids of
  finished requests are pruned first, so nothing leaks if a gateway dies. Two gateways admitting
  at the same instant may let one request past the limit; the check is not a lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import web
from redis.asyncio import Redis

from common import api_keys, keys
from common.api_keys import ApiKey
from common.errors import Forbidden, Overloaded, Unauthorized
from common.protocol import TERMINAL_STATUSES
from gateway import pages

_CACHE_S = 5.0
# Entries per cache. Valid and invalid keys are cached apart, so a flood of made-up keys evicts only
# other made-up keys, never the fleet's real ones (which would send every request to Redis again).
_CACHE_ENTRIES = 10_000
V = TypeVar("V")
PUBLIC_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/metrics"})
PUBLIC_PREFIXES = ("/queue/",)  # queue depth per model, as /metrics has it: for autoscalers inside the cluster
WS_PROTOCOL = "llm-fleet"
_WS_BEARER_PREFIX = "bearer."


@dataclass(slots=True)
class Caller:
    digest: str
    key: ApiKey


class Authenticator:
    def __init__(self, redis: Redis, cache_s: float = _CACHE_S) -> None:
        self._redis = redis
        self._valid: _ExpiringLru[Caller] = _ExpiringLru(cache_s)
        self._invalid: _ExpiringLru[bool] = _ExpiringLru(cache_s)

    async def authenticate(self, header: str | None) -> Caller:
        scheme, _, secret = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        secret = secret.strip()
        caller = self._valid.get(secret)
        if caller is not None:
            return caller
        if self._invalid.get(secret) is None:
            found = await api_keys.lookup(self._redis, secret)
            if found is not None:
                caller = Caller(*found)
                self._valid.put(secret, caller)
                return caller
            self._invalid.put(secret, True)
        raise Unauthorized("invalid API key")

    async def check_rate(self, caller: Caller) -> None:
        if caller.key.rps <= 0:
            return
        window = keys.rate_window(caller.digest, int(time.time()))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(window)
            pipe.expire(window, 2)
            count, _ = await pipe.execute()
        if count > caller.key.rps:
            raise Overloaded(f"API key {caller.key.name!r} is limited to {caller.key.rps:g} requests per second",
                             retry_after_s=1)

    async def acquire(self, caller: Caller | None, request_id: str) -> None:
        """Count a new generation request against the key's concurrency limit (429 when full)."""
        if caller is None or caller.key.max_concurrent <= 0:
            return
        active = keys.active_requests(caller.digest)
        if await self._redis.scard(active) >= caller.key.max_concurrent:
            await self._prune(active)
            if await self._redis.scard(active) >= caller.key.max_concurrent:
                raise Overloaded(f"API key {caller.key.name!r} is limited to {caller.key.max_concurrent} "
                                 "unfinished requests at once", retry_after_s=1)
        await self._redis.sadd(active, request_id)

    async def release(self, caller: Caller | None, request_id: str) -> None:
        if caller is not None and caller.key.max_concurrent > 0:
            await self._redis.srem(keys.active_requests(caller.digest), request_id)

    async def _prune(self, active: str) -> None:
        members = [m.decode() for m in await self._redis.smembers(active)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id in members:
                pipe.hget(keys.request(request_id), "status")
            statuses = await pipe.execute()
        done = [m for m, s in zip(members, statuses, strict=True) if s is None or s.decode() in TERMINAL_STATUSES]
        if done:
            await self._redis.srem(active, *done)


class _ExpiringLru(Generic[V]):
    """At most `_CACHE_ENTRIES` values, each for `ttl_s`; the least recently used goes first."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, value: V) -> None:
        self._entries[key] = (time.monotonic() + self._ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > _CACHE_ENTRIES:
            self._entries.popitem(last=False)


CALLER_KEY = web.RequestKey("caller", Caller)


async def guard(request: web.Request, auth: Authenticator, enabled: bool) -> None:
    """The middleware's check: who calls, may they call this route, within their rate?"""
    admin_route = request.path.startswith("/admin/")
    if not enabled:
        if admin_route:
            raise Forbidden("the admin API needs API keys: set LLM_FLEET_AUTH=true and use an admin key")
        return
    if request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES) or pages.is_public(request.path):
        return
    caller = await auth.authenticate(request.headers.get("Authorization") or _websocket_bearer(request))
    if admin_route and not caller.key.admin:
        raise Forbidden(f"API key {caller.key.name!r} is not an admin key")
    await auth.check_rate(caller)
    request[CALLER_KEY] = caller


def _websocket_bearer(request: web.Request) -> str | None:
    """`Bearer <key>` from a WebSocket handshake's `Sec-WebSocket-Protocol: llm-fleet, bearer.<key>`."""
    for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(_WS_BEARER_PREFIX):
            return "Bearer " + protocol[len(_WS_BEARER_PREFIX):]
    return None
