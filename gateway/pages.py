"""The browser pages: the playground at `/` and the fleet console at `/console`.

Everything they need ships in the package (gateway/static/): plain HTML, CSS and JavaScript, no
build step, no CDN. The pages themselves are public (they hold no data); what they show comes from
the API with the key the user types in, which stays in the browser (localStorage). The policy below
lets them talk only to the gateway that served them.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"
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


def routes() -> list[web.AbstractRouteDef]:
    return [web.get("/", playground), web.get("/console", console),
            web.static(STATIC_PREFIX.rstrip("/"), STATIC_DIR, append_version=False)]


def is_public(path: str) -> bool:
    return path in ("/", "/console") or path.startswith(STATIC_PREFIX)
