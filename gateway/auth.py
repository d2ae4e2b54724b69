"""Optional API keys (`Authorization: Bearer <key>`) and their per-key limits.

With `auth` on, every route but the probes and the OpenAPI description needs a key; /admin/*
needs an admin key. Keys are looked up by digest and cached for `_CACHE_S`, so a revoked key
stops working within that long without a Redis round trip per request. Limits:
- requests per second: a one-second counter per key in Redis (shared by every gateway);
- concurrent generation requests: a set of the key's request ids; when it looks full, ids of
  finished requests are pruned first, so nothing leaks if a gateway dies. Two gateways admitting
  at the same instant may let one request past the limit; the check is not a lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from common import api_keys, keys
from common.api_keys import ApiKey
from common.errors import Forbidden, Overloaded, Unauthorized
from common.protocol import TERMINAL_STATUSES

_CACHE_S = 5.0
PUBLIC_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/metrics"})


@dataclass(slots=True)
class Caller:
    digest: str
    key: ApiKey


class Authenticator:
    def __init__(self, redis: Redis, cache_s: float = _CACHE_S) -> None:
        self._redis = redis
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, Caller | None]] = {}

    async def authenticate(self, header: str | None) -> Caller:
        scheme, _, secret = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        secret = secret.strip()
        cached = self._cache.get(secret)
        if cached is None or cached[0] < time.monotonic():
            found = await api_keys.lookup(self._redis, secret)
            cached = (time.monotonic() + self._cache_s, None if found is None else Caller(*found))
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[secret] = cached
        if cached[1] is None:
            raise Unauthorized("invalid API key")
        return cached[1]

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


CALLER_KEY = web.RequestKey("caller", Caller)


async def guard(request: web.Request, auth: Authenticator, enabled: bool) -> None:
    """The middleware's check: who calls, may they call this route, within their rate?"""
    admin_route = request.path.startswith("/admin/")
    if not enabled:
        if admin_route:
            raise Forbidden("the admin API needs API keys: set LLM_FLEET_AUTH=true and use an admin key")
        return
    if request.path in PUBLIC_PATHS:
        return
    caller = await auth.authenticate(request.headers.get("Authorization"))
    if admin_route and not caller.key.admin:
        raise Forbidden(f"API key {caller.key.name!r} is not an admin key")
    await auth.check_rate(caller)
    request[CALLER_KEY] = caller
