"""``/mcp`` on the manager: the SDK's Streamable-HTTP transport, one node per MCP session.

The SDK's session manager speaks the protocol; :class:`McpEndpoint`, an ASGI layer in front of
it, ties each MCP session to a node of its own:

* **Opening.** An ``initialize`` POST without a session id first gets a node from the session
  service (the warm pool when one is ready, ``node.max_nodes`` applies): 429 with ``Retry-After``
  or 503, each with a JSON-RPC error saying why, when it cannot. The SDK then answers and names
  the session in ``Mcp-Session-Id``; that id is bound to the node. An answer that opens no
  session releases the node again.
* **Requests.** Handlers find the node by the request's ``Mcp-Session-Id`` and call it through
  the route and secret the proxy uses (:class:`NodeSandbox`); each call counts as activity, so the
  checker closes an idle session's node like any other (the next call starts it again, workspace
  kept). The session id is not a cookie and the cookie is not a session id: neither opens the other.
* **Ending.** The client's DELETE, ``mcp.session_idle_minutes`` without a request in flight (this
  layer then ends the SDK's session with a DELETE of its own), the SDK no longer knowing the
  session, or the manager shutting down: the node is released.

Requests of the 2026-07-28 protocol (stateless, no session) are refused with the handshake
versions in the error, so clients fall back to ``initialize``: a sandbox needs a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp_types import INTERNAL_ERROR, INVALID_REQUEST, UNSUPPORTED_PROTOCOL_VERSION
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS
from starlette.requests import Request

from toolserver.errors import (
    CapacityExceeded,
    DatabaseUnavailable,
    Draining,
    InvalidSession,
    NodeStartError,
    NodeUnavailable,
    RuntimeBackendError,
)
from toolserver.manager.activity import ActivityBuffer
from toolserver.manager.auth import ANONYMOUS, SCOPE_KEY, Caller
from toolserver.manager.limits import limited_body, replay
from toolserver.manager.models import STOPPED_STATUSES
from toolserver.manager.proxy import NodeProxy, send_json
from toolserver.manager.sessions import SessionService
from toolserver.manager.settings import Settings
from toolserver.manager.upstream import node_url
from toolserver.manager.wake import sleeping
from toolserver.mcp_server.sandbox import NodeStream, Sandbox
from toolserver.mcp_server.server import build_server
from toolserver.protocol import RETRY_AFTER_SECONDS, SECRET_HEADER
from toolserver.runtimes.base import RUNNING

log = logging.getLogger(__name__)

MCP_PATH = "/mcp"
_SESSION = MCP_SESSION_ID_HEADER.lower().encode()
_VERSION = MCP_PROTOCOL_VERSION_HEADER.lower().encode()
#: Largest opening request read before the SDK sees it (an ``initialize`` is a few hundred bytes).
MAX_OPENING_BODY = 1 << 20
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]


class _AiohttpStream:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.status = resp.status
        self.media_type: str | None = resp.content_type if "content-type" in resp.headers else None
        self.length = resp.content_length
        self._resp = resp

    def chunks(self) -> AsyncIterator[bytes]:
        return self._resp.content.iter_chunked(256 * 1024)


class NodeSandbox(Sandbox):
    """A session's node, called directly with the proxy's client, route and secret."""

    def __init__(
        self,
        node_id: str,
        sessions: SessionService,
        proxy: NodeProxy,
        activity: ActivityBuffer,
        caller: Caller = ANONYMOUS,
    ) -> None:
        super().__init__()
        self.node_id = node_id
        self.caller = caller
        self.sessions = sessions
        self.proxy = proxy
        self.activity = activity

    @contextlib.asynccontextmanager
    async def open(
        self, path: str, payload: dict[str, Any] | None, method: str = "POST"
    ) -> AsyncIterator[NodeStream]:
        route = await self.sessions.route(self.node_id)
        if route.status != RUNNING and sleeping(route):  # paused, or stopped for idleness
            route = await self.sessions.sleep.wake(route)
        if route.status != RUNNING:
            # the proxy's words, so that Sandbox.post restarts a node the checker stopped
            raise NodeUnavailable(f"node is not running: {route.short_id} ({route.status})")
        self.activity.begin(route.node_id)
        url = node_url(self.proxy.client, route.host, route.port, path)
        try:
            async with self.proxy.client.request(
                method, url, json=payload, headers={SECRET_HEADER: route.secret}
            ) as resp:
                yield _AiohttpStream(resp)
        except TimeoutError:
            raise NodeUnavailable(
                f"node did not answer within {self.proxy.timeout:g} s (node.request_timeout_seconds)", 504
            ) from None
        except aiohttp.ClientError as exc:
            log.warning("node %s is not responding: %s", route.short_id, exc)
            self.sessions.forget_route(route.node_id)
            raise NodeUnavailable("node is not responding") from None
        finally:
            self.activity.end(route.node_id)

    async def restart(self) -> None:
        route = await self.sessions.route(self.node_id)
        if route.status in STOPPED_STATUSES:
            log.info("node %s restarts for its MCP session", route.short_id)
            await self.sessions.reconnect(self.node_id, self.caller)


@dataclass
class _Binding:
    node_id: str
    sandbox: NodeSandbox
    caller: Caller  # who opened the session: only that key (or an admin key) may use it
    inflight: int = 0
    last_seen: float = field(default_factory=time.monotonic)


def security_settings(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection: the loopback names while listening on loopback, else as configured."""
    cfg = settings.mcp
    hosts, origins = cfg.allowed_hosts, cfg.allowed_origins
    if hosts is None and settings.host in LOOPBACK_HOSTS:
        hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    if origins is None and hosts is not None:
        origins = [f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=hosts is not None,
        allowed_hosts=hosts or [],
        allowed_origins=origins or [],
    )


