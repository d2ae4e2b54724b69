"""API keys: created once (the secret is shown once), stored only as a SHA-256 digest.

`api_keys` maps digest -> ApiKey (name, admin, per-key limits). Shared by the gateway (checks)
and the CLI (`llm-fleet keys`), so an operator can make the first admin key without a gateway.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from common import keys
from common.protocol import Packed

PREFIX = "lf-"


@dataclass(slots=True)
class ApiKey(Packed):
    name: str
    admin: bool = False
    rps: float = 0.0  # requests per second (a one-second window); 0: no limit
    max_concurrent: int = 0  # unfinished generation requests at once; 0: no limit
    created_at: float = 0.0


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create(redis: Redis, key: ApiKey) -> str:
    """Store a new key; returns its secret (the only time it exists in the clear)."""
    if any(existing.name == key.name for existing in (await list_keys(redis)).values()):
        raise ValueError(f"a key named {key.name!r} exists")
    secret = PREFIX + secrets.token_urlsafe(32)
    key.created_at = key.created_at or time.time()
    await redis.hset(keys.API_KEYS, digest(secret), key.pack())
    return secret


async def list_keys(redis: Redis) -> dict[str, ApiKey]:
    """digest -> key."""
    return {(d.decode() if isinstance(d, bytes) else d): ApiKey.unpack(v)
            for d, v in (await redis.hgetall(keys.API_KEYS)).items()}


async def revoke(redis: Redis, name: str) -> bool:
    found = [d for d, key in (await list_keys(redis)).items() if key.name == name]
    if found:
        await redis.hdel(keys.API_KEYS, *found)
    return bool(found)


async def lookup(redis: Redis, secret: str) -> tuple[str, ApiKey] | None:
    found = await redis.hget(keys.API_KEYS, digest(secret))
    return None if found is None else (digest(secret), ApiKey.unpack(found))
