"""The browser playground: ``GET /`` and its static files (docs/api.md section 9).

The page is plain HTML, CSS and JavaScript in ``trio_stream/playground/``,
shipped in the package; there is no build step and nothing is loaded from
elsewhere.  The files are read once, when the app is built, and served from
memory under fixed names: there is no path to resolve, so no path to escape.

Every answer carries a Content-Security-Policy that allows only the page's own
files (no inline script or style, no other origin) and
``X-Content-Type-Options: nosniff``.  The page needs no API key; the API calls
it makes send the key the user typed in.
"""

from __future__ import annotations

from importlib import resources

from quart import Response
from quart_trio import QuartTrio

from .errors import unknown_route

PREFIX = "/playground/"

# (file in trio_stream/playground/, Content-Type); index.html is served at "/"
# and only there (``/playground/index.html`` is 404, docs/api.md section 9).
FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "sse.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new version of the server is seen at once
}


def load() -> dict[str, bytes]:
    """The playground's files, by name, from the installed package."""
    folder = resources.files("trio_stream") / "playground"
    return {name: (folder / name).read_bytes() for name in FILES}


def add_playground(app: QuartTrio) -> None:
    """Register ``GET /`` (the page) and ``GET /playground/<name>`` on ``app``."""
    files = load()

    def answer(name: str) -> Response:
        return Response(files[name], content_type=FILES[name], headers=HEADERS)

    @app.get("/")
    async def playground_page() -> Response:
        return answer("index.html")

    @app.get(PREFIX + "<name>")
    async def playground_file(name: str) -> Response:
        # The page itself is served at "/" only: one address, as documented.
        if name not in files or name == "index.html":
            raise unknown_route(PREFIX + name)
        return answer(name)