class McpEndpoint:
    """The ASGI app of ``/mcp``; :meth:`start` and :meth:`aclose` run in the manager's lifespan."""

    def __init__(
        self, settings: Settings, sessions: SessionService, proxy: NodeProxy, activity: ActivityBuffer
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.proxy = proxy
        self.activity = activity
        self.server = build_server(self._sandbox_of, settings.mcp.resource_max_bytes)
        security = security_settings(settings)
        self._security = TransportSecurityMiddleware(security)
        self._own_host = _internal_host(security, settings.port)
        # sessions end here (idle, shutdown), so the SDK keeps no clock of its own
        self.sdk = StreamableHTTPSessionManager(
            self.server,
            security_settings=security,
            session_idle_timeout=None,
            json_response=settings.mcp.json_response,
        )
        self._bindings: dict[str, _Binding] = {}
        self._stack = contextlib.AsyncExitStack()
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._stack.enter_async_context(self.sdk.run())
        self._sweeper = asyncio.create_task(self._sweep(), name="mcp-idle-sessions")

    async def aclose(self) -> None:
        """End every MCP session and release its node."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        bindings, self._bindings = list(self._bindings.values()), {}
        await self._stack.aclose()
        sem = asyncio.Semaphore(8)

        async def one(binding: _Binding) -> None:
            async with sem:
                await self._release(binding.node_id, binding.caller)

        await asyncio.gather(*(one(b) for b in bindings))

    # ---- the handlers' side ------------------------------------------------------------------------

    async def _sandbox_of(self, ctx: ServerRequestContext[Any, Any]) -> Sandbox:
        request = ctx.request
        sid = request.headers.get(MCP_SESSION_ID_HEADER) if isinstance(request, Request) else None
        binding = self._bindings.get(sid) if sid else None
        if binding is None:
            raise MCPError(INVALID_REQUEST, "this MCP session has no sandbox (it ended); start a new session")
        return binding.sandbox

    # ---- ASGI --------------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        sid = version = None
        for name, value in scope["headers"]:
            if name == _SESSION:
                sid = value.decode("latin-1")
            elif name == _VERSION:
                version = value.decode("latin-1")
        if version in MODERN_PROTOCOL_VERSIONS:
            return await _refuse_stateless(send, version)
        if sid is None:
            if scope["method"] == "POST":
                return await self._open(scope, receive, send)
            return await self.sdk.handle_request(scope, receive, send)
        binding = self._bindings.get(sid)
        if binding is None:  # unknown or ended: the SDK answers 404
            return await self.sdk.handle_request(scope, receive, send)
        caller: Caller = scope.get(SCOPE_KEY, ANONYMOUS)
        if not caller.may_act_on(binding.caller.key_id):  # another key's session: as if there were none
            return await send_json(send, 404, _rpc_error(None, INVALID_REQUEST, "Session not found"))
        binding.inflight += 1
        try:
            status, _ = await _serve(self.sdk.handle_request, scope, receive, send)
        finally:
            binding.inflight -= 1
            binding.last_seen = time.monotonic()
        if status == 404:
            await self._end(sid, "the SDK no longer knows it")
        elif scope["method"] == "DELETE" and status is not None and status < 300:
            await self._end(sid, "ended by the client")

    async def _open(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        """An opening POST: a node for an ``initialize``, bound to the session the SDK opens."""
        try:
            body = await limited_body(receive, MAX_OPENING_BODY)
        except ConnectionResetError:
            return None  # the client went away
        if body is None:
            return await send_json(send, 413, _rpc_error(None, INVALID_REQUEST, "request body too large"))
        receive = replay(body, receive)
        request_id, is_initialize = _initialize_id(body)
        if not is_initialize:  # the SDK refuses it: no session yet
            return await self.sdk.handle_request(scope, receive, send)
        refusal = await self._security.validate_request(Request(scope), is_post=True)
        if refusal is not None:
            return await refusal(scope, receive, send)
        caller: Caller = scope.get(SCOPE_KEY, ANONYMOUS)
        retry = [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]
        try:
            node = await self.sessions.create(caller)
            # the MCP session is this node's holder from here on (see SessionService.hand_over);
            # if the SDK refuses the initialize below, the node is released again
            await self.sessions.hand_over(node)
        except CapacityExceeded as exc:  # node.max_nodes, or the key's quota
            later = [(b"retry-after", str(exc.retry_after).encode())]
            return await send_json(send, 429, _rpc_error(request_id, INTERNAL_ERROR, str(exc)), later)
        except DatabaseUnavailable as exc:
            return await send_json(send, 503, _rpc_error(request_id, INTERNAL_ERROR, str(exc)), retry)
        except Draining as exc:
            return await send_json(send, 503, _rpc_error(request_id, INTERNAL_ERROR, str(exc)))
        except (NodeStartError, RuntimeBackendError) as exc:
            message = f"no sandbox for this session: {exc}"
            return await send_json(send, 503, _rpc_error(request_id, INTERNAL_ERROR, message))
        status = sid = None
        try:
            status, sid = await _serve(self.sdk.handle_request, scope, receive, send)
        finally:
            if sid is not None and status is not None and status < 400:
                sandbox = NodeSandbox(node.id, self.sessions, self.proxy, self.activity, caller)
                self._bindings[sid] = _Binding(node.id, sandbox, caller)
                log.info("MCP session %s… opened on node %s", sid[:8], node.short_id)
            else:
                await asyncio.shield(self._release(node.id, caller))

    async def _end(self, sid: str, why: str, *, delete: bool = False) -> None:
        binding = self._bindings.pop(sid, None)
        if binding is None:
            return
        log.info("MCP session %s… ended (%s)", sid[:8], why)
        if delete:
            await self._delete(sid)
        await self._release(binding.node_id, binding.caller)

    async def _delete(self, sid: str) -> None:
        """End the SDK's session the way a client would: a DELETE with its id."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "DELETE",
            "scheme": "http",
            "path": MCP_PATH,
            "raw_path": MCP_PATH.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", self._own_host.encode()), (_SESSION, sid.encode())],
            "client": None,
            "server": None,
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        try:
            await self.sdk.handle_request(scope, receive, send)
        except Exception:
            log.exception("could not end MCP session %s…", sid[:8])

    async def _release(self, node_id: str, caller: Caller = ANONYMOUS) -> None:
        try:
            await self.sessions.release(node_id, caller)
        except InvalidSession:
            pass  # released already (by the checker, say)
        except Exception:
            log.exception("could not release the node of an MCP session")

    async def _sweep(self) -> None:
        """End the sessions without a request in flight for ``mcp.session_idle_minutes``."""
        idle = self.settings.mcp.session_idle_minutes * 60
        interval = min(30.0, max(0.2, idle / 5))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            stale = [s for s, b in self._bindings.items() if b.inflight == 0 and now - b.last_seen >= idle]
            for sid in stale:
                try:
                    await self._end(sid, "idle", delete=True)
                except Exception:
                    log.exception("could not end idle MCP session %s…", sid[:8])


def _internal_host(security: TransportSecuritySettings, port: int) -> str:
    """A Host header the SDK's DNS-rebinding check accepts, for requests this layer makes itself."""
    if not security.enable_dns_rebinding_protection or not security.allowed_hosts:
        return f"127.0.0.1:{port}"
    first = security.allowed_hosts[0]
    return first[:-1] + str(port) if first.endswith(":*") else first


async def _serve(
    app: Callable[[Any, Any, Any], Awaitable[None]],
    scope: dict[str, Any],
    receive: ASGIReceive,
    send: ASGISend,
) -> tuple[int | None, str | None]:
    """Run ``app``; return the status it answered with and the session id it named, if any."""
    status: int | None = None
    sid: str | None = None

    async def watch(message: dict[str, Any]) -> None:
        nonlocal status, sid
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", ()):
                if name.lower() == _SESSION:
                    sid = value.decode("latin-1")
        await send(message)

    await app(scope, receive, watch)
    return status, sid


def _initialize_id(body: bytes) -> tuple[Any, bool]:
    try:
        message = json.loads(body)
    except ValueError:
        return None, False
    if isinstance(message, dict) and message.get("method") == "initialize" and "id" in message:
        return message["id"], True
    return None, False


def _rpc_error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


async def _refuse_stateless(send: ASGISend, version: str) -> None:
    message = (
        f"MCP {version} (stateless) is not served here: every MCP session gets a sandbox of its own, "
        "so open one with initialize"
    )
    data = {"supported": list(HANDSHAKE_PROTOCOL_VERSIONS), "requested": version}
    await send_json(send, 400, _rpc_error(None, UNSUPPORTED_PROTOCOL_VERSION, message, data))
