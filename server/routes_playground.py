"""GET /: the browser playground, and its files under /playground/ (server/playground/: static HTML,
CSS and ES modules; no build step, nothing fetched from anywhere else).

The page speaks over the WebSocket, downloads WAV with POST /v1/audio/speech and shows the live
numbers of a session. It uses relative URLs only, so it works behind a proxy that serves the server
under a path prefix (open it with the trailing slash: `/prefix/`). The page and its files answer
without the API key (they hold no secret); the API calls they make need it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

STATIC = Path(__file__).with_name("playground")
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8"}
# the browser itself refuses anything from another origin: the page works offline and leaks nothing
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                       "media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
                                       "frame-ancestors 'none'"}

router = APIRouter(include_in_schema=False)


def _route(path: str, file: Path) -> None:
    body, media_type = file.read_bytes(), _TYPES[file.suffix]

    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    router.add_api_route(path, serve, methods=["GET"], name=f"playground:{file.name}")


_route("/", STATIC / "index.html")
for _file in sorted(STATIC.iterdir()):
    if _file.suffix in _TYPES and _file.name != "index.html":
        _route(f"/playground/{_file.name}", _file)

PATHS = frozenset(route.path for route in router.routes)  # open without the API key
