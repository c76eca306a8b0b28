"""Forwarding a session's requests to its node: one pooled HTTP client, bodies streamed both ways."""

from __future__ import annotations

import logging
from http.cookies import CookieError, SimpleCookie

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from toolserver.errors import InvalidSession
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.sessions import SessionService
from toolserver.protocol import COOKIE_NAME, SECRET_HEADER
from toolserver.runtimes.base import RUNNING

log = logging.getLogger(__name__)

#: RFC 9110 §7.6.1 connection-specific headers, plus those the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "host",
    }
)


_HOP_BY_HOP_RAW = frozenset(h.encode() for h in HOP_BY_HOP)


def _strip_session_cookie(value: str) -> str:
    """The Cookie header without the manager's own cookie."""
    try:
        jar = SimpleCookie()
        jar.load(value)
    except CookieError:
        return ""
    return "; ".join(f"{k}={m.value}" for k, m in jar.items() if k != COOKIE_NAME)


class NodeProxy:
    def __init__(
        self, sessions: SessionService, activity: ActivityBuffer, timeout: float, max_connections: int = 512
    ) -> None:
        self.sessions = sessions
        self.activity = activity
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=128),
            trust_env=False,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _headers(self, request: Request, secret: str) -> list[tuple[str, str]]:
        out = []
        for name, value in request.headers.items():
            lname = name.lower()
            if lname in HOP_BY_HOP or lname == SECRET_HEADER.lower():
                continue
            if lname == "cookie":
                value = _strip_session_cookie(value)
                if not value:
                    continue
            out.append((name, value))
        out.append((SECRET_HEADER, secret))
        if request.client is not None:
            out.append(("X-Forwarded-For", request.client.host))
        return out

    async def forward(self, request: Request) -> Response:
        try:
            route = await self.sessions.route(request.cookies.get(COOKIE_NAME))
        except InvalidSession as exc:
            return JSONResponse({"detail": str(exc)}, status_code=403)
        if route.status != RUNNING:
            return JSONResponse(
                {"detail": f"node is not running: {route.short_id} ({route.status})"}, status_code=503
            )
        self.activity.touch(route.node_id)
        has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
        upstream = self.client.build_request(
            request.method,
            httpx.URL(
                scheme="http",
                host=route.host,
                port=route.port,
                path=request.url.path,
                query=request.url.query.encode(),
            ),
            headers=self._headers(request, route.secret),
            content=request.stream() if has_body else None,
        )
        try:
            resp = await self.client.send(upstream, stream=True)
        except httpx.TimeoutException:
            log.warning("node %s timed out on %s", route.short_id, request.url.path)
            return JSONResponse(
                {
                    "detail": f"node did not answer within {self.client.timeout.read:g} s "
                    "(node.request_timeout_seconds)"
                },
                status_code=504,
            )
        except httpx.TransportError as exc:
            log.warning("node %s is not responding: %s", route.short_id, exc)
            self.sessions.forget_route(route.node_id)
            return JSONResponse({"detail": "node is not responding"}, status_code=503)
        response = StreamingResponse(
            resp.aiter_raw(), status_code=resp.status_code, background=BackgroundTask(resp.aclose)
        )
        # raw pairs keep repeated headers (Set-Cookie) and the node's own Content-Length
        response.raw_headers = [(k, v) for k, v in resp.headers.raw if k.lower() not in _HOP_BY_HOP_RAW]
        return response
