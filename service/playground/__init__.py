"""GET /playground: one page that draws what the served models do (particles along
/trajectory paths, the field from /velocity, the density from /log_prob, image grids), talking
only to this server's public API. Static files shipped in the package; no build step.

The page and its two assets are open, like /docs: a browser cannot send a bearer key to load a
page, and they hold no secret. The calls the page makes carry the key typed into it, which it
keeps in memory only. A Content-Security-Policy keeps it to this server's own scripts."""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request, Response

from service.tableau import SOLVER_NAMES

FOLDER = Path(__file__).parent
PAGE = "/playground"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
OPEN_PATHS = frozenset({PAGE, *(f"{PAGE}/{name}" for name in ASSETS)})
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def _file(name: str) -> bytes:
    return (FOLDER / name).read_bytes()


@cache
def _page(needs_key: bool) -> bytes:
    """index.html with the solver menu (from the one list of names) and whether calls need a
    key (as the OpenAPI document also says): the page asks for one before it calls."""
    data = _file("index.html")
    data = data.replace(b"{{SOLVERS}}", html.escape(",".join(SOLVER_NAMES)).encode())
    return data.replace(b"{{AUTH}}", b"bearer" if needs_key else b"none")


@router.get(PAGE)
async def page(request: Request) -> Response:
    needs_key = bool(request.app.state.settings.api_keys())
    return Response(_page(needs_key), media_type="text/html; charset=utf-8", headers=HEADERS)


def _asset_route(name: str, media_type: str) -> None:
    async def asset() -> Response:
        return Response(_file(name), media_type=f"{media_type}; charset=utf-8", headers=HEADERS)

    router.add_api_route(f"{PAGE}/{name}", asset, methods=["GET"], name=name)


for _name, _media_type in ASSETS.items():
    _asset_route(_name, _media_type)
