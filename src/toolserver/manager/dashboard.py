"""``GET /dashboard``: one static page (no build step) that reads the admin API and ``/metrics``.

The page itself holds no data and needs no key; the admin key is typed into it, or passed once
as ``/dashboard#key=<KEY>`` (a URL fragment never reaches a server or its logs), and kept in
the tab's ``sessionStorage``. Every request the page makes sends it as a Bearer token.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@cache
def page() -> str:
    return files("toolserver.manager").joinpath("static/dashboard.html").read_text(encoding="utf-8")


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(
        page(),
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )
