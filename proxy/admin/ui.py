"""The dashboard: one static page and its assets, served by the admin API at `/ui`.

The page carries no data: its script reads `/status` and `/events` and acts through the admin
API with the token the operator types, like any other client. The assets ship in the package
(proxy/admin/ui/) and are read once, when the admin API is built.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
PAGE = "/ui"
PATHS = frozenset({PAGE, f"{PAGE}/", *(f"{PAGE}/{name}" for name in ASSETS)})
# Everything from this origin only, no inline script or style, no framing, no form posts:
# the page is a client of the admin API and nothing else.
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def load_assets() -> dict[str, bytes]:
    folder = resources.files(__package__ or "proxy") / "ui"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def add_routes(router: web.UrlDispatcher) -> None:
    """`GET /ui` (the page) and `GET /ui/<asset>`."""
    assets = load_assets()

    def serve(name: str) -> web.Response:
        return web.Response(body=assets[name], headers={**HEADERS, "Content-Type": ASSETS[name]})

    async def page(request: web.Request) -> web.Response:
        return serve("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return serve(name)

    async def to_page(request: web.Request) -> web.Response:
        # The page's URLs are relative to /ui: from /ui/ they would miss.
        raise web.HTTPFound("../ui")

    router.add_get(PAGE, page)
    router.add_get(PAGE + "/", to_page)
    router.add_get(PAGE + "/{name}", asset)
