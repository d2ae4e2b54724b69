"""Admin routes (admin API key): create, list and revoke API keys."""

from __future__ import annotations

from aiohttp import web

from common import api_keys
from common.api_keys import ApiKey
from common.errors import NotFound, Unprocessable
from gateway.api_types import ApiKeyBody, parse, parse_json_object
from gateway.context import Gateway


async def create_key(request: web.Request) -> web.Response:
    body = parse(ApiKeyBody, parse_json_object(await request.read()))
    key = ApiKey(name=body.name, admin=body.admin, rps=body.rps, max_concurrent=body.max_concurrent)
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
