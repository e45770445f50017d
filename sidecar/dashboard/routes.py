"""The dashboard's routes on the admin listener: the page, its two static files, its JSON.

Everything the page needs comes from here (no CDN, no fonts, no build step); the
Content-Security-Policy makes the browser refuse anything else, so the page keeps working
with no internet access and cannot be made to call out.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.dashboard.model import DashboardModel

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'none'")
STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


def _load_static() -> dict[str, bytes]:
    """The page's files, read once from the package (they are small and never change)."""
    folder = resources.files("sidecar.dashboard") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_TYPES}


def dashboard_routes(model: DashboardModel) -> list[Route]:
    static = _load_static()
    headers = {"content-security-policy": CSP, "cache-control": "no-cache",
               "x-content-type-options": "nosniff"}

    async def page(request: Request) -> Response:
        model.start()
        return Response(static["index.html"], media_type=STATIC_TYPES["index.html"],
                        headers=headers)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static or name == "index.html":
            return JSONResponse({"error": "not found"}, status_code=404)
        return Response(static[name], media_type=STATIC_TYPES[name], headers=headers)

    async def document(request: Request) -> Response:
        model.start()
        return JSONResponse(model.document(), headers={"cache-control": "no-store"})

    return [
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/dashboard/static/{name}", asset, methods=["GET", "HEAD"]),
        Route("/dashboard.json", document, methods=["GET", "HEAD"]),
    ]
