"""Forwarding a session's requests to its node, as a plain ASGI layer in front of the manager's app.

Forwarded paths never enter the web framework: the proxy reads the ``node_id`` cookie, finds the
node's route (cached, see :meth:`SessionService.route`), and streams the request body to the node
and the node's answer back over pooled keep-alive connections (:mod:`toolserver.manager.upstream`).
Nothing is buffered: a 1 GiB upload or download passes through in chunks, and each chunk of a
streamed answer (a command's output) is sent on as soon as it arrives. A streamed answer stops when
its client goes away, so that the node sees the client go; while it streams, the session counts as
active. Hop-by-hop headers, the caller's API key and the manager's own cookie are not forwarded
(the node is the agent's: nothing that grants access goes there); the node's secret is added. The
caller (authenticated in front, see :mod:`toolserver.manager.auth`) must own the session or hold an
admin key. A client that sends ``X-ToolServer-Cancel-On-Disconnect`` (with a body of at most 64
KiB, a tool call say) has its request to the node closed when it goes away before the answer, and
the node then stops the tool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp

from toolserver.disconnect import disconnected, unless_disconnected
from toolserver.errors import (
    DatabaseUnavailable,
    InvalidSession,
    NodeConnectionError,
    ToolCancelled,
    ToolServerError,
)
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.auth import ANONYMOUS, SCOPE_KEY, Caller
from toolserver.manager.metrics import Metrics
from toolserver.manager.sessions import Route, SessionService
from toolserver.manager.upstream import NodeConnector, UpstreamPool, host_header
from toolserver.manager.wake import route_headers, sleeping, wake_failure
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
        b"expect",  # the manager's server answered it already (100 Continue)
        SECRET_HEADER.lower().encode(),
        _CANCEL_ON_DISCONNECT,
    }
)
#: Request headers that never reach a node: hop-by-hop ones and the caller's credentials.
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"x-api-key"}
#: Answer headers the proxy drops: hop-by-hop ones and ``date``, which the manager's server sets.
NOT_RETURNED = HOP_BY_HOP | {b"date"}
CHUNK = 256 * 1024
SMALL_BODY = 64 * 1024
_COOKIE_PREFIX = COOKIE_NAME + "="
_SECRET = SECRET_HEADER.encode()
_X_FORWARDED_FOR = b"x-forwarded-for: %b\r\n"


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
        self,
        sessions: SessionService,
        activity: ActivityBuffer,
        timeout: float,
        max_connections: int = 512,
        metrics: Metrics | None = None,
    ) -> None:
        self.sessions = sessions
        self.activity = activity
        self.timeout = timeout
        self.metrics = metrics or sessions.metrics
        self.client = aiohttp.ClientSession(
            connector=NodeConnector(limit=max_connections, limit_per_host=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )  # WebSockets and MCP calls; forwarded HTTP requests go through ``upstream``
        self.upstream = UpstreamPool(timeout, max_connections=max_connections)

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.client.close()

    async def route(self, scope: Scope, node_id: str | None, send: Any) -> Route | None:
        """The running node of the session ``node_id``, if the request's caller may use it, its
        activity touched; else the error answer is sent and None returned."""
        try:
            route = await self.sessions.route(node_id)
        except InvalidSession as exc:
            return await send_json(send, 403, {"detail": str(exc)})
        except DatabaseUnavailable as exc:
            retry = [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]
            return await send_json(send, 503, {"detail": str(exc)}, retry)
        caller: Caller = scope.get(SCOPE_KEY, ANONYMOUS)
        if not caller.may_act_on(route.owner):
            return await send_json(send, 403, {"detail": "this session belongs to another API key"})
        if route.status != RUNNING:
            if not sleeping(route):
                return await send_json(
                    send, 503, {"detail": f"node is not running: {route.short_id} ({route.status})"}
                )
            try:
                route = await self.sessions.sleep.wake(route)
            except ToolServerError as exc:
                return await send_json(send, *wake_failure(exc))
        self.activity.touch(route.node_id)
        return route

    async def forward(self, scope: Scope, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        lines: list[bytes] = []
        node_id = None
        chunked = cancellable = False
        length = 0
        for name, value in scope["headers"]:  # uvicorn hands them over lower-cased
            if name in NOT_FORWARDED:
                chunked = chunked or name == b"transfer-encoding"
                cancellable = cancellable or name == _CANCEL_ON_DISCONNECT
                continue
            if name == b"cookie":
                node_id, rest = session_cookie(value.decode("latin-1"))
                if not rest:
                    continue
                value = rest.encode("latin-1")
            elif name == b"content-length":
                length = int(value) if value.isdigit() else 0
            lines.append(b"%b: %b\r\n" % (name, value))
        route = await self.route(scope, node_id, send)
        if route is None:
            return None
        # while a request is in flight its node is not idle (the checker puts no busy node to sleep)
        self.activity.begin(route.node_id)
        try:
            await self._send_to(route, scope, receive, send, lines, chunked, cancellable, length, started)
        finally:
            self.activity.end(route.node_id)

    async def _send_to(
        self,
        route: Route,
        scope: Scope,
        receive: Any,
        send: Any,
        lines: list[bytes],
        chunked: bool,
        cancellable: bool,
        length: int,
        started: float,
    ) -> None:
        path = scope["path"]
        target = path.encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        client = scope.get("client")
        head = b"%b %b HTTP/1.1\r\nhost: %b\r\n%b%b%b: %b\r\n%b\r\n" % (
            scope["method"].encode(),
            target,
            host_header(route.host, route.port),
            b"".join(lines),
            _X_FORWARDED_FOR % client[0].encode() if client else b"",
            _SECRET,
            route.secret.encode(),
            b"transfer-encoding: chunked\r\n" if chunked else b"",
        )
        sent = [0]
        streamed_body = chunked or length > SMALL_BODY
        try:
            if streamed_body:
                data: Any = _body(receive, sent)  # streamed, never held in memory
            else:  # a small body goes out in one write with the request head
                data = await _read_all(receive) if length else None
                sent[0] = len(data) if data else 0
            request = self.upstream.request(route.host, route.port, head, data, chunked)
            if cancellable and not streamed_body:  # the body is read: receive() can only tell a disconnect
                resp = await unless_disconnected(receive, lambda: request)
            else:
                resp = await request
        except (ConnectionResetError, ToolCancelled):  # the client went away
            return None
        except TimeoutError:
            log.warning("node %s timed out on %s", route.short_id, path)
            self.metrics.runtime_errors.labels("node_timeout").inc()
            self.metrics.proxied(path, 504, time.perf_counter() - started, sent[0], 0)
            detail = f"node did not answer within {self.timeout:g} s (node.request_timeout_seconds)"
            return await send_json(send, 504, {"detail": detail})
        except NodeConnectionError as exc:
            log.warning("node %s is not responding: %s", route.short_id, exc)
            self.metrics.runtime_errors.labels("node_not_responding").inc()
            self.metrics.proxied(path, 503, time.perf_counter() - started, sent[0], 0)
            self.sessions.forget_route(route.node_id)
            self.upstream.forget(route.host, route.port)
            return await send_json(send, 503, {"detail": "node is not responding"})
        seconds = time.perf_counter() - started  # the node's answer has started
        received = 0
        answering = False
        try:
            out = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in NOT_RETURNED]
            out += route_headers(route)
            small = resp.content_length is not None and resp.content_length <= SMALL_BODY
            body = await resp.read() if small else b""  # a small answer goes back in one message
            answering = True
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            if small:
                received = len(body)
                return await send({"type": "http.response.body", "body": body})
            # a streamed answer (command output, say) may outlive its client: stop reading it then,
            # so that the node sees the client go. (A streamed request body still uses ``receive``.)
            gone = None if streamed_body else asyncio.ensure_future(disconnected(receive))
            if gone is not None:
                gone.add_done_callback(lambda done: done.cancelled() or resp.close())
            try:
                async for chunk in resp.chunks():
                    received += len(chunk)
                    self.activity.touch(route.node_id)  # a long stream keeps its session active
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except NodeConnectionError:
                if gone is not None and gone.done():
                    return None  # the client went away: nobody to answer
                raise
            finally:
                if gone is not None:
                    gone.cancel()
        except (NodeConnectionError, TimeoutError) as exc:
            # the answer is already under way: returning without finishing it makes the server close
            # the connection, so the client sees it cut (no traceback: the node's failure, not ours)
            reason = str(exc) or type(exc).__name__
            log.warning("node %s broke off its answer on %s: %s", route.short_id, path, reason)
            self.metrics.runtime_errors.labels("node_broke_off").inc()
            if not answering:
                await send_json(send, 503, {"detail": "node broke off its answer; retry the request"})
        finally:
            resp.release()
            self.metrics.proxied(path, resp.status, seconds, sent[0], received)


async def _body(receive: Any, sent: list[int] | None = None) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("client disconnected during upload")
        chunk = message.get("body", b"")
        if chunk:
            if sent is not None:
                sent[0] += len(chunk)
            yield chunk
        if not message.get("more_body", False):
            return


async def _read_all(receive: Any) -> bytes:
    return b"".join([chunk async for chunk in _body(receive)])
