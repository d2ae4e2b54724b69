"""Admin routes (admin API key): create, list and revoke API keys."""

from __future__ import annotations

from aiohttp import web

from common import api_keys
from common.api_keys import ApiKey
from common.errors import NotFound, Unprocessable
from gateway.context import Gateway
from gateway.validation import int_field, number_field, parse_json_object, reject_unknown

_KEY_FIELDS = frozenset({"name", "admin", "rps", "max_concurrent"})


async def create_key(request: web.Request) -> web.Response:
    body = parse_json_object(await request.read())
    reject_unknown(body, _KEY_FIELDS)
    name, admin = body.get("name"), body.get("admin", False)
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise Unprocessable("`name` must be a string of 1 to 64 characters", param="name")
    if not isinstance(admin, bool):
        raise Unprocessable("`admin` must be a boolean", param="admin")
    key = ApiKey(name=name, admin=admin, rps=number_field(body, "rps", 0.0, low=0.0, high=1e6),
                 max_concurrent=int_field(body, "max_concurrent", minimum=0, maximum=1_000_000) or 0)
    try:
        secret = await api_keys.create(Gateway.of(request).redis, key)
    except ValueError as exc:
        raise Unprocessable(str(exc), param="name") from exc
    return web.json_response({"key": secret, **_view(key)}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    found = await api_keys.list_keys(Gateway.of(request).redis)
    return web.json_response({"keys": sorted((_view(k) for k in found.values()), key=lambda k: k["name"])})


async def revoke_key(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not await api_keys.revoke(Gateway.of(request).redis, name):
        raise NotFound(f"no API key named {name!r}", param="name")
    return web.json_response({"name": name, "revoked": True})


def _view(key: ApiKey) -> dict[str, object]:
    return {"name": key.name, "admin": key.admin, "rps": key.rps, "max_concurrent": key.max_concurrent,
            "created_at": key.created_at}
