"""`Idempotency-Key` on a POST that creates a request (native and OpenAI): a retry is the first request.

A client that timed out cannot know whether its POST was taken; with the same key and the same
body, a retry gets the request the first POST created (the same request_id; on the OpenAI routes the
same completion, streamed again from its start) and never creates a second one. The same key with
a different body is a 422. A key belongs to the API key that used it (without API keys: to
everyone), and lives as long as the request: until its result expires. Recorded in the enqueue
script itself (common/request_store.py), so a key never exists without its request.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from common import keys
from common.errors import Unprocessable
from common.request_store import Idempotency, Replay
from gateway.auth import CALLER_KEY

HEADER = "Idempotency-Key"
_MAX_LENGTH = 255


def idempotency_of(request: web.Request, body: dict[str, Any]) -> Idempotency | None:
    """From a POST's header (None without one)."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    caller = request.get(CALLER_KEY)
    return idempotency_for(raw, body, route=f"{request.method} {request.path}", owner=caller.digest if caller else "")


def idempotency_for(raw: str, body: dict[str, Any], *, route: str, owner: str) -> Idempotency:
    if not 0 < len(raw) <= _MAX_LENGTH or not raw.isprintable():
        raise Unprocessable(f"`{HEADER}` must be 1 to {_MAX_LENGTH} printable characters", param=HEADER)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return Idempotency(key=keys.idempotency(owner, hashlib.sha256(raw.encode()).hexdigest()),
                       fingerprint=hashlib.sha256(f"{route}\n{canonical}".encode()).hexdigest()[:32])


def check_replay(replay: Replay, idempotency: Idempotency) -> str:
    """The earlier request's id, if it was made from this same body; a 422 otherwise."""
    if replay.fingerprint != idempotency.fingerprint:
        raise Unprocessable(f"this `{HEADER}` was used for a different request ({replay.request_id}); "
                            "use a new key for a new request", param=HEADER)
    return replay.request_id
