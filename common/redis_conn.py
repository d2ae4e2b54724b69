"""Redis clients configured for a serving system: fail fast, reconnect on the next call."""

from __future__ import annotations

import functools
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.errors import Unavailable


class ScriptBusyError(ResponseError):
    """BUSY: a script or function has run past `busy-reply-threshold`; every other command waits."""


class NoReplicasError(ResponseError):
    """NOREPLICAS: `min-replicas-to-write` is not met, so the primary refuses writes."""


# redis-py maps an error reply to a class by its first word, and knows OOM, READONLY and LOADING but
# not these: registered here, so that every `except REDIS_UNAVAILABLE` below sees them as what they are.
BaseParser.EXCEPTION_CLASSES.update({"BUSY": ScriptBusyError, "NOREPLICAS": NoReplicasError,
                                     "MASTERDOWN": MasterDownError, "TRYAGAIN": TryAgainError,
                                     "CLUSTERDOWN": ClusterDownError})

# Redis cannot be reached: connection refused or lost, a timeout (a slow or paused server), still
# loading its data (BusyLoadingError is a ConnectionError).
REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# Redis answers but refuses for now: out of memory (maxmemory), a long script (BUSY), a replica or a
# primary without its replicas (READONLY, NOREPLICAS, MASTERDOWN). Each passes; none says the call was wrong.
REDIS_REFUSALS = (OutOfMemoryError, ReadOnlyError, ScriptBusyError, NoReplicasError, ClusterDownError, TryAgainError)
# What every caller that retries (workers) or answers 503 (gateways) treats as "Redis cannot serve this now".
REDIS_UNAVAILABLE = (*REDIS_DOWN_ERRORS, *REDIS_REFUSALS)


def describe(exc: BaseException) -> str:
    """Why Redis could not serve a call, for a log line or a 503's message."""
    if isinstance(exc, REDIS_REFUSALS):
        return f"Redis refused the command ({type(exc).__name__}: {exc})"
    return f"Redis is unreachable ({type(exc).__name__}: {exc})"


def unavailable(exc: BaseException) -> Unavailable:
    """The 503 a client gets when Redis cannot serve its call."""
    return Unavailable(f"the queue is unavailable: {describe(exc)}; retry shortly")


def connect(url: str, *, timeout_s: float, blocking_ms: int = 0, max_connections: int = 512) -> aioredis.Redis:
    """A pooled client. One immediate retry replaces a connection that died with a restart;
    beyond that the error surfaces at once (the gateway turns it into a 503).

    The pool blocks (up to `timeout_s`) for a free connection when all `max_connections` are
    busy, instead of failing with "Too many connections": a burst of requests queues briefly."""
    return aioredis.Redis.from_pool(connection_pool(url, timeout_s=timeout_s, blocking_ms=blocking_ms,
                                                    max_connections=max_connections))


class _HiredisPacking:
    """Commands packed into the wire protocol by hiredis (C), not by redis-py 5's pure-Python packer.

    The publisher sends one script call per running request per flush, and packing them was a quarter
    of a busy worker's time (py-spy, H200, 100 streams). redis-py 6 packs with hiredis itself; arq
    keeps us on 5."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str | bytes):  # "SCRIPT LOAD": one name in two words, as redis-py splits it
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # what hiredis does not pack (a memoryview) or redis-py refuses (a bool): its way
            return super().pack_command(*args)  # type: ignore[misc]


@functools.cache
def _hiredis_packing(connection_class: type) -> type:
    return type(f"HiredisPacking{connection_class.__name__}", (_HiredisPacking, connection_class), {})


def connection_pool(url: str, *, timeout_s: float, blocking_ms: int = 0,
                    max_connections: int = 512) -> aioredis.BlockingConnectionPool:
    """The pool behind `connect`, for clients of another class (arq's ArqRedis)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # A blocking read (XREADGROUP BLOCK) must not time out on its own socket.
        socket_timeout=timeout_s + blocking_ms / 1000,
        retry=Retry(NoBackoff(), retries=1),
        health_check_interval=30,
    )
    pool.connection_class = _hiredis_packing(pool.connection_class)  # TCP, TLS or a Unix socket alike
    return pool


def as_text(value: bytes | str) -> str:
    """A reply field as text (replies are bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else value
