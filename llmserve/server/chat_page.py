"""The browser chat page: `/` and its assets under `/static/`, shipped in the package and served
without a key (only `/v1/*` needs one; the page sends the key the user types).

The page renders model output by building DOM nodes from text, never by parsing HTML; the
Content-Security-Policy below is a second wall behind that: only our own scripts and styles run,
and the page can talk to no origin but this server.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on every load (the ETag makes that a 304), so an upgraded package never pairs a
    # new page with a cached old script.
    "Cache-Control": "no-cache",
}


class _Assets(StaticFiles):
    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(SECURITY_HEADERS)
        return response


async def _page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


def chat_page_routes() -> list[BaseRoute]:
    return [
        Route("/", _page, methods=["GET"]),
        Mount("/static", app=_Assets(directory=STATIC_DIR), name="static"),
    ]
