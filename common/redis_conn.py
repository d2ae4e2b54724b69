"""Redis clients configured for a serving system: fail fast, reconnect on the next call.

A URL is a plain Redis URL (`redis://`, `rediss://`, `unix://`) or a Sentinel one:
`redis+sentinel://[[user]:password@]host1:26379,host2:26379/<service>/<db>` (`rediss+sentinel://`
for TLS to the data nodes and the Sentinels alike). With Sentinel, every new connection asks the
Sentinels for the current primary, and a connection that finds the old primary gone or demoted
(READONLY) is dropped and re-made: a failover is followed without a restart. The password is the
data nodes'; Sentinels with a password of their own take `?sentinel_password=...`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
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


class NotReplicatedError(ResponseError):
    """A write the primary took but no replica confirmed in time (WAIT; common/replication.py)."""


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
REDIS_REFUSALS = (OutOfMemoryError, ReadOnlyError, ScriptBusyError, NoReplicasError, ClusterDownError, TryAgainError,
                  NotReplicatedError)
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


SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    options: dict[str, str] = field(default_factory=dict)  # the query: sentinel_password, ssl_* ...

    @classmethod
    def parse(cls, url: str) -> SentinelUrl | None:
        """The parts of a Sentinel URL; None for any other URL. A malformed one is a ValueError naming
        what is wrong (it comes from an operator's setting)."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SENTINEL_SCHEMES:
            return None
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        credentials, at, hosts = netloc.rpartition("@")
        username, _, password = credentials.partition(":") if at else ("", "", "")
        sentinels = []
        for host in filter(None, hosts.split(",")):
            name, colon, port = host.rpartition(":")
            if not colon or not port.isdigit():
                name, port = host, "26379"
            sentinels.append((name.strip("[]"), int(port)))
        parts = [p for p in path.split("/") if p]
        if not sentinels or not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ValueError(f"a Sentinel URL is {scheme}://[:password@]host:port[,host:port...]/<service>[/<db>]")
        return cls(sentinels, unquote(parts[0]), int(parts[1]) if len(parts) == 2 else 0,
                   unquote(username) or None, unquote(password) or None, SENTINEL_SCHEMES[scheme],
                   dict(parse_qsl(query)))


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """Sentinel's pool (the primary found per connection) that waits for a free connection as ours do."""


def connection_pool(url: str, *, timeout_s: float, blocking_ms: int = 0,
                    max_connections: int = 512) -> aioredis.BlockingConnectionPool:
    """The pool behind `connect`, for clients of another class (arq's ArqRedis)."""
    settings: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        # A blocking read (XREADGROUP BLOCK) must not time out on its own socket.
        "socket_timeout": timeout_s + blocking_ms / 1000,
        "retry": Retry(NoBackoff(), retries=1),
        "health_check_interval": 30,
    }
    sentinel_url = SentinelUrl.parse(url)
    if sentinel_url is None:
        pool = aioredis.BlockingConnectionPool.from_url(url, **settings)
    else:
        pool = _sentinel_pool(sentinel_url, timeout_s, settings)
    pool.connection_class = _hiredis_packing(pool.connection_class)  # TCP, TLS, a Unix socket, Sentinel alike
    return pool


def _sentinel_pool(url: SentinelUrl, timeout_s: float, settings: dict[str, Any]) -> _BlockingSentinelPool:
    options = dict(url.options)
    sentinel_password = options.pop("sentinel_password", None)
    tls = {k: v for k, v in options.items() if k.startswith("ssl_")}
    if set(options) - set(tls):
        raise ValueError(f"unknown Sentinel URL option(s): {', '.join(sorted(set(options) - set(tls)))}")
    if url.tls:
        tls["ssl"] = True
    sentinels = Sentinel(url.sentinels, sentinel_kwargs={
        "socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, "password": sentinel_password, **tls})
    return _BlockingSentinelPool(url.service, sentinels, db=url.db, username=url.username, password=url.password,
                                 **tls, **settings)


def as_text(value: bytes | str) -> str:
    """A reply field as text (replies are bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else value
