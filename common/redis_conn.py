"""Redis clients configured for a serving system: fail fast, reconnect on the next call."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# What "Redis is unreachable" looks like to a caller.
REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def connect(url: str, *, timeout_s: float, blocking_ms: int = 0, max_connections: int = 512) -> aioredis.Redis:
    """A pooled client. One immediate retry replaces a connection that died with a restart;
    beyond that the error surfaces at once (the gateway turns it into a 503).

    The pool blocks (up to `timeout_s`) for a free connection when all `max_connections` are
    busy, instead of failing with "Too many connections": a burst of requests queues briefly."""
    return aioredis.Redis.from_pool(connection_pool(url, timeout_s=timeout_s, blocking_ms=blocking_ms,
                                                    max_connections=max_connections))


def connection_pool(url: str, *, timeout_s: float, blocking_ms: int = 0,
                    max_connections: int = 512) -> aioredis.BlockingConnectionPool:
    """The pool behind `connect`, for clients of another class (arq's ArqRedis)."""
    return aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # A blocking read (XREADGROUP BLOCK) must not time out on its own socket.
        socket_timeout=timeout_s + blocking_ms / 1000,
        retry=Retry(NoBackoff(), retries=1),
        health_check_interval=30,
    )


def as_text(value: bytes | str) -> str:
    """A reply field as text (replies are bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else value
