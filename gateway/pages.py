"""The browser pages: the playground at `/` and the fleet console at `/console`.

Everything they need ships in the package (gateway/static/): plain HTML, CSS and JavaScript, no
build step, no CDN. The pages themselves are public (they hold no data); what they show comes from
the API with the key the user types in, which stays in the browser (localStorage). The policy below
lets them talk only to the gateway that served them.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from common.errors import NotFound

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"
_STATIC_FILES = {path.name: path for path in STATIC_DIR.iterdir() if path.is_file()}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


async def playground(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "playground.html", headers=_HEADERS)


async def console(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "console.html", headers=_HEADERS)


async def static_file(request: web.Request) -> web.FileResponse:
    """Only the files shipped beside the pages, by name: no path from a request reaches the filesystem."""
    name = request.match_info["name"]
    path = _STATIC_FILES.get(name)
    if path is None:
        raise NotFound(f"no page file named {name!r}")
    return web.FileResponse(path, headers=_HEADERS)


def routes() -> list[web.AbstractRouteDef]:
    return [web.get("/", playground), web.get("/console", console), web.get(STATIC_PREFIX + "{name}", static_file)]


def is_public(path: str) -> bool:
    return path in ("/", "/console") or path.startswith(STATIC_PREFIX)
