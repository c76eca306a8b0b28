"""Forwarding a session's requests to its node, as a plain ASGI layer in front of the manager's app.

Forwarded paths never enter the web framework: the proxy reads the ``node_id`` cookie, finds the
node's route (cached, see :meth:`SessionService.route`), and streams the request body to the node
and the node's answer back through one pooled aiohttp client. Nothing is buffered: a 1 GiB upload
or download passes through in chunks. Hop-by-hop headers and the manager's own cookie are not
forwarded; the node's secret is added. A client that sends ``X-ToolServer-Cancel-On-Disconnect``
(with a body of at most 64 KiB, a tool call say) has its request to the node closed when it goes
away before the answer, and the node then stops the tool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
from multidict import CIMultiDict

from toolserver.disconnect import unless_disconnected
from toolserver.errors import DatabaseUnavailable, InvalidSession, ToolCancelled
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.sessions import SessionService
from toolserver.protocol import CANCEL_ON_DISCONNECT_HEADER, COOKIE_NAME, RETRY_AFTER_SECONDS, SECRET_HEADER
from toolserver.runtimes.base import RUNNING

ASGIApp = Any
Scope = dict[str, Any]
log = logging.getLogger(__name__)

_CANCEL_ON_DISCONNECT = CANCEL_ON_DISCONNECT_HEADER.lower().encode()
#: RFC 9110 §7.6.1 connection-specific headers, plus those the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"host",
        SECRET_HEADER.lower().encode(),
        _CANCEL_ON_DISCONNECT,
    }
)
CHUNK = 256 * 1024
SMALL_BODY = 64 * 1024
_COOKIE_PREFIX = COOKIE_NAME + "="


def session_cookie(cookie_header: str) -> tuple[str | None, str]:
    """Split a Cookie header into the manager's ``node_id`` and the rest, which goes to the node."""
    node_id, rest = None, []
    for part in cookie_header.split(";"):
        part = part.strip()
        if part.startswith(_COOKIE_PREFIX):
            node_id = part[len(_COOKIE_PREFIX) :].strip('"')
        elif part:
            rest.append(part)
    return node_id, "; ".join(rest)


async def send_json(send: Any, status: int, body: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class NodeProxy:
    """Forwards one request to the session's node through a pooled aiohttp client."""

    def __init__(
        self, sessions: SessionService, activity: ActivityBuffer, timeout: float, max_connections: int = 512
    ) -> None:
        self.sessions = sessions
        self.activity = activity
        self.timeout = timeout
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def forward(self, scope: Scope, receive: Any, send: Any) -> None:
        headers: CIMultiDict[str] = CIMultiDict()
        node_id = None
        chunked = cancellable = False
        length = 0
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.lower()
            if name in HOP_BY_HOP:
                chunked = chunked or name == b"transfer-encoding"
                cancellable = cancellable or name == _CANCEL_ON_DISCONNECT
                continue
            value = raw_value.decode("latin-1")
            if name == b"cookie":
                node_id, value = session_cookie(value)
                if not value:
                    continue
            elif name == b"content-length":
                length = int(value) if value.isdigit() else 0
            headers.add(raw_name.decode("latin-1"), value)
        try:
            route = await self.sessions.route(node_id)
        except InvalidSession as exc:
            return await send_json(send, 403, {"detail": str(exc)})
        except DatabaseUnavailable as exc:
            retry = [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]
            return await send_json(send, 503, {"detail": str(exc)}, retry)
        if route.status != RUNNING:
            return await send_json(
                send, 503, {"detail": f"node is not running: {route.short_id} ({route.status})"}
            )
        self.activity.touch(route.node_id)
        headers[SECRET_HEADER] = route.secret
        if scope.get("client"):
            headers["X-Forwarded-For"] = scope["client"][0]
        url = f"http://{route.host}:{route.port}{scope['path']}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            streamed = chunked or length > SMALL_BODY
            if streamed:
                data: Any = _body(receive)  # streamed, never held in memory
            else:  # a small body goes out in one write with the request head
                data = await _read_all(receive) if length else None
            request = self.client.request(
                scope["method"], url, headers=headers, data=data, allow_redirects=False
            )
            if cancellable and not streamed:  # the body is read: receive() can only tell a disconnect
                resp = await unless_disconnected(receive, lambda: request)
            else:
                resp = await request
        except (ConnectionResetError, ToolCancelled):  # the client went away
            return None
        except TimeoutError:
            log.warning("node %s timed out on %s", route.short_id, scope["path"])
            detail = f"node did not answer within {self.timeout:g} s (node.request_timeout_seconds)"
            return await send_json(send, 504, {"detail": detail})
        except aiohttp.ClientError as exc:
            log.warning("node %s is not responding: %s", route.short_id, exc)
            self.sessions.forget_route(route.node_id)
            return await send_json(send, 503, {"detail": "node is not responding"})
        try:
            out = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in HOP_BY_HOP]
            small = resp.content_length is not None and resp.content_length <= SMALL_BODY
            body = await resp.read() if small else b""  # a small answer goes back in one message
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            if small:
                return await send({"type": "http.response.body", "body": body})
            async for chunk in resp.content.iter_chunked(CHUNK):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientError, TimeoutError) as exc:
            # the answer is already under way: the server closes the connection, the client sees it cut
            log.warning("node %s broke off its answer: %s", route.short_id, exc)
            raise
        finally:
            resp.release()


async def _body(receive: Any) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client disconnected during upload")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _read_all(receive: Any) -> bytes:
    return b"".join([chunk async for chunk in _body(receive)])
