"""Forwarding WebSocket upgrades on forwarded GET paths (the node's ``/terminal``) to the session's node.

The same path as a forwarded HTTP request: the ``node_id`` cookie finds the node's route, the node's
secret is added, the manager's cookie is not passed on. Messages are relayed as they come, both
ways; when either side closes, the other is closed with the same code. A handshake carrying an
``Origin`` other than the manager's own address is refused: a web page must not reach a session's
terminal with a cookie the browser holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from toolserver.manager.proxy import NodeProxy, send_json, session_cookie
from toolserver.manager.sessions import Route
from toolserver.manager.upstream import node_url
from toolserver.protocol import SECRET_HEADER

log = logging.getLogger(__name__)

Scope = dict[str, Any]
#: largest message relayed (uvicorn's own default limit on the client side)
MAX_MESSAGE = 16 * 1024 * 1024
#: close code when the node cannot be reached after the handshake (RFC 6455: going away / error)
_NODE_GONE = 1011


def _denial(scope: Scope, send: Any) -> Any:
    """A ``send`` that turns an HTTP answer into a WebSocket denial (or a bare close without the
    server's support for denial responses)."""
    supported = "websocket.http.response" in scope.get("extensions", {})

    async def deny(message: dict[str, Any]) -> None:
        if supported:
            await send({**message, "type": "websocket." + message["type"]})
        elif message["type"] == "http.response.start":
            await send({"type": "websocket.close", "code": 1008})

    return deny


def _cross_origin(scope: Scope) -> str | None:
    """The handshake's Origin when it is not the manager's own address, else None."""
    headers = dict(scope["headers"])
    origin = headers.get(b"origin")
    if origin is None:
        return None  # not a browser
    text = origin.decode("latin-1")
    host = headers.get(b"host", b"").decode("latin-1")
    return None if urlsplit(text).netloc.lower() == host.lower() else text


class WebSocketProxy:
    """Relays one WebSocket between a client and its session's node."""

    def __init__(self, proxy: NodeProxy) -> None:
        self.proxy = proxy

    async def forward(self, scope: Scope, receive: Any, send: Any) -> None:
        deny = _denial(scope, send)
        origin = _cross_origin(scope)
        if origin is not None:
            return await send_json(deny, 403, {"detail": f"cross-origin WebSocket refused (Origin {origin})"})
        cookie = next((v for k, v in scope["headers"] if k == b"cookie"), b"").decode("latin-1")
        route = await self.proxy.route(scope, session_cookie(cookie)[0], deny)
        if route is None:
            return None
        if (await receive())["type"] != "websocket.connect":
            return None
        url = node_url(self.proxy.client, route.host, route.port, scope["path"])
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        headers = {SECRET_HEADER: route.secret}
        if scope.get("client"):
            headers["X-Forwarded-For"] = scope["client"][0]
        try:
            upstream = await self.proxy.client.ws_connect(
                url,
                headers=headers,
                protocols=scope.get("subprotocols") or (),
                autoclose=False,
                max_msg_size=MAX_MESSAGE,
            )
        except aiohttp.WSServerHandshakeError as exc:
            return await send_json(
                deny, exc.status, {"detail": f"the node refused the WebSocket: {exc.message}"}
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("node %s is not responding to a WebSocket: %s", route.short_id, exc)
            self.proxy.sessions.forget_route(route.node_id)
            return await send_json(deny, 503, {"detail": "node is not responding"})
        await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
        await self._relay(route, upstream, receive, send)

    async def _relay(
        self, route: Route, upstream: aiohttp.ClientWebSocketResponse, receive: Any, send: Any
    ) -> None:
        to_node = asyncio.ensure_future(self._client_to_node(route, upstream, receive))
        to_client = asyncio.ensure_future(self._node_to_client(route, upstream, send))
        try:
            await asyncio.wait({to_node, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_node, to_client):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            code, reason = 1000, ""
            if to_client.done() and not to_client.cancelled() and to_client.exception() is None:
                code, reason = to_client.result()
            if not upstream.closed:
                with contextlib.suppress(Exception):
                    await upstream.close(code=code)
            client_closed = to_node.done() and not to_node.cancelled() and to_node.exception() is None
            if not client_closed:  # a client that closed needs no close frame
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": code, "reason": reason})

    async def _client_to_node(
        self, route: Route, upstream: aiohttp.ClientWebSocketResponse, receive: Any
    ) -> None:
        """Returns when the client has closed (after closing the node's side with its code)."""
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(code=message.get("code") or 1000)
                return
            self.proxy.activity.touch(route.node_id)
            if message.get("bytes") is not None:
                await upstream.send_bytes(message["bytes"])
            elif message.get("text") is not None:
                await upstream.send_str(message["text"])

    async def _node_to_client(
        self, route: Route, upstream: aiohttp.ClientWebSocketResponse, send: Any
    ) -> tuple[int, str]:
        """Returns the node's close code and reason when the node has closed (or gone away)."""
        while True:
            message = await upstream.receive()
            if message.type == aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": message.data})
            elif message.type == aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": message.data})
            elif message.type == aiohttp.WSMsgType.CLOSE:
                return int(message.data or 1000), str(message.extra or "")
            elif message.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return upstream.close_code or 1000, ""
            elif message.type == aiohttp.WSMsgType.ERROR:
                log.warning("node %s broke off a WebSocket: %s", route.short_id, upstream.exception())
                return _NODE_GONE, "the node broke off the connection"
            self.proxy.activity.touch(route.node_id)
